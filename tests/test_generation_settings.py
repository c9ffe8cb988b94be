"""Generation settings beyond the search itself: transformers' cheap logits processors give its tokens,
from generate's arguments and from generation_config.json alike; the settings gitmodel does not
implement are refused by name, never ignored."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import gitmodel
from tests.tiny_checkpoint import tiny_reference_model

PROCESSORS = [
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=0.7),
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=1),
    dict(min_new_tokens=6),
    dict(min_length=8),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=3),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A checkpoint whose greedy captions repeat tokens and stop at different steps."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_reference_model(seed=1, eos_bias=6.0).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def pair(folder):
    import transformers

    reference = transformers.GitForCausalLM.from_pretrained(str(folder)).eval()
    return reference, gitmodel.GitForCausalLM.from_pretrained(folder)


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("search", [dict(), dict(num_beams=3, num_return_sequences=2, length_penalty=0.6)],
                         ids=["greedy", "beams"])
@pytest.mark.parametrize("settings", PROCESSORS)
def test_logits_processors_give_transformers_tokens(pair, settings, search):
    reference, ours = pair
    pixels = images(4, seed=8)
    expected = reference.generate(pixel_values=pixels, max_new_tokens=10, **settings, **search)
    assert torch.equal(ours.generate(pixels, max_new_tokens=10, **settings, **search), expected)
    assert not torch.equal(ours.generate(pixels, max_new_tokens=10, **search), expected), "the setting should matter"


@pytest.mark.parametrize("num_beams", [1, 3])
def test_logits_processors_see_the_prompt_but_not_its_left_padding(pair, num_beams):
    reference, ours = pair
    ids = torch.tensor([[101, 7, 7, 98], [0, 101, 32, 63], [0, 0, 101, 7], [0, 0, 0, 101]])
    mask = (ids != 0).long()
    pixels = images(4, seed=6)
    # A penalty below 1 favours tokens already seen: were the padding counted, [PAD] would be chosen.
    settings = dict(repetition_penalty=0.2, no_repeat_ngram_size=2, min_length=7, max_new_tokens=8, num_beams=num_beams)
    expected = reference.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(ours.generate(pixels, ids, mask, **settings), expected)


def test_generation_config_json_settings_give_transformers_tokens_and_survive_saving(folder, tmp_path):
    import transformers

    shutil.copytree(folder, tmp_path / "in")
    config = json.loads((tmp_path / "in" / "generation_config.json").read_text())
    config.update(repetition_penalty=1.5, no_repeat_ngram_size=3, min_new_tokens=4, max_new_tokens=10)
    (tmp_path / "in" / "generation_config.json").write_text(json.dumps(config))
    pixels = images(4, seed=7)
    expected = transformers.GitForCausalLM.from_pretrained(str(tmp_path / "in")).eval().generate(pixel_values=pixels)
    ours = gitmodel.GitForCausalLM.from_pretrained(tmp_path / "in")
    assert torch.equal(ours.generate(pixels), expected)
    prepared = gitmodel.GitForCausalLM.from_pretrained(tmp_path / "in").prepare_for_inference()
    assert torch.equal(prepared.generate(pixels), expected)
    ours.save_pretrained(tmp_path / "out")
    reloaded = transformers.GitForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert torch.equal(reloaded.generate(pixel_values=pixels), expected)


def _with_generation_config(folder, path, **settings):
    shutil.copytree(folder, path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, **settings}))
    return gitmodel.GitForCausalLM.from_pretrained(path)


@pytest.mark.parametrize(
    "settings,key",
    [
        (dict(bad_words_ids=[[7]]), "bad_words_ids"),
        (dict(suppress_tokens=[7]), "suppress_tokens"),
        (dict(forced_eos_token_id=102), "forced_eos_token_id"),
        (dict(encoder_repetition_penalty=1.2), "encoder_repetition_penalty"),
    ],
)
def test_settings_gitmodel_does_not_implement_are_refused_by_name(folder, tmp_path, settings, key):
    model = _with_generation_config(folder, tmp_path / "model", **settings)
    with pytest.raises(ValueError, match=rf"sets {key}=.*does not implement"):
        model.generate(images(1, seed=0), max_new_tokens=3)


def test_sampling_warpers_are_refused_only_when_sampling(folder, tmp_path):
    model = _with_generation_config(folder, tmp_path / "model", typical_p=0.9)
    assert model.generate(images(1, seed=0), max_new_tokens=3).shape[0] == 1  # transformers' greedy ignores it too
    with pytest.raises(ValueError, match="typical_p=0.9"):
        model.generate(images(1, seed=0), max_new_tokens=3, do_sample=True)


def test_unsupported_settings_at_their_off_values_are_fine(folder, tmp_path):
    """transformers 4 wrote whole generation configs, every setting at its default."""
    off = dict(bad_words_ids=None, diversity_penalty=0.0, num_beam_groups=1, typical_p=1.0, remove_invalid_values=False,
               encoder_no_repeat_ngram_size=0, repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0)
    model = _with_generation_config(folder, tmp_path / "model", **off)
    assert model.generate(images(1, seed=0), max_new_tokens=3, do_sample=True, seed=1).shape[0] == 1


def test_invalid_processor_settings_are_clear_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        ours.generate(images(1, seed=0), repetition_penalty=0.0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        ours.generate(images(1, seed=0), no_repeat_ngram_size=-1)
