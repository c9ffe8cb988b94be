"""The captioning actor's own logic, checked against transformers' generate on a tiny random model:
which caption is the best, how many tokens it counts, how it meets an out-of-memory error and a
processor whose crops vary in size."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.captioner import Captioner, CaptionerConfig
from tests.tiny_checkpoint import EOS, save_tiny_checkpoint
from tests.tiny_processor import TINY_VOCAB, save_tiny_processor

BEAMS = {"max_new_tokens": 10, "num_beams": 4, "length_penalty": 0.3}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    """A model whose beams and samples finish at different lengths (EOS is likely, not certain)."""
    path = tmp_path_factory.mktemp("captioner-model")
    save_tiny_checkpoint(path, seed=3, eos_bias=6.0, vocab_size=len(TINY_VOCAB))
    save_tiny_processor(path, image_size=32)
    return str(path)


@pytest.fixture(scope="module")
def reference(model_folder):
    import transformers

    return transformers.GitForCausalLM.from_pretrained(model_folder).eval()


def crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def reference_generate(captioner: Captioner, reference, images: np.ndarray, **settings) -> torch.Tensor:
    pixel_values = captioner.processor.image_processor.normalize(images)
    return reference.generate(pixel_values=pixel_values, **settings)


def test_beam_captions_keep_transformers_ranking_whatever_num_return_sequences(model_folder, reference):
    images, keys = crops(8), [f"k{i}" for i in range(8)]
    four = Captioner(CaptionerConfig(model_folder, generate_kwargs={**BEAMS, "num_return_sequences": 4}))
    one = Captioner(CaptionerConfig(model_folder, generate_kwargs=BEAMS))
    expected = reference_generate(four, reference, images, num_return_sequences=4, **BEAMS)
    expected_texts = [t.strip() for t in four.processor.batch_decode(expected[:, 1:], skip_special_tokens=True)]

    texts, scores = four.caption(images, keys)
    assert [t for per_image in texts for t in per_image] == expected_texts
    best, _ = one.caption(images, keys)
    assert [b[0] for b in best] == [t[0] for t in texts]
    # The ranking is by summed log-prob over length ** 0.3; scores are mean log-probs, which it need not follow.
    assert any(s != sorted(s, reverse=True) for s in scores), "some image should rank beams against their mean"


def test_samples_go_best_score_first(model_folder):
    sampling = {"max_new_tokens": 10, "do_sample": True, "num_return_sequences": 3}
    captioner = Captioner(CaptionerConfig(model_folder, generate_kwargs=sampling))
    _, scores = captioner.caption(crops(6, seed=1), [f"k{i}" for i in range(6)])
    assert all(s == sorted(s, reverse=True) for s in scores)


@pytest.mark.parametrize("settings", [BEAMS, {"max_new_tokens": 10}])
def test_tokens_are_counted_up_to_each_rows_first_eos(model_folder, reference, settings):
    captioner = Captioner(CaptionerConfig(model_folder, generate_kwargs=settings))
    images = crops(8, seed=2)
    captioner.caption(images, [f"k{i}" for i in range(8)])
    rows = reference_generate(captioner, reference, images, **settings)[:, 1:].tolist()
    lengths = [row.index(EOS) + 1 if EOS in row else len(row) for row in rows]
    assert any(length < len(rows[0]) for length in lengths), "some row should stop early, leaving filler"
    assert captioner.tokens_generated == sum(lengths)


def test_out_of_memory_is_recognised_where_torch_has_no_top_level_name(model_folder, monkeypatch):
    """torch 2.4 (allowed by pyproject) names the error torch.cuda.OutOfMemoryError only."""
    captioner = Captioner(CaptionerConfig(model_folder, generate_kwargs={"max_new_tokens": 3}))
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    real = Captioner.caption

    def small_device(self, images, keys):
        if len(keys) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, images, keys)

    monkeypatch.setattr(Captioner, "caption", small_device)
    results = captioner._caption_or_split(crops(5), [f"k{i}" for i in range(5)])
    assert captioner.images_that_fit == 2 and all(error is None for _, _, error in results)


def _edited_copy(model_folder: str, path, name: str, **settings) -> str:
    folder = shutil.copytree(model_folder, path)
    config_file = folder / name
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **settings}))
    return str(folder)


def test_a_processor_whose_crops_vary_in_size_is_a_clear_error(model_folder, tmp_path):
    folder = _edited_copy(model_folder, tmp_path / "model", "preprocessor_config.json", do_center_crop=False)
    with pytest.raises(ValueError, match="crops of varying sizes .*do_center_crop"):
        Captioner(CaptionerConfig(folder))


def test_a_generation_setting_gitmodel_does_not_implement_stops_the_actor_at_start(model_folder, tmp_path):
    folder = _edited_copy(model_folder, tmp_path / "model", "generation_config.json", bad_words_ids=[[7]])
    with pytest.raises(ValueError, match="bad_words_ids"):
        Captioner(CaptionerConfig(folder))
