"""Loading and saving weights in the Hugging Face layout, with errors that name what does not fit.

A model is either loaded whole or not at all: every parameter must come from the checkpoint with
the right shape, so a wrong config can never yield a half-random model.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, ClassVar

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from gitmodel.hub import CheckpointFolder

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """The checkpoint's files cannot be read, or its tensors do not fit the model's config."""


def read_state_dict(folder: CheckpointFolder, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: single or sharded safetensors, or (opt-in) pickled .bin files."""
    if folder.exists(SAFETENSORS):
        return _read_safetensors(folder, SAFETENSORS)
    if folder.exists(SAFETENSORS_INDEX):
        return _read_shards(folder, SAFETENSORS_INDEX, _read_safetensors)
    has_pickle = folder.exists(PICKLE) or folder.exists(PICKLE_INDEX)
    if has_pickle and not allow_pickle:
        raise CheckpointError(
            f"{folder.path} holds only {PICKLE} weights, a pickle that can run code when loaded; "
            "pass allow_pickle=True if you trust it, or convert it to safetensors"
        )
    if folder.exists(PICKLE):
        return _read_pickle(folder, PICKLE)
    if folder.exists(PICKLE_INDEX):
        return _read_shards(folder, PICKLE_INDEX, _read_pickle)
    raise FileNotFoundError(f"{folder.path}: no weights found (expected {SAFETENSORS} or {SAFETENSORS_INDEX})")


def _read_safetensors(folder: CheckpointFolder, name: str) -> dict[str, torch.Tensor]:
    try:
        if folder.is_local:
            return load_safetensors_file(folder.file(name))
        return load_safetensors_bytes(folder.read_bytes(name))
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt headers
        raise CheckpointError(f"{folder.path}/{name} is not a valid safetensors file: {err}") from None


def _read_pickle(folder: CheckpointFolder, name: str) -> dict[str, torch.Tensor]:
    try:
        # Even when pickles are allowed, load tensors only: no arbitrary objects.
        return torch.load(io.BytesIO(folder.read_bytes(name)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise CheckpointError(f"{folder.path}/{name} could not be read as a PyTorch state dict: {err}") from None


def _read_shards(folder: CheckpointFolder, index_name: str, read_one) -> dict[str, torch.Tensor]:
    index = folder.read_json(index_name)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{folder.path}/{index_name} has no weight_map")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(read_one(folder, shard))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{folder.path}: shards lack tensors that {index_name} lists: {_some(missing)}")
    return state


# Older and converted checkpoints spell some things differently; map them to today's names.
_RENAMES = [(re.compile(r"\.img_temperal_embedding\."), ".img_temporal_embedding.")]
_IGNORED = re.compile(r"(^|\.)position_ids$")


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop buffers older files stored (`*.position_ids`); apply known spelling fixes."""
    normalized = {}
    for key, tensor in state.items():
        if _IGNORED.search(key):
            continue
        for pattern, replacement in _RENAMES:
            key = pattern.sub(replacement, key)
        normalized[key] = tensor
    return normalized


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's own names, or a CheckpointError naming every misfit.

    `prefixes` are where the model's weights may sit in a checkpoint: a GitModel's weights sit under
    `git.` in a GitForCausalLM checkpoint; tensors outside the chosen prefix belong to other heads.
    """
    expected = {name: p.shape for name, p in model.state_dict().items()}
    prefix = max(prefixes, key=lambda p: sum(f"{p}{name}" in state for name in expected))
    fitted = {key[len(prefix):]: t for key, t in state.items() if key.startswith(prefix)}
    missing = sorted(set(expected) - set(fitted))
    unexpected = sorted(set(fitted) - set(expected))
    wrong_shape = [
        f"{name} (checkpoint {tuple(fitted[name].shape)}, model {tuple(expected[name])})"
        for name in sorted(set(expected) & set(fitted))
        if fitted[name].shape != expected[name]
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_some(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shape for {len(wrong_shape)} tensor(s): {_some(wrong_shape)}")
    if problems:
        raise CheckpointError(f"checkpoint does not fit the {type(model).__name__} config: " + "; ".join(problems))
    return fitted


def _some(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


class PretrainedModel(nn.Module):
    """`from_pretrained` / `save_pretrained` in the Hugging Face layout, for any of gitmodel's models."""

    config_class: ClassVar[type]
    checkpoint_prefixes: ClassVar[tuple[str, ...]] = ("",)
    config: Any

    @classmethod
    def config_from_json(cls, values: dict[str, Any]):
        # A GitVisionModel can be loaded out of a whole GIT checkpoint: its config is the nested one.
        if values.get("model_type") == "git" and cls.config_class.model_type == "git_vision_model":
            values = values.get("vision_config") or {}
        return cls.config_class.from_dict(values)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        storage_options: dict[str, Any] | None = None,
        allow_pickle: bool = False,
    ):
        """Load a local folder or fsspec URL (`s3://…`, `hf://…`) in the Hugging Face layout, in eval mode."""
        folder = CheckpointFolder(path, storage_options)
        config = cls.config_from_json(folder.read_json("config.json"))
        state = normalize_keys(read_state_dict(folder, allow_pickle=allow_pickle))
        with torch.device("meta"):
            model = cls(config)
        try:
            fitted = fit_state_dict(model, state, cls.checkpoint_prefixes)
        except CheckpointError as err:
            raise CheckpointError(f"{folder.path}: {err}") from None
        model.load_state_dict(fitted, strict=True, assign=True)
        model.after_load(folder)
        return model.to(device=device, dtype=dtype).eval()

    def after_load(self, folder: CheckpointFolder) -> None:
        """Hook for files beside the weights (the generation config)."""

    def save_pretrained(self, path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
        """config.json and model.safetensors, which this class and transformers' class of the same name load."""
        folder = CheckpointFolder(path, storage_options)
        folder.write_json("config.json", self.config_json())
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        folder.write_bytes(SAFETENSORS, save_safetensors_bytes(tensors, metadata={"format": "pt"}))

    def config_json(self) -> dict[str, Any]:
        """The config as transformers writes it beside these weights: this class's name, the weights' dtype.

        The dtype the config was loaded with is stale once the model has been cast (loaded in float32,
        saved in bfloat16), and transformers loads the weights in the dtype the config names.
        """
        values = self.config.to_dict()
        values.pop("torch_dtype", None)  # transformers 4's name for it
        return {**values, "architectures": [type(self).__name__], "dtype": str(self.dtype).removeprefix("torch.")}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

