"""Tiny random GIT checkpoints in the official layout, written by transformers itself (the reference)."""

from __future__ import annotations

from pathlib import Path

import torch

EOS = 102
VOCAB = 128


def tiny_reference_model(
    *, seed: int = 0, frames: int | None = None, image_size: int = 32, eos_bias: float = 0.0, vocab_size: int = VOCAB
):
    """A transformers GitForCausalLM with tiny dims and weights large enough to make sharp, varied predictions."""
    import transformers

    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=8,
    )
    config = transformers.GitConfig(
        vision_config=vision, vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_image_with_embedding=frames,
    )
    torch.manual_seed(seed)
    model = transformers.GitForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or "layrnorm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param) if name.endswith("weight") else 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param))
        model.output.bias[EOS] += eos_bias
    return model


def save_tiny_checkpoint(path: str | Path, **kwargs) -> Path:
    model = tiny_reference_model(**kwargs)
    model.save_pretrained(str(path))
    return Path(path)
