"""What the vision tower's and the decoder's attention layers share: q/k/v projections, split into heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QKVAttention(nn.Module):
    """Separate q/k/v Linear layers, as checkpoints store them, optionally run as one matmul.

    `fuse_projections()` (done by `prepare_for_inference`) concatenates the three weights once, so
    inference runs one larger GEMM instead of three; the checkpoint's parameters stay as they are.
    The fused copies are buffers outside the state dict: `.to()` moves and casts them with the rest.
    """

    num_heads: int

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        raise NotImplementedError

    def fuse_projections(self, input_major: bool = False) -> None:
        layers = self.projections()
        weight = torch.cat([layer.weight for layer in layers]).detach()
        self.fused_weight = input_major_layout(weight) if input_major else weight
        self.fused_bias = torch.cat([layer.bias for layer in layers]).detach()

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values as (batch, heads, length, head_dim)."""
        if self.fused_weight is not None:
            q, k, v = F.linear(x, self.fused_weight, self.fused_bias).chunk(3, dim=-1)
        else:
            q, k, v = (layer(x) for layer in self.projections())
        return self.heads(q), self.heads(k), self.heads(v)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)


def input_major_layout(weight: torch.Tensor) -> torch.Tensor:
    """The same (out, in) matrix, stored with the input dimension outermost.

    On CPUs, MKL multiplies a few rows (a decode step's batch) by a weight stored this way ~1.7x
    faster than by the row-major layout checkpoints use; large batches run at the same speed.
    """
    return weight.t().contiguous().t()
