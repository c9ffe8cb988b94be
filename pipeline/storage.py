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

# What storage libraries raise (botocore, aiohttp, s3fs, gcsfs, ...), by class name, so that no
# backend has to be imported to recognise its errors, and the advice each cause calls for.
_CAUSES = [
    ({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "ProfileNotFound",
      "DefaultCredentialsError"},
     "no credentials found: set storage_options (key/secret, or profile), or the provider's environment "
     "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)"),
    ({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AuthFailure"},
     "credentials rejected: check the key, secret and session token"),
    ({"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError",
      "ServerTimeoutError", "ConnectionError", "gaierror"},
     "endpoint unreachable: check client_kwargs.endpoint_url (or the region) and the network"),
    ({"PermissionError", "AccessDenied", "Forbidden"}, "permission denied: the credentials may not do this here"),
    ({"FileNotFoundError", "NoSuchBucket", "NoSuchKey"}, "does not exist (check the bucket and path)"),
]


def error_chain(err: BaseException, limit: int = 8) -> list[BaseException]:
    """`err` and the errors it was raised from or while handling: s3fs wraps botocore's error,
    botocore wraps aiohttp's, and only the innermost says what really failed."""
    chain, seen = [], err
    while seen is not None and len(chain) < limit and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def storage_error_cause(err: BaseException) -> str:
    """One line saying why storage failed: the cause (credentials, endpoint, permission, a missing
    bucket or path), what to check, and the library's own words."""
    chain = error_chain(err)
    names = {type(e).__name__ for e in chain} | {str(getattr(e, "code", "")) for e in chain}
    for e in chain:
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            names.add(str(response.get("Error", {}).get("Code", "")))
    detail = f"{type(err).__name__}: {err}"
    for classes, advice in _CAUSES:
        if names & classes:
            return f"{advice} ({detail})"
    return detail


class Folder:
    """One folder (local path or URL) and the files below it, by relative name."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, staging: str | None = ATTEMPTS):
        """`staging`: where local files are written before their rename, relative to the folder;
        None stages each file beside its final name, hidden (`.NAME.RANDOM.tmp`)."""
        self.url = str(url).rstrip("/")
        self.storage_options = storage_options or {}
        self.staging = staging
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
        """Several small files in one go (object stores fetch them concurrently); those that
        are gone (deleted since they were listed) are left out."""
        paths = [self.path(n) for n in names]
        # Not fs.cat: it expands `[`, `*` and `?` in paths as globs, so a folder named `out[1]`
        # would read its sibling `out1`'s files. cat_ranges reads each path as it is.
        found = self.fs.cat_ranges(paths, [None] * len(paths), [None] * len(paths), on_error="return")
        contents = {}
        for name, data in zip(names, found):
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, BaseException):
                raise data
            contents[name] = data
        return contents

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
            folder, base = posixpath.split(name)
            staged = f"{self.staging}/{uuid.uuid4().hex}-{base}.tmp" if self.staging else f"{folder}/.{base}.{uuid.uuid4().hex[:8]}.tmp"
            staging = self.path(staged.lstrip("/"))
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
        """Delete one file, if it is there. (Not fs.rm, which expands `[`, `*` and `?` as globs
        and deleted a sibling folder's file on S3.)"""
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    def clear_attempts(self) -> int:
        """Delete what interrupted local writes left in the staging folder; returns how many files."""
        if not self.is_local or not self.staging or not os.path.isdir(self.path(self.staging)):
            return 0
        leftovers = os.listdir(self.path(self.staging))
        for name in leftovers:
            os.remove(self.path(f"{self.staging}/{name}"))
        return len(leftovers)
