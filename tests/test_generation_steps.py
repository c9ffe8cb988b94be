"""Generation steps are captured as CUDA graphs on a GPU; what that needs, checked on the CPU.

A capture runs the step once eagerly (warm-up) and then once more as the graph's first replay, so a
step that ran twice must leave exactly what it leaves after running once.
"""

from __future__ import annotations

import pytest
import torch

import gitmodel
from gitmodel.generation import _GreedyState, _greedy_step, _LogitsRules, _row_seeds, _Sampler, prefill
from tests.tiny_checkpoint import EOS, tiny_reference_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_reference_model(seed=1, eos_bias=6.0).save_pretrained(str(path))
    return gitmodel.GitForCausalLM.from_pretrained(path)


RULES = dict(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=2)


@pytest.mark.parametrize("rules", [{}, RULES], ids=["plain", "logits-rules"])
@pytest.mark.parametrize("sampling", [False, True])
def test_greedy_and_sampling_steps_can_run_twice(model, sampling, rules):
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    seeds = [1, 2, 3, 4, 5, 6]
    kwargs = dict(do_sample=True, top_k=20, seed=seeds) if sampling else {}
    expected = model.generate(pixels, max_new_tokens=10, **kwargs, **rules)
    assert (expected[:, 1:] == EOS).any(), "some rows should finish early, so finished rows are exercised"

    bos = torch.full((6, 1), model.config.bos_token_id)
    with torch.inference_mode():
        prompt = prefill(model, pixels, bos, torch.ones_like(bos), 1, 10)
        sampler = None
        if sampling:
            sampler = _Sampler(_row_seeds(seeds, 6, 1, pixels.device), 1.0, 20, 1.0)
        logits_rules = _LogitsRules(rules.get("repetition_penalty", 1.0), rules.get("no_repeat_ngram_size", 0), 0,
                                    rules.get("min_new_tokens", 0), (EOS,))
        state = _GreedyState(prompt, 10)
        state.begin(prompt, sampler.seeds if sampler else None)
        for step in range(10):
            for _ in range(2):
                _greedy_step(model, prompt, state, step, sampler, logits_rules)
        sequences, _ = state.finish(prompt.ids, model.config.pad_token_id)
    assert torch.equal(sequences, expected)
