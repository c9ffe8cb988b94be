"""The GPU paths (CUDA graphs, fused projections, torch.compile) against transformers and the eager path.

Skipped where there is no GPU (CI); run on a GPU machine with `python -m pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

import gitmodel
from tests.tiny_checkpoint import tiny_reference_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    reference = tiny_reference_model(seed=1, eos_bias=6.0)
    reference.save_pretrained(str(path))
    eager = gitmodel.GitForCausalLM.from_pretrained(path, device="cuda")
    graphed = gitmodel.GitForCausalLM.from_pretrained(path, device="cuda").prepare_for_inference()
    return reference.cuda(), eager, graphed


def pixels(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize("settings", [dict(), dict(num_beams=3), dict(num_beams=3, num_return_sequences=2)])
def test_graphed_generation_matches_transformers_on_gpu(models, settings):
    reference, eager, graphed = models
    for seed in range(3):  # the second and third calls replay graphs captured by the first
        images = pixels(8, seed)
        expected = reference.generate(pixel_values=images, max_new_tokens=12, **settings)
        assert torch.equal(eager.generate(images, max_new_tokens=12, **settings), expected)
        assert torch.equal(graphed.generate(images, max_new_tokens=12, **settings), expected)


def test_graphed_left_padded_prompts_match(models):
    reference, _, graphed = models
    ids = torch.tensor([[101, 5, 6, 7], [0, 101, 8, 9], [0, 0, 101, 10], [0, 0, 0, 101]]).cuda()
    mask = (ids != 0).long()
    for seed in range(2):
        images = pixels(4, seed)
        expected = reference.generate(pixel_values=images, input_ids=ids, attention_mask=mask, max_new_tokens=8)
        assert torch.equal(graphed.generate(images, ids, mask, max_new_tokens=8), expected)


def test_graphed_sampling_equals_eager_sampling(models):
    _, eager, graphed = models
    images = pixels(4, 5)
    kwargs = dict(do_sample=True, top_k=20, num_return_sequences=2, max_new_tokens=10, seed=[1, 2, 3, 4])
    assert torch.equal(graphed.generate(images, **kwargs), eager.generate(images, **kwargs))


def test_graphed_steps_hold_the_logits_processors(models):
    """Greedy and sampling steps are whole CUDA graphs: repetition_penalty, no_repeat_ngram_size and
    min_new_tokens run inside them, and calls of one shape with and without them keep apart graphs."""
    reference, eager, graphed = models
    rules = dict(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=3)
    for seed, settings in [(30, rules), (31, {}), (32, rules)]:
        images = pixels(8, seed)
        expected = reference.generate(pixel_values=images, max_new_tokens=12, **settings)
        assert torch.equal(graphed.generate(images, max_new_tokens=12, **settings), expected)
    ids = torch.tensor([[101, 5, 6, 7], [0, 101, 8, 9], [0, 0, 101, 10], [0, 0, 0, 101]]).cuda()
    mask = (ids != 0).long()
    expected = reference.generate(pixel_values=pixels(4, 33), input_ids=ids, attention_mask=mask, max_new_tokens=8, **rules)
    assert torch.equal(graphed.generate(pixels(4, 33), ids, mask, max_new_tokens=8, **rules), expected)
    sampling = dict(do_sample=True, top_k=20, max_new_tokens=10, seed=[1, 2, 3, 4], **rules)
    assert torch.equal(graphed.generate(pixels(4, 34), **sampling), eager.generate(pixels(4, 34), **sampling))


def test_git_base_shape_logits_match_transformers_in_fp32(tmp_path):
    import transformers

    torch.manual_seed(0)
    reference = transformers.GitForCausalLM(transformers.GitConfig()).eval()
    reference.save_pretrained(str(tmp_path))
    ours = gitmodel.GitForCausalLM.from_pretrained(tmp_path, device="cuda").prepare_for_inference()
    reference = reference.cuda()
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        expected = reference.generate(pixel_values=images, max_new_tokens=20)
    got = ours.generate(images, max_new_tokens=20)
    ids = torch.full((4, 1), 101, device="cuda")
    with torch.no_grad():
        diff = (ours(ids, pixel_values=images).logits - reference(input_ids=ids, pixel_values=images).logits).abs().max()
    assert diff < 1e-3, f"max |logit difference| {diff:.2e}"
    assert torch.equal(got, expected)


def test_graphs_survive_alternating_batch_shapes(models):
    """A pipeline sends full batches and a smaller last one: both shapes keep their graphs."""
    _, eager, graphed = models
    for batch, seed in [(8, 20), (5, 21), (8, 22), (5, 23)]:
        images = pixels(batch, seed)
        assert torch.equal(graphed.generate(images, max_new_tokens=12), eager.generate(images, max_new_tokens=12))
