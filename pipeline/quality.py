"""Caption quality flags: what a dataset builder wants to know about each caption, as columns.

No row is dropped for its caption. Each output row gets `words` (the best caption's word count)
and `flags` (a list of codes, empty when nothing is wrong); a row with several captions
(num_return_sequences > 1) also gets `captions_flags`, the flags of each of its `captions`.
`output.filter` then selects rows, and captions within them, for the filtered view (see
pipeline.views). The codes, always in this order:

    empty           the caption has no words (then no length flag)
    too_short       fewer than output.quality.min_words words
    too_long        more than output.quality.max_words words
    repeated_ngram  a run of two or more words immediately repeated ("a dog a dog", "on the left
                    on the left") or one word three times in a row ("very very very"): the loops
                    a decoder falls into. A word repeated with others between ("a man on a horse
                    on a beach") is ordinary English and is not flagged.
    low_score       score (mean token log-prob) below output.quality.min_score, when that is set

Words are runs of letters, combining marks and digits (Unicode categories L, M and N: a Devanagari
vowel sign or an accent written as a combining mark is part of its word), compared without regard
to case; punctuation is not a word. An apostrophe inside a word keeps it whole, and so does one
that decoding spaced out: BERT's tokenizer decodes "man's" as "man ' s" and "isn't" as "isn ' t",
so an apostrophe between spaces that is followed by an English clitic (s, t, re, ve, ll, d, m)
is joined back ("man's" is one word; "the dogs ' toys" is three). An error row has no caption, so
its `words`, `flags` and `captions_flags` are null: "not assessed", which an empty list would
misstate as "fine".
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    from pipeline.job import QualityConfig

FLAG_CODES = ("empty", "too_short", "too_long", "repeated_ngram", "low_score")
_APOSTROPHES = "'’"
# Applied once every character that is neither a word character nor an apostrophe is a space.
_DETACHED_CLITIC = re.compile(r"(?<=[^\s'’]) ['’] (?=(?:s|t|re|ve|ll|d|m)(?![^\s'’]))", re.IGNORECASE)
_WORD = re.compile(r"[^\s'’]+(?:['’][^\s'’]+)*")


def caption_words(caption: str) -> list[str]:
    """The caption's words, lower-cased."""
    kept = "".join(ch if _is_word_character(ch) or ch in _APOSTROPHES else " " for ch in caption)
    return [word.lower() for word in _WORD.findall(_DETACHED_CLITIC.sub("'", kept))]


def _is_word_character(ch: str) -> bool:
    """Letters, marks (combining accents, vowel signs) and numbers; `\\w` would split at marks."""
    return unicodedata.category(ch)[0] in "LMN"


def has_repeated_ngram(words: list[str]) -> bool:
    """True when some n >= 2 words are immediately repeated, or one word comes three times in a row."""
    for start in range(len(words)):
        for n in range(1, (len(words) - start) // 2 + 1):
            gram = words[start : start + n]
            if gram == words[start + n : start + 2 * n] and (n > 1 or words[start + 2 : start + 3] == gram):
                return True
    return False


def caption_flags(words: list[str], score: float | None, rules: QualityConfig) -> list[str]:
    """The flag codes of one caption, given its words and score."""
    flags = []
    if not words:
        flags.append("empty")
    elif len(words) < rules.min_words:
        flags.append("too_short")
    elif len(words) > rules.max_words:
        flags.append("too_long")
    if has_repeated_ngram(words):
        flags.append("repeated_ngram")
    if rules.min_score is not None and score is not None and score < rules.min_score:
        flags.append("low_score")
    return flags


def quality_columns(
    captions: pa.ChunkedArray, scores: pa.ChunkedArray, rules: QualityConfig
) -> tuple[pa.Array, pa.Array]:
    """The `words` and `flags` columns for output rows: null where there is no caption (error rows)."""
    words, flags = [], []
    for caption, score in zip(captions.to_pylist(), scores.to_pylist()):
        if caption is None:
            words.append(None)
            flags.append(None)
            continue
        found = caption_words(caption)
        words.append(len(found))
        flags.append(caption_flags(found, score, rules))
    return pa.array(words, pa.int32()), pa.array(flags, pa.list_(pa.string()))


def captions_flags_column(captions: pa.ChunkedArray, scores: pa.ChunkedArray, rules: QualityConfig) -> pa.Array:
    """The `captions_flags` column: for each row, the flags of each of its captions (null on error rows)."""
    flags = [
        None if texts is None else [caption_flags(caption_words(text), score, rules) for text, score in zip(texts, values)]
        for texts, values in zip(captions.to_pylist(), scores.to_pylist())
    ]
    return pa.array(flags, pa.list_(pa.list_(pa.string())))
