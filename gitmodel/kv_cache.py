"""A preallocated key/value cache for the text decoder; nothing else knows its layout.

Layout per layer: (rows, heads, positions, head_dim). Positions 0..N-1 hold the image tokens,
which are computed once per image and copied to every row (beam or sample) of that image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class LayerCache:
    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys = keys
        self.values = values

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v at positions start.. and return the keys/values a query there attends to."""
        end = start + k.shape[2]
        rows = self.keys.shape[0]
        if k.shape[0] == rows:
            self.keys[:, :, start:end] = k
            self.values[:, :, start:end] = v
            return self.keys[:, :, :end], self.values[:, :, :end]
        # Image prefill over one row per image: every row of that image (its beams or samples) gets a copy,
        # while attention runs over the images alone.
        if start != 0 or rows % k.shape[0]:
            raise ValueError(f"cannot broadcast {k.shape[0]} rows into a cache of {rows} rows at position {start}")
        self.keys[:, :, :end] = k.repeat_interleave(rows // k.shape[0], dim=0)
        self.values[:, :, :end] = v.repeat_interleave(rows // k.shape[0], dim=0)
        return k, v


class KVCache:
    def __init__(
        self, num_layers: int, rows: int, heads: int, max_positions: int, head_dim: int, *, dtype, device
    ):
        shape = (rows, heads, max_positions, head_dim)
        self.layers = [
            LayerCache(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]

    @property
    def rows(self) -> int:
        return self.layers[0].keys.shape[0]

    def select_rows(self, index: torch.Tensor, start: int = 0, end: int | None = None) -> None:
        """Keep only the rows in `index` (compaction, when finished rows leave) or reorder positions
        start..end of every row (beam search; image positions are the same across an image's beams)."""
        for layer in self.layers:
            if start == 0 and end is None:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
            else:
                layer.keys[:, :, start:end] = layer.keys[index, :, start:end]
                layer.values[:, :, start:end] = layer.values[index, :, start:end]


@dataclass(frozen=True)
class DecodeShape:
    """Everything that fixes the size of a generation's buffers (and of any CUDA graph over them)."""

    num_layers: int
    rows: int
    heads: int
    max_positions: int
    head_dim: int
    prompt_end: int  # image tokens + prompt tokens: where the first generated token's keys go
    padded: bool
    dtype: torch.dtype
    device: torch.device

    def allocate(self) -> tuple[KVCache, torch.Tensor | None]:
        """A fresh cache, and a key mask (rows, 1, 1, positions) when prompts are left-padded."""
        cache = KVCache(
            self.num_layers, self.rows, self.heads, self.max_positions, self.head_dim, dtype=self.dtype, device=self.device
        )
        mask = None
        if self.padded:
            mask = torch.ones(self.rows, 1, 1, self.max_positions, dtype=torch.bool, device=self.device)
        return cache, mask
