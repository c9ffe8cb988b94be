"""GitProcessor: images and text in, model inputs out; generated ids back to text.

Besides transformers' `GitProcessor.__call__`, it knows GIT's generation prompt: `[CLS]` followed by
the prompt's tokens with no `[SEP]` (the model continues the text), left-padded so that every row's
last prompt token sits in the same column.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from gitmodel.hub import CheckpointFolder
from gitmodel.image_processing import GitImageProcessor, ImageInput
from gitmodel.tokenization import GitTokenizer, TokenIds


class GitProcessor:
    """An image processor and a tokenizer, loaded and saved together in the Hugging Face layout."""

    def __init__(self, image_processor: GitImageProcessor, tokenizer: GitTokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike | CheckpointFolder, storage_options: dict[str, Any] | None = None
    ) -> GitProcessor:
        folder = path if isinstance(path, CheckpointFolder) else CheckpointFolder(path, storage_options)
        return cls(GitImageProcessor.from_pretrained(folder), GitTokenizer.from_pretrained(folder))

    def save_pretrained(
        self, path: str | os.PathLike | CheckpointFolder, storage_options: dict[str, Any] | None = None
    ) -> None:
        """The hub layout (preprocessor_config.json + tokenizer files), which transformers' AutoProcessor loads."""
        folder = path if isinstance(path, CheckpointFolder) else CheckpointFolder(path, storage_options)
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder, extra_config={"processor_class": "GitProcessor"})

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        text: str | Sequence[str] | None = None,
        videos: Sequence[Sequence[ImageInput]] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str = "right",
        add_special_tokens: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        """Any of images / text / videos → {"input_ids", "attention_mask", "pixel_values"}, as transformers does."""
        if images is None and text is None and videos is None:
            raise ValueError("give at least one of images, text or videos")
        if images is not None and videos is not None:
            raise ValueError("give images or videos, not both")
        inputs: dict[str, Any] = {}
        if text is not None:
            inputs.update(
                self.tokenizer(
                    text,
                    add_special_tokens=add_special_tokens,
                    padding=padding,
                    padding_side=padding_side,
                    truncation=truncation,
                    max_length=max_length,
                    return_tensors=return_tensors,
                )
            )
        if images is not None:
            inputs.update(self.image_processor(images, return_tensors=return_tensors))
        if videos is not None:
            inputs.update(self.image_processor.preprocess_videos(videos, return_tensors=return_tensors))
        return inputs

    def decode(self, ids: int | TokenIds, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: TokenIds | Sequence[TokenIds], skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------- generation

    def prompt_inputs(self, prompts: str | Sequence[str] | None, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """GIT's generation prompt: (input_ids, attention_mask), each (batch_size, L) int64.

        `[CLS] + tokens(prompt)` with no `[SEP]`, left-padded with the pad id (mask 0). No prompts
        (plain captioning) is `[[CLS]]` per row; a single string is used for every row.
        """
        if prompts is None:
            rows = [[self.tokenizer.cls_token_id] for _ in range(batch_size)]
        else:
            prompts = [prompts] * batch_size if isinstance(prompts, str) else list(prompts)
            if len(prompts) != batch_size:
                raise ValueError(f"got {len(prompts)} prompts for a batch of {batch_size}")
            rows = [[self.tokenizer.cls_token_id, *self.tokenizer.encode(p, add_special_tokens=False)] for p in prompts]
        width = max((len(row) for row in rows), default=1)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
        return input_ids, attention_mask

    def answers(self, generated_ids: TokenIds, prompt_input_ids: torch.Tensor) -> list[str]:
        """The text generated after the prompt (special tokens skipped): captions, or VQA answers.

        `generated_ids` are full sequences as generation returns them, prompt columns included;
        all rows share the prompt's (left-padded) width, so the answer starts at the same column.
        """
        prompt_length = prompt_input_ids.shape[-1]
        return [self.tokenizer.decode(row[prompt_length:], skip_special_tokens=True) for row in generated_ids]

    def __repr__(self) -> str:
        return f"GitProcessor({self.image_processor!r}, {self.tokenizer!r})"
