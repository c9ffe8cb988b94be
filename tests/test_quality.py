"""What a word is, for the quality flags: any script's letters with their marks, and English
possessives and contractions whole, also as GIT's BERT tokenizer decodes them ("man ' s")."""

from __future__ import annotations

import pytest

from gitmodel import GitProcessor
from pipeline.quality import caption_words
from tests.tiny_processor import save_tiny_processor


@pytest.mark.parametrize(
    "caption,words",
    [
        ("नमस्ते दुनिया", ["नमस्ते", "दुनिया"]),  # vowel signs and virama are marks
        ("a cafe\u0301 table", ["a", "cafe\u0301", "table"]),  # a combining accent stays on its letter
        ("ประตู สีแดง", ["ประตู", "สีแดง"]),
        ("日本 の cat", ["日本", "の", "cat"]),
        ("½ of 2 cakes", ["½", "of", "2", "cakes"]),
        ("snake_case , dog .", ["snake", "case", "dog"]),
    ],
)
def test_words_are_letters_marks_and_numbers_in_any_script(caption, words):
    assert caption_words(caption) == words


@pytest.mark.parametrize(
    "caption,words",
    [
        ("a man ' s dog", ["a", "man's", "dog"]),
        ("it isn ' t a cat , they ' re dogs", ["it", "isn't", "a", "cat", "they're", "dogs"]),
        ("A MAN ' S HAT", ["a", "man's", "hat"]),
        ("a man's dog", ["a", "man's", "dog"]),
        ("the dogs ' toys", ["the", "dogs", "toys"]),  # a plural possessive: the apostrophe is no clitic's
        ("' s", ["s"]),
    ],
)
def test_possessives_and_contractions_are_one_word_also_when_decoding_spaced_them(caption, words):
    assert caption_words(caption) == words


def test_words_of_captions_as_the_bert_tokenizer_decodes_them(tmp_path):
    """With bert-base-uncased's vocabulary, where "'" is a token of its own, decoding puts spaces around
    the apostrophe (as transformers 5 does when tokenizer_config does not ask for clean-up)."""
    processor = GitProcessor.from_pretrained(save_tiny_processor(tmp_path, image_size=32))
    ids = processor.tokenizer(["a man's dog isn't a man's dog"])["input_ids"]
    (decoded,) = processor.batch_decode(ids, skip_special_tokens=True)
    assert decoded == "a man ' s dog isn ' t a man ' s dog"
    assert caption_words(decoded) == ["a", "man's", "dog", "isn't", "a", "man's", "dog"]
