"""gitmodel against transformers' GitForCausalLM on tiny random checkpoints in the official layout."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import gitmodel
from tests.tiny_checkpoint import EOS, tiny_reference_model

ATOL = 2e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(reference, ours) for a checkpoint whose rows hit EOS at different steps."""
    path = tmp_path_factory.mktemp("tiny")
    reference = tiny_reference_model(seed=1, eos_bias=6.0)
    reference.save_pretrained(str(path))
    return reference, gitmodel.GitForCausalLM.from_pretrained(path)


def images(batch: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def left_padded_prompts():
    ids = torch.tensor([[101, 5, 6, 7], [0, 101, 8, 9], [0, 0, 101, 10], [0, 0, 0, 101]])
    return ids, (ids != 0).long()


def test_vision_tower_hidden_states_match(pair, tmp_path):
    reference, ours = pair
    vision = gitmodel.GitVisionModel.from_pretrained(_saved(reference, tmp_path))
    pixels = images(2)
    with torch.no_grad():
        expected = reference.git.image_encoder(pixels).last_hidden_state
    got = vision(pixels).last_hidden_state
    assert got.shape == expected.shape == (2, 17, 32)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_git_model_hidden_states_match_with_left_padding(pair, tmp_path):
    reference, _ = pair
    model = gitmodel.GitModel.from_pretrained(_saved(reference, tmp_path))
    ids, mask = left_padded_prompts()
    pixels = images(4)
    with torch.no_grad():
        expected = reference.git(input_ids=ids, attention_mask=mask, pixel_values=pixels).last_hidden_state
        got = model(ids, mask, pixels).last_hidden_state
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_logits_and_loss_match(pair):
    reference, ours = pair
    ids, mask = left_padded_prompts()
    labels = ids.masked_fill(mask == 0, -100)
    pixels = images(4, seed=3)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        got = ours(ids, mask, pixels, labels=labels)
    assert got.logits.shape == expected.logits.shape == (4, 17 + 4, 128)
    torch.testing.assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)


def test_text_only_forward_matches(pair):
    reference, ours = pair
    ids = torch.tensor([[101, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_more_texts_than_images_tile_the_images_as_transformers_does(pair):
    reference, ours = pair
    ids = torch.tensor([[101, 5, 6], [101, 7, 8], [101, 9, 10], [101, 11, 12]])
    pixels = images(2, seed=13)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(ours(ids, pixel_values=pixels).logits, expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="3 texts for 2 images"):
        ours(ids[:3], pixel_values=pixels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_including_early_eos(pair, seed):
    reference, ours = pair
    pixels = images(8, seed=seed)
    expected = reference.generate(pixel_values=pixels, max_new_tokens=12)
    got = ours.generate(pixels, max_new_tokens=12)
    assert torch.equal(got, expected)
    if seed == 0:  # the fixture is built so that rows stop at different steps: pins padding after EOS
        stops = [(row == EOS).nonzero()[0, 0].item() for row in got if (row == EOS).any()]
        assert len(set(stops)) > 1 and len(stops) < len(got) or len(set(stops)) > 2


def test_default_length_is_transformers_default(tmp_path):
    reference = tiny_reference_model(seed=3)
    ours = gitmodel.GitForCausalLM.from_pretrained(_saved(reference, tmp_path))
    pixels = images(2, seed=4)
    got = ours.generate(pixels)
    assert got.shape == (2, 21)  # no EOS in sight: 20 new tokens after [CLS]
    assert torch.equal(got, reference.generate(pixel_values=pixels))


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=3),
        dict(num_beams=3, num_return_sequences=3),
        dict(num_beams=4, length_penalty=0.6),
        dict(num_beams=2, early_stopping=True),
        dict(num_beams=3, early_stopping="never", length_penalty=1.5),
    ],
)
def test_beam_search_matches(pair, settings):
    reference, ours = pair
    pixels = images(5, seed=7)
    expected = reference.generate(pixel_values=pixels, max_new_tokens=10, **settings)
    got = ours.generate(pixels, max_new_tokens=10, **settings)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_left_padded_prompts_match(pair, num_beams):
    reference, ours = pair
    ids, mask = left_padded_prompts()
    pixels = images(4, seed=5)
    expected = reference.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=num_beams)
    got = ours.generate(pixels, ids, mask, max_new_tokens=8, num_beams=num_beams)
    assert torch.equal(got, expected)


def test_scores_are_mean_token_log_probs(pair):
    _, ours = pair
    pixels = images(4, seed=8)
    for settings in (dict(), dict(num_beams=3, length_penalty=0.6)):
        out = ours.generate(pixels, max_new_tokens=10, return_dict=True, **settings)
        for row, sequence in enumerate(out.sequences):
            generated = sequence[1:]
            stop = (generated == EOS).nonzero()
            length = int(stop[0, 0]) + 1 if len(stop) else len(generated)
            ids = sequence[: 1 + length][None]
            with torch.no_grad():
                logits = ours(ids, pixel_values=pixels[row : row + 1]).logits[0, -ids.shape[1] :]
            logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
            assert out.scores[row].item() == pytest.approx(logprobs.mean().item(), abs=1e-4)


