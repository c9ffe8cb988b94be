"""Read and write a checkpoint folder wherever it lives: a local path or any fsspec URL.

`s3://bucket/model`, `file:///models/git-base`, `hf://microsoft/git-base` (with huggingface_hub
installed) and plain local folders all look the same to the loaders: a folder of named files.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
from fsspec.core import url_to_fs


class CheckpointFolder:
    """A folder of checkpoint files (`config.json`, `model.safetensors`, ...) at a local path or URL."""

    def __init__(self, path: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        self.path = str(path)
        self.fs, self.root = url_to_fs(_as_url(self.path), **(storage_options or {}))
        self.root = self.root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def file(self, name: str) -> str:
        """The filesystem path of `name` inside the folder (local path for local folders)."""
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.file(name))

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(self.file(name))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no file {name!r}") from None

    def read_json(self, name: str) -> dict[str, Any]:
        raw = self.read_bytes(name)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{self.path}/{name} is not valid JSON: {err}") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        with self.fs.open(self.file(name), "wb") as f:
            f.write(data)

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def __repr__(self) -> str:
        return f"CheckpointFolder({self.path!r})"


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _as_url(path: str) -> str:
    """Local folders stay as they are; `org/name` that is not a local folder means the Hugging Face hub."""
    if "://" in path or os.path.exists(path):
        return path
    parts = path.split("/")
    if len(parts) == 2 and all(parts) and not path.startswith((".", "/", "~")):
        try:
            import huggingface_hub  # noqa: F401  (registers the hf:// filesystem)
        except ImportError:
            return path
        return f"hf://{path}"
    return path
