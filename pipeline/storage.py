"""A folder at any fsspec URL where whole files appear at once, or not at all.

Everything the pipeline publishes (data files, progress manifests) goes through `Folder.publish`:

- object stores (S3, GCS, Azure, ...) make an object visible only when its upload completes, and a
  PUT over an existing key replaces it whole; so the bytes are uploaded straight to their name,
  and a failed upload is aborted, never completed;
- a local filesystem has no such guarantee (a reader can see a half-written file), so the file is
  written under `.gitcap/attempts/` on the same filesystem, with a `.tmp` suffix no glob for data
  files matches, and renamed into place (`os.replace` is atomic).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from fsspec.core import url_to_fs

ATTEMPTS = ".gitcap/attempts"  # local staging for files about to be renamed into place


class Folder:
    """One folder (local path or URL) and the files below it, by relative name."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = str(url).rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, root = url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/")
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.is_local = "file" in protocols or "local" in protocols

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def uri(self, name: str) -> str:
        """`name` as a URL a user can paste (a plain path when local)."""
        path = self.path(name)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    # -------------------------------------------------------------- reading

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        """Several small files in one go (object stores fetch them concurrently)."""
        if not names:
            return {}
        paths = [self.path(n) for n in names]
        found = self.fs.cat(paths, on_error="omit")
        if isinstance(found, bytes):  # fsspec returns bare bytes for a single non-glob path
            found = {paths[0]: found}
        return {self._relative(p): data for p, data in found.items()}

    def list(self, prefix: str = "", suffix: str = "") -> dict[str, int]:
        """{relative name: size} of the files directly in `prefix` (a sub-folder, or "")."""
        self.fs.invalidate_cache(self.path(prefix))
        try:
            entries = self.fs.ls(self.path(prefix), detail=True)
        except FileNotFoundError:
            return {}
        return {
            self._relative(e["name"]): int(e.get("size") or 0)
            for e in entries
            if e.get("type") == "file" and e["name"].endswith(suffix)
        }

    def _relative(self, path: str) -> str:
        """A path the filesystem gave back (some add their protocol), relative to the folder."""
        return path.split("://", 1)[-1][len(self.root) + 1 :] if not self.is_local else path[len(self.root) + 1 :]

    # -------------------------------------------------------------- writing

    @contextmanager
    def publish(self, name: str) -> Iterator[BinaryIO]:
        """Write `name` so that readers see the old file (or none) until the new one is whole."""
        if self.is_local:
            staging = self.path(f"{ATTEMPTS}/{uuid.uuid4().hex}-{posixpath.basename(name)}.tmp")
            os.makedirs(posixpath.dirname(staging), exist_ok=True)
            os.makedirs(posixpath.dirname(self.path(name)), exist_ok=True)
            try:
                with open(staging, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(staging, self.path(name))
            finally:
                if os.path.exists(staging):
                    os.remove(staging)
            return
        f = self.fs.open(self.path(name), "wb")
        try:
            yield f
        except BaseException:
            # Closing would complete the upload and publish a partial file: abort it instead.
            if hasattr(f, "discard"):
                f.discard()
                f.closed = True
            raise
        f.close()

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.publish(name) as f:
            f.write(data)

    def write_json(self, name: str, value: Any) -> None:
        self.write_bytes(name, (json.dumps(value, indent=1, sort_keys=True, default=str) + "\n").encode())

    def delete(self, name: str) -> None:
        try:
            self.fs.rm(self.path(name), recursive=True)
        except FileNotFoundError:
            pass

    def clear_attempts(self) -> int:
        """Delete what interrupted local writes left in the staging folder; returns how many files."""
        if not self.is_local or not os.path.isdir(self.path(ATTEMPTS)):
            return 0
        leftovers = os.listdir(self.path(ATTEMPTS))
        for name in leftovers:
            os.remove(self.path(f"{ATTEMPTS}/{name}"))
        return len(leftovers)