def test_video_checkpoint_with_hub_temperal_spelling(tmp_path):
    reference = tiny_reference_model(seed=2, frames=3)
    reference.save_pretrained(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    renamed = {k.replace("img_temporal_embedding", "img_temperal_embedding"): v for k, v in state.items()}
    assert renamed != state
    save_file(renamed, weights, metadata={"format": "pt"})

    ours = gitmodel.GitForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(ours.git.img_temporal_embedding[1], reference.git.img_temporal_embedding[1])
    video = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    ids = torch.tensor([[101, 7], [101, 9]])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, pixel_values=video).logits, reference(input_ids=ids, pixel_values=video).logits, atol=ATOL, rtol=0
        )
    assert torch.equal(ours.generate(video, max_new_tokens=6), reference.generate(pixel_values=video, max_new_tokens=6))


def test_sampling_is_reproducible_and_per_row(pair):
    _, ours = pair
    pixels = images(4, seed=10)
    kwargs = dict(do_sample=True, max_new_tokens=10, top_k=20, top_p=0.9, temperature=1.3, num_return_sequences=3)
    first = ours.generate(pixels, seed=[11, 12, 13, 14], **kwargs)
    again = ours.generate(pixels, seed=[11, 12, 13, 14], **kwargs)
    assert torch.equal(first, again)
    assert first.shape[0] == 12
    # A row's samples depend on its own seed only, not on the batch it shares.
    alone = ours.generate(pixels[2:3], seed=[13], **kwargs)
    assert torch.equal(alone, first[6:9, : alone.shape[1]])
    other = ours.generate(pixels, seed=[21, 22, 23, 24], **kwargs)
    assert not torch.equal(first, other)
    # The three samples of one image differ from each other (beam-free diversity).
    assert len({tuple(row.tolist()) for row in first[:3]}) > 1


def test_invalid_generation_settings_are_clear_errors(pair):
    _, ours = pair
    pixels = images(1)
    with pytest.raises(ValueError, match="num_return_sequences"):
        ours.generate(pixels, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="greedy"):
        ours.generate(pixels, num_return_sequences=2)
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(pixels, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="32x32"):
        ours.generate(images(1, size=48))
    with pytest.raises(ValueError, match="needs 65 text positions, but this model has 64"):
        ours.generate(pixels, max_new_tokens=64, input_ids=torch.tensor([[101, 5]]))
    assert ours.generate(pixels, max_new_tokens=63, input_ids=torch.tensor([[101, 5]]), eos_token_id=[]).shape == (1, 65)


def test_bfloat16_generation_runs_and_mostly_agrees(pair, tmp_path):
    reference, ours = pair
    low = gitmodel.GitForCausalLM.from_pretrained(_saved(reference, tmp_path), dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    pixels = images(4, seed=12)
    got = low.generate(pixels, max_new_tokens=5)
    expected = ours.generate(pixels, max_new_tokens=5)
    assert got.shape[0] == 4
    assert (got[:, :2] == expected[:, :2]).float().mean() >= 0.75


def _saved(reference, path):
    reference.save_pretrained(str(path))
    return path


def test_model_prepared_for_inference_still_matches(pair, tmp_path):
    """Fused q/k/v and, on a CPU, input-major weights: other kernels, the same tokens, the same checkpoint."""
    reference, _ = pair
    prepared = gitmodel.GitForCausalLM.from_pretrained(_saved(reference, tmp_path / "in")).prepare_for_inference()
    assert not prepared.output.weight.is_contiguous()  # laid out for the CPU's small-batch GEMMs
    pixels = images(5, seed=30)
    for settings in (dict(), dict(num_beams=3)):
        expected = reference.generate(pixel_values=pixels, max_new_tokens=8, **settings)
        assert torch.equal(prepared.generate(pixels, max_new_tokens=8, **settings), expected)
    ids, mask = left_padded_prompts()
    expected = reference.generate(pixel_values=images(4, seed=31), input_ids=ids, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(prepared.generate(images(4, seed=31), ids, mask, max_new_tokens=6), expected)
    assert torch.equal(prepared.to(torch.float64).to(torch.float32).generate(pixels, max_new_tokens=8),
                       reference.generate(pixel_values=pixels, max_new_tokens=8))  # fused copies move along
    prepared.save_pretrained(tmp_path / "out")
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == load_file(tmp_path / "in" / "model.safetensors").keys()
    for name, saved in load_file(tmp_path / "out" / "model.safetensors").items():
        assert torch.equal(saved, reference.state_dict()[name]), name


def test_compiled_model_matches_transformers(pair, tmp_path):
    """`compile=True` (torch.compile of the vision tower and the decoder's dense parts): the same tokens.
    On a GPU it runs inside the CUDA graphs too (tests/test_gpu.py); here it checks that every compiled
    part traces and computes what the eager one does."""
    reference, _ = pair
    compiled = gitmodel.GitForCausalLM.from_pretrained(_saved(reference, tmp_path)).prepare_for_inference(compile=True)
    for seed in (40, 41):  # the second call reuses the compiled code
        pixels = images(6, seed=seed)
        expected = reference.generate(pixel_values=pixels, max_new_tokens=8)
        assert torch.equal(compiled.generate(pixels, max_new_tokens=8), expected)
