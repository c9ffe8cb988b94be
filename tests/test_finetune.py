"""Fine-tuning: pairs from every input format, GIT's loss recipe, checkpoints in the official layout,
exact resume, fresh and pretrained starting points, and the `gitcap finetune` command."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gitmodel import GitConfig, GitForCausalLM, GitProcessor, GitVisionConfig, bundled_model_path
from gitmodel.training import (
    IGNORE_INDEX,
    CaptionDataset,
    Trainer,
    TrainingArguments,
    batch_indices,
    fresh_model,
    latest_checkpoint,
    learning_rate_factor,
    sincos_positions,
)
from jobs.cli import main
from jobs.finetune import held_out, read_pairs, starting_point, train_tokenizer
from pipeline.scenes import make_scene, write_scenes

OFFICIAL_FILES = {
    "config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.txt",
}
SCENES = 24


def tiny_config(dropout: float = 0.1) -> GitConfig:
    vision = GitVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    return GitConfig(
        vision_config=vision, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    """The same 24 scenes (32x32) in every input format."""
    root = tmp_path_factory.mktemp("scenes")
    for format in ("webdataset", "parquet", "images"):
        write_scenes(str(root / format), count=SCENES, seed=5, format=format, shard_size=10, size=(32, 32))
    return root


@pytest.fixture(scope="module")
def tiny_parts(scenes_dir):
    """A fresh tiny model with a WordPiece tokenizer trained on the scene captions, and its datasets."""
    pairs = list(read_pairs(str(scenes_dir / "webdataset"), "webdataset"))
    model, processor = starting_point(config=tiny_config(), captions=[p.caption for p in pairs], vocab_size=80)
    data = CaptionDataset.build(processor, ((p.image, p.caption) for p in pairs))
    return model, processor, data


def args_for(path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(path), max_steps=8, batch_size=6, learning_rate=3e-3, warmup_steps=2,
        eval_every=4, save_every=4, eval_batch_size=12, progress=False,
    )
    return TrainingArguments(**{**values, **overrides})


# --- data ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("format", ["webdataset", "parquet", "images"])
def test_read_pairs_finds_each_formats_captions(scenes_dir, format):
    pairs = list(read_pairs(str(scenes_dir / format), format))
    truth = {make_scene(5, i, size=(32, 32)).caption for i in range(SCENES)}
    assert len(pairs) == SCENES
    assert {p.caption for p in pairs} == truth
    assert all(p.image[:2] == b"\xff\xd8" for p in pairs)  # JPEG bytes, not decoded yet


def test_held_out_split_is_a_fixed_function_of_the_key():
    keys = [f"shard/{i:06d}" for i in range(2000)]
    chosen = [k for k in keys if held_out(k, 0.1)]
    assert chosen == [k for k in keys if held_out(k, 0.1)]
    assert 150 < len(chosen) < 250
    assert set(chosen) <= {k for k in keys if held_out(k, 0.2)}


def test_batch_labels_are_the_input_ids_with_padding_ignored(tiny_parts):
    _, processor, data = tiny_parts
    lengths = [len(row) for row in data.token_ids]
    short, long = lengths.index(min(lengths)), lengths.index(max(lengths))
    assert min(lengths) < max(lengths)
    batch = data.batch([short, long], processor)
    tokenizer = processor.tokenizer
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"][:, 0].tolist() == [tokenizer.cls_token_id] * 2
    assert batch["input_ids"][0, min(lengths) - 1] == tokenizer.sep_token_id  # [CLS] caption [SEP], right-padded
    padded = batch["attention_mask"] == 0
    assert padded[0].sum() == max(lengths) - min(lengths) and not padded[1].any()
    assert (batch["labels"][padded] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][~padded], batch["input_ids"][~padded])
    # The model's loss is then over real caption tokens only: padding changes nothing.
    model = tiny_parts[0].eval()
    alone = data.batch([short], processor)
    with torch.no_grad():
        padded_logits = model(**batch).logits[0, : -(max(lengths) - min(lengths))]
        assert torch.allclose(padded_logits, model(**alone).logits[0], atol=1e-5)


def test_batches_depend_on_seed_and_step_only():
    assert batch_indices(10, 4, seed=0, step=2) == batch_indices(10, 4, seed=0, step=2)
    epoch = [i for step in range(5) for i in batch_indices(10, 4, seed=0, step=step)]
    assert sorted(epoch[:10]) == list(range(10)) and sorted(epoch[10:20]) == list(range(10))
    assert epoch[:10] != epoch[10:20]  # a new order each epoch
    assert batch_indices(10, 4, seed=1, step=0) != batch_indices(10, 4, seed=0, step=0)


def test_learning_rate_warms_up_then_decays_to_zero():
    args = TrainingArguments(output_dir="unused", max_steps=10, warmup_steps=2)
    factors = [learning_rate_factor(step, args) for step in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:])) and factors[-1] < 0.05
    linear = TrainingArguments(output_dir="unused", max_steps=10, lr_schedule="linear")
    assert learning_rate_factor(5, linear) == pytest.approx(0.5)


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("format", ["webdataset", "parquet", "images"])
def test_finetune_from_each_format_lowers_the_loss_and_writes_the_official_layout(scenes_dir, tmp_path, format):
    from jobs.finetune import finetune

    args = args_for(tmp_path / "out", max_steps=40, eval_every=20, save_every=20, learning_rate=5e-3)
    metrics = finetune(
        str(scenes_dir / format), args, format=format, eval_fraction=0.25, config=tiny_config(0.0), vocab_size=80,
        log=lambda *_: None,
    )
    state = json.loads((tmp_path / "out" / "checkpoint-40" / "trainer_state.json").read_text())
    first, last = state["log"][0], state["log"][-1]
    assert (first["step"], last["step"]) == (20, 40)
    assert last["eval_loss"] < first["eval_loss"] < 3.0  # from ln(vocab) ~ 4.3 at the start
    assert 0 < metrics["eval_examples"] < SCENES and metrics["token_accuracy"] > 0.3
    assert OFFICIAL_FILES <= set(os.listdir(tmp_path / "out"))
    assert sorted(p for p in os.listdir(tmp_path / "out") if p.startswith("checkpoint-")) == [
        "checkpoint-20", "checkpoint-40"
    ]


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_resume_continues_exactly_where_the_interrupted_run_stopped(tiny_parts, tmp_path, monkeypatch, device):
    config = tiny_config(dropout=0.1)  # dropout: the RNG state (the CUDA generators' on a GPU) must be restored too
    _, processor, data = tiny_parts
    fresh = lambda: starting_point(config=config, processor=processor, seed=3)[0].to(device)  # noqa: E731

    whole = Trainer(fresh(), processor, data, data, args_for(tmp_path / "whole"))
    whole.train()

    interrupted = Trainer(fresh(), processor, data, data, args_for(tmp_path / "resumed"))
    real_step = Trainer.train_step

    def stop_after_the_checkpoint(self):
        if self.step == 5:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", stop_after_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    monkeypatch.undo()
    assert latest_checkpoint(str(tmp_path / "resumed")).endswith("checkpoint-4")

    resumed = Trainer(fresh(), processor, data, data, args_for(tmp_path / "resumed"))
    steps_run = []
    monkeypatch.setattr(Trainer, "train_step", lambda self: steps_run.append(self.step) or real_step(self))
    resumed.train()
    assert steps_run == [4, 5, 6, 7]
    for (name, mine), theirs in zip(resumed.model.state_dict().items(), whole.model.state_dict().values()):
        # a GPU's backward may sum in another order (atomics); another dropout mask differs by far more
        assert torch.equal(mine, theirs) if device == "cpu" else torch.allclose(mine, theirs, atol=1e-6), name
    assert resumed.optimizer.state_dict()["state"][0]["step"] == whole.optimizer.state_dict()["state"][0]["step"] == 8
    mine, theirs = [e["eval_loss"] for e in resumed.log], [e["eval_loss"] for e in whole.log]
    assert mine == theirs if device == "cpu" else mine == pytest.approx(theirs, abs=1e-6)


def test_a_checkpoint_holds_the_cuda_rng_states_when_there_is_a_gpu(tiny_parts, tmp_path):
    # Without a GPU this checks only that the (empty) CUDA state is saved and restored without error;
    # that a GPU run resumes with the same dropout is the "cuda" case of the resume test above.
    _, processor, data = tiny_parts
    model = starting_point(config=tiny_config(), processor=processor, seed=3)[0]
    Trainer(model, processor, data, None, args_for(tmp_path, max_steps=2, eval_every=0)).train()
    saved = torch.load(tmp_path / "checkpoint-2" / "training_state.pt", weights_only=True)
    expected = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    assert [s.tolist() for s in saved["cuda_rng"]] == [s.tolist() for s in expected]
    resumed = Trainer(model, processor, data, None, args_for(tmp_path, max_steps=2, eval_every=0))
    assert resumed.train()["step"] == 2


def test_a_checkpoint_whose_save_was_cut_short_is_not_resumed_from(tiny_parts, tmp_path, monkeypatch):
    import io

    _, processor, data = tiny_parts
    fresh = lambda: starting_point(config=tiny_config(), processor=processor, seed=3)[0]  # noqa: E731
    real_save = torch.save

    def disk_full_halfway(obj, f):  # the training state of checkpoint-8 gets half written, then the disk is full
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError("No space left on device")

    trainer = Trainer(fresh(), processor, data, None, args_for(tmp_path, eval_every=0))
    real_checkpoint = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self: (
        self.step == 8 and monkeypatch.setattr(torch, "save", disk_full_halfway)) or real_checkpoint(self))
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    monkeypatch.undo()
    assert (tmp_path / "checkpoint-8").is_dir()
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-4")  # the newest complete one

    steps_run = []
    real_step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self: steps_run.append(self.step) or real_step(self))
    assert Trainer(fresh(), processor, data, None, args_for(tmp_path, eval_every=0)).train()["step"] == 8
    assert steps_run == [4, 5, 6, 7]
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-8")


def test_a_run_that_does_not_resume_replaces_the_earlier_runs_checkpoints(tiny_parts, tmp_path, capsys):
    _, processor, data = tiny_parts
    fresh = lambda: starting_point(config=tiny_config(), processor=processor, seed=3)[0]  # noqa: E731
    Trainer(fresh(), processor, data, None, args_for(tmp_path, save_every=2, eval_every=0)).train()
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-8")
    (tmp_path / "checkpoint-10").mkdir()  # a save of the earlier run that never finished goes too

    again = args_for(tmp_path, max_steps=4, save_every=2, eval_every=0, resume=False)
    Trainer(fresh(), processor, data, None, again).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert "deleted the 3 checkpoint folders of an earlier run" in capsys.readouterr().out
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-4")  # what a later resume continues


def _tokenizer_in_another_order(tokenizer):
    """The same tokens with other ids, as training a tokenizer again in another process can give."""
    from gitmodel import GitTokenizer
    from gitmodel.tokenization import bert_wordpiece

    vocab = tokenizer.backend_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    reordered = tokens[:5] + tokens[5:][::-1]  # the special tokens keep their ids
    vocab = {token: i for i, token in enumerate(reordered)}
    return GitTokenizer(bert_wordpiece(vocab), model_max_length=tokenizer.model_max_length)


def test_a_resumed_fresh_config_run_keeps_the_checkpoints_tokenizer(scenes_dir, tmp_path, monkeypatch):
    import jobs.finetune
    from jobs.finetune import finetune

    run = dict(config=tiny_config(0.0), vocab_size=80, eval_fraction=0.25, log=lambda *_: None)
    finetune(str(scenes_dir / "webdataset"), args_for(tmp_path, max_steps=2, save_every=2, eval_every=0), **run)
    saved = GitProcessor.from_pretrained(tmp_path / "checkpoint-2").tokenizer.backend_tokenizer.get_vocab()

    real_train_tokenizer = jobs.finetune.train_tokenizer
    retrained = lambda *a: _tokenizer_in_another_order(real_train_tokenizer(*a))  # noqa: E731
    monkeypatch.setattr(jobs.finetune, "train_tokenizer", retrained)
    finetune(str(scenes_dir / "webdataset"), args_for(tmp_path, max_steps=4, save_every=2, eval_every=0), **run)
    assert GitProcessor.from_pretrained(tmp_path).tokenizer.backend_tokenizer.get_vocab() == saved
    assert json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4


def test_resuming_with_another_tokenizer_than_the_checkpoints_is_refused(tiny_parts, tmp_path):
    _, processor, data = tiny_parts
    fresh = lambda: starting_point(config=tiny_config(), processor=processor, seed=3)[0]  # noqa: E731
    Trainer(fresh(), processor, data, None, args_for(tmp_path, max_steps=2, eval_every=0)).train()
    other = GitProcessor(processor.image_processor, _tokenizer_in_another_order(processor.tokenizer))
    with pytest.raises(ValueError, match="not the one saved in .*checkpoint-2"):
        Trainer(fresh(), other, data, None, args_for(tmp_path, max_steps=4, eval_every=0)).train()


def test_a_finished_run_is_not_trained_again(tiny_parts, tmp_path, monkeypatch):
    model, processor, data = tiny_parts
    model = starting_point(config=tiny_config(), processor=processor)[0]
    Trainer(model, processor, data, None, args_for(tmp_path, max_steps=4)).train()
    monkeypatch.setattr(Trainer, "train_step", lambda self: pytest.fail("trained again"))
    assert Trainer(model, processor, data, None, args_for(tmp_path, max_steps=4)).train()["step"] == 4


def test_output_loads_with_gitmodel_and_with_transformers(tiny_parts, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, processor, data = tiny_parts
    model = starting_point(config=tiny_config(), processor=processor)[0]
    Trainer(model, processor, data, None, args_for(tmp_path, max_steps=4)).train()

    images = [make_scene(9, i, size=(32, 32)).image for i in range(3)]
    captions = ["a small red star in the top left", "a large blue circle in the center", "a small cross"]
    ours = GitProcessor.from_pretrained(tmp_path)(images=images, text=captions)
    theirs = transformers.AutoProcessor.from_pretrained(str(tmp_path))(images=images, text=captions, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])

    mine = GitForCausalLM.from_pretrained(tmp_path)
    reference = transformers.GitForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        expected = reference(**{k: theirs[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        assert torch.allclose(mine(**ours).logits, expected, atol=1e-4)


def test_finetunes_a_checkpoint_that_transformers_wrote(scenes_dir, tmp_path):
    from jobs.finetune import finetune
    from tests.tiny_checkpoint import save_tiny_checkpoint
    from tests.tiny_processor import TINY_VOCAB, save_tiny_processor

    start = tmp_path / "start"
    save_tiny_checkpoint(start, vocab_size=len(TINY_VOCAB))
    save_tiny_processor(start)
    messages = []
    metrics = finetune(
        str(scenes_dir / "parquet"), args_for(tmp_path / "out", max_steps=12, eval_every=6, save_every=0),
        format="parquet", eval_fraction=0.25, model=str(start), log=messages.append,
    )
    log = json.loads((tmp_path / "out" / "checkpoint-12" / "trainer_state.json").read_text())["log"]
    assert log[-1]["eval_loss"] < log[0]["eval_loss"] and metrics["step"] == 12
    assert GitForCausalLM.from_pretrained(tmp_path / "out").config.vocab_size == len(TINY_VOCAB)
    assert any("training on" in m for m in messages)


def test_a_fresh_vision_tower_starts_with_sine_cosine_patch_positions():
    model = fresh_model(tiny_config(), seed=1)
    positions = model.git.image_encoder.vision_model.embeddings.position_embedding.weight
    assert torch.equal(positions[1:], sincos_positions(4, 32)) and not positions[0].any()
    # Row-major like the patch sequence: patches in one row share the row half of their channels.
    assert torch.equal(positions[1, :16], positions[4, :16]) and not torch.equal(positions[1, :16], positions[5, :16])
    assert torch.equal(positions[1, 16:], positions[5, 16:])
    assert torch.equal(fresh_model(tiny_config(), seed=1).output.weight, model.output.weight)


def test_a_tokenizer_trained_on_scene_captions_is_the_same_every_time_and_keeps_words_whole():
    from pipeline.scenes import generate_scenes, vocabulary

    captions = [s.caption for s in generate_scenes(200, seed=1)]
    first, second = train_tokenizer(captions, 256), train_tokenizer(captions, 256)
    assert first.backend_tokenizer.get_vocab() == second.backend_tokenizer.get_vocab()
    assert all(len(first.encode(word, add_special_tokens=False)) == 1 for word in vocabulary())
    assert [first.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    # Too small a vocabulary for whole words: every trained piece is kept, so captions stay short.
    small = train_tokenizer(captions, 80)
    assert len(small) == 80 and len(small.encode("a large yellow circle")) < len("alargeyellowcircle") + 2


def test_a_fresh_model_and_its_tokenizer_share_the_special_ids():
    model, processor = starting_point(config=tiny_config(), captions=["a red star", "a blue circle"], vocab_size=60)
    tokenizer = processor.tokenizer
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
    )
    assert model.generation_config.bos_token_id == tokenizer.cls_token_id
    with pytest.raises(ValueError, match="not both"):
        starting_point(model="somewhere", config=tiny_config())


def test_gitcap_finetune_trains_from_a_config(scenes_dir, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(0.0).to_dict()))
    out = tmp_path / "out"
    status = main([
        "finetune", str(scenes_dir / "images"), "--format", "images", "--out", str(out), "--config", str(config),
        "--vocab-size", "80", "--steps", "6", "--batch-size", "4", "--lr", "1e-3", "--eval-fraction", "0.25",
        "--eval-every", "3", "--save-every", "3",
    ])
    assert status == 0
    assert "wrote the model to" in capsys.readouterr().out
    assert OFFICIAL_FILES <= set(os.listdir(out))
    assert json.loads((out / "metrics.json").read_text())["step"] == 6


def test_the_bundled_recipe_runs_end_to_end_at_toy_scale(tmp_path):
    from jobs.finetune import BUNDLED_COMMAND, BundledRecipe, train_bundled

    recipe = BundledRecipe(
        train_scenes=24, eval_scenes=8, test_scenes=8, image_size=32, patch_size=8, vision_hidden=32,
        vision_layers=1, text_hidden=32, text_layers=1, heads=2, max_steps=3, batch_size=8, eval_every=3,
        save_every=3,
    )
    result = train_bundled(str(tmp_path / "model"), str(tmp_path / "work"), recipe, progress=False, log=lambda *_: None)
    assert result["test"]["eval_examples"] == 8 and result["validation"]["step"] == 3
    assert (OFFICIAL_FILES | {"README.md"}) <= set(os.listdir(tmp_path / "model"))
    card = (tmp_path / "model" / "README.md").read_text()
    assert BUNDLED_COMMAND in card and "exact match" in card
    assert GitForCausalLM.from_pretrained(tmp_path / "model").config.vision_config.image_size == 32
    # The same command gives the same model.
    train_bundled(str(tmp_path / "again"), str(tmp_path / "work-again"), recipe, progress=False, log=lambda *_: None)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "model" / "model.safetensors").read_bytes()


def test_finetuning_starts_from_the_bundled_model_by_default(scenes_dir, tmp_path):
    from jobs.finetune import finetune

    metrics = finetune(
        str(scenes_dir / "webdataset"), args_for(tmp_path, max_steps=2, learning_rate=1e-5, eval_every=0),
        eval_fraction=0.25, log=lambda *_: None,
    )
    tuned, bundled = GitForCausalLM.from_pretrained(tmp_path), GitForCausalLM.from_pretrained(bundled_model_path())
    assert tuned.config.to_dict() == bundled.config.to_dict() and metrics["exact_match"] > 0.5


def test_samples_without_a_caption_or_a_decodable_image_are_skipped_and_counted(tmp_path):
    import io
    import tarfile

    from jobs.finetune import PairStats, caption_dataset
    from pipeline.scenes import encode_image

    good = encode_image(make_scene(5, 0, size=(32, 32)).image)
    members = [
        ("a.jpg", good), ("a.txt", b"a red star"),
        ("b.jpg", good),  # no caption
        ("c.jpg", b"\xff\xd8\xff" + b"\x00" * 50), ("c.txt", b"a broken image"),
        ("d.jpg", good), ("d.json", b'{"caption": "from the json"}'),
    ]
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stats = PairStats()
    pairs = list(read_pairs(str(tmp_path), "webdataset", stats=stats))
    assert [p.caption for p in pairs] == ["a red star", "a broken image", "from the json"]
    processor = starting_point(config=tiny_config(), captions=["a red star"], vocab_size=40)[1]
    data = caption_dataset(processor, pairs, max_length=32, stats=stats)
    assert data.captions == ["a red star", "from the json"]
    assert stats.pairs == 2 and stats.skipped == {"no_caption": 1, "truncated": 1}
