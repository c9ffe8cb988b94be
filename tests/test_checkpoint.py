"""Loading and saving checkpoints: every official file layout, clear errors for broken ones, any fsspec URL."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import gitmodel
from gitmodel import CheckpointError, GitForCausalLM
from tests.tiny_checkpoint import tiny_reference_model


@pytest.fixture(scope="module")
def reference():
    return tiny_reference_model(seed=4)


@pytest.fixture
def checkpoint(reference, tmp_path):
    reference.save_pretrained(str(tmp_path))
    return tmp_path


def logits(model, seed: int = 0) -> torch.Tensor:
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(torch.tensor([[101, 7, 9], [101, 3, 4]]), pixel_values=pixels).logits


def test_sharded_safetensors_load_like_a_single_file(reference, tmp_path):
    reference.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    torch.testing.assert_close(logits(GitForCausalLM.from_pretrained(tmp_path)), logits(reference), atol=2e-5, rtol=0)


def test_old_files_with_position_id_buffers_load(checkpoint, reference):
    weights = checkpoint / "model.safetensors"
    state = load_file(weights)
    state["git.embeddings.position_ids"] = torch.arange(64)[None]
    state["git.image_encoder.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(state, weights, metadata={"format": "pt"})
    torch.testing.assert_close(logits(GitForCausalLM.from_pretrained(checkpoint)), logits(reference), atol=2e-5, rtol=0)


def test_pickled_weights_need_an_explicit_opt_in(checkpoint, reference):
    state = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    torch.save(state, checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        GitForCausalLM.from_pretrained(checkpoint)
    model = GitForCausalLM.from_pretrained(checkpoint, allow_pickle=True)
    torch.testing.assert_close(logits(model), logits(reference), atol=2e-5, rtol=0)


def test_missing_and_unexpected_keys_are_named(checkpoint):
    weights = checkpoint / "model.safetensors"
    state = load_file(weights)
    del state["git.encoder.layer.1.output.dense.weight"]
    state["git.encoder.layer.7.extra.weight"] = torch.zeros(1)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        GitForCausalLM.from_pretrained(checkpoint)
    message = str(error.value)
    assert "missing 1 tensor(s): git.encoder.layer.1.output.dense.weight" in message
    assert "unexpected 1 tensor(s): git.encoder.layer.7.extra.weight" in message
    assert str(checkpoint) in message


def test_a_config_that_does_not_fit_the_weights_is_refused(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["hidden_size"] = 64
    config["num_hidden_layers"] = 3
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        GitForCausalLM.from_pretrained(checkpoint)
    message = str(error.value)
    assert "wrong shape" in message and "git.embeddings.word_embeddings.weight (checkpoint (128, 32), model (128, 64))" in message
    assert "missing" in message and "git.encoder.layer.2." in message


def test_corrupt_and_missing_files_are_clear_errors(checkpoint, tmp_path_factory):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors is not a valid safetensors file"):
        GitForCausalLM.from_pretrained(checkpoint)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        GitForCausalLM.from_pretrained(checkpoint)
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        GitForCausalLM.from_pretrained(checkpoint)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GitForCausalLM.from_pretrained(empty)


def test_submodels_load_from_a_whole_checkpoint(checkpoint, reference):
    pixels = torch.randn(1, 3, 32, 32)
    vision = gitmodel.GitVisionModel.from_pretrained(checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(
            vision(pixels).last_hidden_state, reference.git.image_encoder(pixels).last_hidden_state, atol=2e-5, rtol=0
        )
    assert isinstance(gitmodel.GitModel.from_pretrained(checkpoint), gitmodel.GitModel)


def test_save_pretrained_round_trips_and_transformers_loads_it(checkpoint, tmp_path_factory):
    import transformers

    ours = GitForCausalLM.from_pretrained(checkpoint)
    saved = tmp_path_factory.mktemp("saved")
    ours.save_pretrained(saved)
    assert {p.name for p in saved.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json"}
    again = GitForCausalLM.from_pretrained(saved)
    assert torch.equal(logits(again), logits(ours))
    theirs = transformers.GitForCausalLM.from_pretrained(str(saved)).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor([[101, 7, 9], [101, 3, 4]]), pixel_values=pixels).logits
    torch.testing.assert_close(logits(ours), expected, atol=2e-5, rtol=0)


def test_submodels_save_what_transformers_loads_as_the_same_class(checkpoint, reference, tmp_path_factory):
    import transformers

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[101, 5, 6], [101, 7, 8]])
    vision_folder, git_folder = tmp_path_factory.mktemp("vision"), tmp_path_factory.mktemp("git")
    gitmodel.GitVisionModel.from_pretrained(checkpoint).save_pretrained(vision_folder)
    gitmodel.GitModel.from_pretrained(checkpoint).save_pretrained(git_folder)
    assert json.loads((vision_folder / "config.json").read_text())["architectures"] == ["GitVisionModel"]
    vision = transformers.GitVisionModel.from_pretrained(str(vision_folder)).eval()
    git = transformers.GitModel.from_pretrained(str(git_folder)).eval()
    with torch.no_grad():
        expected_vision = reference.git.image_encoder(pixels).last_hidden_state
        expected_git = reference.git(input_ids=ids, pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(vision(pixels).last_hidden_state, expected_vision, atol=2e-5, rtol=0)
        torch.testing.assert_close(git(input_ids=ids, pixel_values=pixels).last_hidden_state, expected_git, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_saved_config_names_the_dtype_of_the_saved_weights(checkpoint, tmp_path_factory, dtype):
    import transformers

    config = json.loads((checkpoint / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")  # as transformers 4 wrote it (the hub's files)
    (checkpoint / "config.json").write_text(json.dumps(config))
    saved = tmp_path_factory.mktemp("cast")
    GitForCausalLM.from_pretrained(checkpoint, dtype=dtype).save_pretrained(saved)
    written = json.loads((saved / "config.json").read_text())
    assert written["dtype"] == str(dtype).removeprefix("torch.") and "torch_dtype" not in written
    assert {t.dtype for t in load_file(saved / "model.safetensors").values()} == {dtype}
    assert transformers.GitForCausalLM.from_pretrained(str(saved)).dtype == dtype


def test_hub_style_config_with_only_non_default_vision_fields(tmp_path):
    config = gitmodel.GitConfig.from_dict({"model_type": "git", "vision_config": {"model_type": "git_vision_model", "dropout": 0.0}})
    assert config.vision_config.hidden_size == 768 and config.vision_config.patch_size == 16
    assert config.num_image_tokens == 197
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vision_config"]["dropout"] == 0.0  # unknown hub fields survive a round trip
    assert saved["model_type"] == "git" and saved["architectures"] == ["GitForCausalLM"]


def test_dtype_and_device_on_load(checkpoint):
    model = GitForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16 and not model.training


def test_loading_from_s3_equals_loading_locally(checkpoint, s3_server, s3_bucket):
    fs = s3_server.filesystem()
    fs.put(str(checkpoint) + "/", f"{s3_bucket}/models/tiny/", recursive=True)
    remote = GitForCausalLM.from_pretrained(f"s3://{s3_bucket}/models/tiny", storage_options=s3_server.storage_options)
    assert torch.equal(logits(remote), logits(GitForCausalLM.from_pretrained(checkpoint)))
    # And writing back to object storage gives the same model again.
    remote.save_pretrained(f"s3://{s3_bucket}/models/copy", storage_options=s3_server.storage_options)
    copy = GitForCausalLM.from_pretrained(f"s3://{s3_bucket}/models/copy", storage_options=s3_server.storage_options)
    assert torch.equal(logits(copy), logits(remote))


def test_file_urls_work(checkpoint, tmp_path_factory):
    target = tmp_path_factory.mktemp("copy") / "model"
    shutil.copytree(checkpoint, target)
    model = GitForCausalLM.from_pretrained(f"file://{target}")
    assert torch.equal(logits(model), logits(GitForCausalLM.from_pretrained(checkpoint)))
