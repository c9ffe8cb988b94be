"""GIT's tokenizer: BERT uncased WordPiece on `tokenizers`, behaving like transformers' BertTokenizer.

A checkpoint carries `tokenizer.json` or only BERT's `vocab.txt`, from which the pipeline
transformers builds is rebuilt: BertNormalizer → BertPreTokenizer → WordPiece("##"). As in
transformers, `tokenizer_config.json`'s do_lower_case / strip_accents / tokenize_chinese_chars win
over the normalizer saved in tokenizer.json.
Special tokens are always `[CLS] text [SEP]`; padding and truncation are done here, not in the
Rust tokenizer, so a loaded tokenizer.json with padding/truncation switched on changes nothing.
"""

from __future__ import annotations

import io
import os
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import WordPiece

from gitmodel.hub import CheckpointFolder

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
VOCAB_FILE = "vocab.txt"

SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
VERY_LARGE_INTEGER = int(1e30)  # transformers' "no limit" model_max_length

TokenIds = Sequence[int] | torch.Tensor | np.ndarray


class GitTokenizer:
    """A BERT WordPiece tokenizer with transformers' call / decode / save_pretrained behaviour."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        pad_token: str = "[PAD]",
        unk_token: str = "[UNK]",
        cls_token: str = "[CLS]",
        sep_token: str = "[SEP]",
        mask_token: str = "[MASK]",
        model_max_length: int = VERY_LARGE_INTEGER,
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        clean_up_tokenization_spaces: bool = False,
    ):
        self.special_tokens = {
            "pad_token": pad_token,
            "unk_token": unk_token,
            "cls_token": cls_token,
            "sep_token": sep_token,
            "mask_token": mask_token,
        }
        missing = [token for token in self.special_tokens.values() if tokenizer.token_to_id(token) is None]
        if missing:
            raise ValueError(f"special tokens {missing} are not in the vocabulary")
        self.model_max_length = int(model_max_length)
        self.do_lower_case = do_lower_case
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

        # Registered as special so they are never split, and skipped by decode(skip_special_tokens=True).
        tokenizer.add_special_tokens(
            [AddedToken(token, special=True, normalized=False) for token in self.special_tokens.values()]
        )
        # transformers' BertTokenizer always uses BERT's template, whatever tokenizer.json says; so do we
        # (and save it that way).
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls_token}:0 $A:0 {sep_token}:0",
            pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
            special_tokens=[(token, tokenizer.token_to_id(token)) for token in (cls_token, sep_token)],
        )
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike | CheckpointFolder, storage_options: dict[str, Any] | None = None
    ) -> GitTokenizer:
        """From `tokenizer.json` when present, else BERT's `vocab.txt`; options from `tokenizer_config.json`."""
        folder = path if isinstance(path, CheckpointFolder) else CheckpointFolder(path, storage_options)
        config = folder.read_json(TOKENIZER_CONFIG) if folder.exists(TOKENIZER_CONFIG) else {}
        if not isinstance(config, dict):
            raise ValueError(f"{folder.path}/{TOKENIZER_CONFIG}: expected a JSON object")
        specials = {name: _token_text(config.get(name, default)) for name, default in SPECIAL_TOKENS.items()}

        if folder.exists(TOKENIZER_FILE):
            try:
                tokenizer = Tokenizer.from_str(folder.read_bytes(TOKENIZER_FILE).decode("utf-8"))
            except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
                raise ValueError(f"{folder.path}/{TOKENIZER_FILE} is not a valid tokenizers file: {err}") from None
            normalizer = _json_normalizer(tokenizer)
            defaults = {
                "do_lower_case": normalizer.get("lowercase", True),
                "strip_accents": normalizer.get("strip_accents"),
                "tokenize_chinese_chars": normalizer.get("handle_chinese_chars", True),
            }
            options = {key: config.get(key, value) for key, value in defaults.items()}
            if normalizer:  # transformers' BertTokenizer rebuilds the normalizer from the config: so do we
                tokenizer.normalizer = _bert_normalizer(**options)
        elif folder.exists(VOCAB_FILE):
            defaults = {"do_lower_case": True, "strip_accents": None, "tokenize_chinese_chars": True}
            options = {key: config.get(key, value) for key, value in defaults.items()}
            tokenizer = bert_wordpiece(_read_vocab(folder), unk_token=specials["unk_token"], **options)
        else:
            raise FileNotFoundError(f"{folder.path}: no {TOKENIZER_FILE} or {VOCAB_FILE} (tokenizer files)")

        try:
            return cls(
                tokenizer,
                **specials,
                model_max_length=config.get("model_max_length") or VERY_LARGE_INTEGER,
                clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
                **options,
            )
        except ValueError as err:
            raise ValueError(f"{folder.path}: {err}") from None

    @classmethod
    def train_wordpiece(
        cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 1, model_max_length: int = 512
    ) -> GitTokenizer:
        """Train a BERT-style uncased WordPiece vocabulary: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4."""
        tokenizer = bert_wordpiece(None, unk_token=SPECIAL_TOKENS["unk_token"])
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS.values()),
            continuing_subword_prefix="##",
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer, model_max_length=model_max_length)

    # ------------------------------------------------------------- properties

    def _id(self, name: str) -> int:
        return self._tokenizer.token_to_id(self.special_tokens[name])

    @property
    def pad_token_id(self) -> int:
        return self._id("pad_token")

    @property
    def cls_token_id(self) -> int:
        return self._id("cls_token")

    @property
    def sep_token_id(self) -> int:
        return self._id("sep_token")

    @property
    def unk_token_id(self) -> int:
        return self._id("unk_token")

    @property
    def mask_token_id(self) -> int:
        return self._id("mask_token")

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, as transformers reports it (added tokens not counted)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    # --------------------------------------------------------------- encoding

    def encode(
        self, text: str, add_special_tokens: bool = True, truncation: bool = False, max_length: int | None = None
    ) -> list[int]:
        return self._encode_batch([text], add_special_tokens, truncation, max_length)[0]

    def _encode_batch(
        self, texts: list[str], add_special_tokens: bool, truncation: bool, max_length: int | None
    ) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        rows = [encoding.ids for encoding in encodings]
        if truncation:
            limit = (max_length if max_length is not None else self.model_max_length) - (2 if add_special_tokens else 0)
            rows = [row[: max(limit, 0)] for row in rows]
        if add_special_tokens:
            rows = [[self.cls_token_id, *row, self.sep_token_id] for row in rows]
        return rows

    def __call__(
        self,
        text: str | Sequence[str],
        add_special_tokens: bool = True,
        padding: bool | str = True,
        padding_side: str = "right",
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> dict[str, Any]:
        """{"input_ids", "attention_mask"} like transformers: int64 tensors with return_tensors="pt", else lists."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        rows = self._encode_batch(texts, add_special_tokens, truncation, max_length)
        masks = [[1] * len(row) for row in rows]

        if padding in (True, "longest", "max_length"):
            if padding == "max_length":
                width = max_length if max_length is not None else self.model_max_length
            else:
                width = max((len(row) for row in rows), default=0)
            rows = [_pad(row, width, self.pad_token_id, padding_side) for row in rows]
            masks = [_pad(mask, width, 0, padding_side) for mask in masks]
        elif padding not in (False, "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")

        if return_tensors == "pt":
            if len({len(row) for row in rows}) > 1:
                raise ValueError("sequences have different lengths: use padding=True to return tensors")
            return {
                "input_ids": torch.tensor(rows, dtype=torch.long),
                "attention_mask": torch.tensor(masks, dtype=torch.long),
            }
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if single:
            return {"input_ids": rows[0], "attention_mask": masks[0]}
        return {"input_ids": rows, "attention_mask": masks}

    # --------------------------------------------------------------- decoding

    def decode(self, ids: int | TokenIds, skip_special_tokens: bool = False) -> str:
        ids = _as_list(ids)
        ids = [ids] if isinstance(ids, int) else ids
        if ids and isinstance(ids[0], list):
            raise ValueError("decode takes one sequence; use batch_decode for a batch")
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def batch_decode(self, sequences: TokenIds | Sequence[TokenIds], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in _as_list(sequences)]

    # ----------------------------------------------------------------- saving

    def to_config(self) -> dict[str, Any]:
        """tokenizer_config.json: what transformers' BertTokenizer needs to rebuild this tokenizer."""
        return {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.do_lower_case,
            "strip_accents": self.strip_accents,
            "tokenize_chinese_chars": self.tokenize_chinese_chars,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            **self.special_tokens,
        }

    def save_pretrained(
        self,
        path: str | os.PathLike | CheckpointFolder,
        storage_options: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        """Writes tokenizer.json, tokenizer_config.json (plus `extra_config`) and BERT's vocab.txt."""
        folder = path if isinstance(path, CheckpointFolder) else CheckpointFolder(path, storage_options)
        folder.write_bytes(TOKENIZER_FILE, self._tokenizer.to_str(pretty=True).encode("utf-8"))
        folder.write_json(TOKENIZER_CONFIG, {**self.to_config(), **(extra_config or {})})
        vocab = self._tokenizer.get_vocab(with_added_tokens=False)
        tokens = sorted(vocab, key=vocab.get)
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError("vocabulary ids are not contiguous from 0; cannot write vocab.txt")
        folder.write_bytes(VOCAB_FILE, "".join(f"{token}\n" for token in tokens).encode("utf-8"))

    def __repr__(self) -> str:
        return (
            f"GitTokenizer(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case}, "
            f"model_max_length={self.model_max_length})"
        )


def bert_wordpiece(
    vocab: dict[str, int] | None,
    unk_token: str = "[UNK]",
    do_lower_case: bool = True,
    strip_accents: bool | None = None,
    tokenize_chinese_chars: bool = True,
) -> Tokenizer:
    """The pipeline transformers' BertTokenizer builds from a vocabulary (None: empty, for training)."""
    model = WordPiece(vocab, unk_token=unk_token) if vocab is not None else WordPiece(unk_token=unk_token)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = _bert_normalizer(do_lower_case, strip_accents, tokenize_chinese_chars)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _bert_normalizer(
    do_lower_case: bool, strip_accents: bool | None, tokenize_chinese_chars: bool
) -> normalizers.BertNormalizer:
    return normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=tokenize_chinese_chars,
        strip_accents=strip_accents,
        lowercase=do_lower_case,
    )


def _read_vocab(folder: CheckpointFolder) -> dict[str, int]:
    """vocab.txt as transformers reads it: one token per line (universal newlines), id = line number."""
    try:
        lines = io.TextIOWrapper(io.BytesIO(folder.read_bytes(VOCAB_FILE)), encoding="utf-8").readlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{folder.path}/{VOCAB_FILE} is not UTF-8 text: {err}") from None
    vocab = {line.rstrip("\n"): index for index, line in enumerate(lines)}
    if not vocab:
        raise ValueError(f"{folder.path}/{VOCAB_FILE} is empty")
    return vocab


def _json_normalizer(tokenizer: Tokenizer) -> dict[str, Any]:
    import json

    normalizer = json.loads(tokenizer.to_str()).get("normalizer") or {}
    return normalizer if normalizer.get("type") == "BertNormalizer" else {}


def _token_text(token: Any) -> str:
    """Special tokens are strings, or AddedToken dicts in configs written by older transformers."""
    return token["content"] if isinstance(token, dict) else str(token)


def _pad(row: list[int], width: int, value: int, side: str) -> list[int]:
    padding = [value] * (width - len(row))
    if side == "right":
        return row + padding
    if side == "left":
        return padding + row
    raise ValueError(f"padding_side must be 'right' or 'left', got {side!r}")


def _as_list(ids: Any) -> Any:
    """Token ids (int, list, nested list, tensor or array) as plain Python ints / lists."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        ids = ids.tolist()
    if isinstance(ids, (int, np.integer)) or getattr(ids, "ndim", None) == 0:
        return int(ids)
    return [_as_list(x) for x in ids]


_CLEAN_UPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'")]
_CLEAN_UPS += [(f" {suffix}", suffix) for suffix in ("n't", "'m", "'s", "'ve", "'re")]


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization, applied when tokenizer_config asks for it."""
    for before, after in _CLEAN_UPS:
        text = text.replace(before, after)
    return text
