"""The bundled scene captioner: CI's quality gate on scenes it never saw, its size and card, and
that transformers loads it and captions exactly as gitmodel does."""

from __future__ import annotations

import pytest
import torch

from gitmodel import GitForCausalLM, GitProcessor, bundled_model_path
from jobs.finetune import BUNDLED_COMMAND, BUNDLED_EVAL_SEED, BUNDLED_TEST_SEED, BUNDLED_TRAIN_SEED
from pipeline.scenes import generate_scenes

HELD_OUT_SCENES = 500
REQUIRED_EXACT_MATCH = 0.95
MAX_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def bundled():
    path = bundled_model_path()
    return GitForCausalLM.from_pretrained(path), GitProcessor.from_pretrained(path)


def caption(model: GitForCausalLM, processor: GitProcessor, images) -> list[str]:
    inputs = processor(images=images)
    return processor.batch_decode(model.generate(inputs["pixel_values"]), skip_special_tokens=True)


def test_the_test_scenes_were_never_trained_on():
    assert BUNDLED_TEST_SEED not in (BUNDLED_TRAIN_SEED, BUNDLED_EVAL_SEED)


def test_captions_at_least_95_percent_of_unseen_scenes_exactly(bundled):
    model, processor = bundled
    scenes = list(generate_scenes(HELD_OUT_SCENES, seed=BUNDLED_TEST_SEED))
    predictions = []
    for start in range(0, len(scenes), 100):
        predictions += caption(model, processor, [s.image for s in scenes[start : start + 100]])
    wrong = [(p, s.caption) for p, s in zip(predictions, scenes) if p != s.caption]
    accuracy = 1 - len(wrong) / len(scenes)
    assert accuracy >= REQUIRED_EXACT_MATCH, f"exact match {accuracy:.1%}; some mistakes: {wrong[:5]}"


def test_is_small_and_has_a_model_card_naming_its_command():
    folder = bundled_model_path()
    files = {f.name: f.stat().st_size for f in folder.iterdir() if f.is_file()}
    assert {"config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
            "tokenizer.json", "tokenizer_config.json", "vocab.txt", "README.md"} <= set(files)
    assert sum(files.values()) <= MAX_BYTES
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert BUNDLED_COMMAND in card
    assert f"seed {BUNDLED_TEST_SEED}" in card and "exact match" in card


def test_tokenizer_is_bert_style_wordpiece(bundled):
    tokenizer = bundled[1].tokenizer
    ids = {name: tokenizer.token_to_id(token) for name, token in tokenizer.special_tokens.items()}
    assert ids == {"pad_token": 0, "unk_token": 1, "cls_token": 2, "sep_token": 3, "mask_token": 4}
    assert tokenizer.encode("a small red star above a large blue circle", add_special_tokens=False) == [
        tokenizer.token_to_id(word) for word in "a small red star above a large blue circle".split()
    ]


def test_transformers_loads_it_and_generates_the_same_tokens(bundled):
    transformers = pytest.importorskip("transformers")
    model, processor = bundled
    path = str(bundled_model_path())
    theirs = transformers.GitForCausalLM.from_pretrained(path).eval()
    their_processor = transformers.AutoProcessor.from_pretrained(path)
    images = [s.image for s in generate_scenes(8, seed=BUNDLED_TEST_SEED, start=1000)]

    their_inputs = their_processor(images=images, return_tensors="pt")
    ours = processor(images=images)
    assert torch.equal(ours["pixel_values"], their_inputs["pixel_values"])
    with torch.no_grad():
        expected = theirs.generate(pixel_values=their_inputs["pixel_values"], max_new_tokens=20)
    assert torch.equal(model.generate(ours["pixel_values"], max_new_tokens=20), expected)
    assert their_processor.batch_decode(expected, skip_special_tokens=True) == caption(model, processor, images)
