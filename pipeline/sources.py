"""Step 1 of the data path, second half: read one input shard as a stream of samples; the types
shards and samples travel in (`Shard`, `Record`, `SourceError`, `ShardError`).

Shards (found by `pipeline.listing`) live at any fsspec URL (local paths, file://, s3://, gs://,
hf://, ...) in one of three formats:

- "webdataset": tar shards as img2dataset writes them (`KEY.jpg` beside `KEY.json`, `KEY.txt`);
- "parquet": Parquet files with an image column (raw bytes, or the Hugging Face {bytes, path} struct);
- "images": plain image files, grouped `images_per_shard` at a time so the unit of work is a shard.

Sample keys are stable and unique within a job: webdataset `"<shard stem>/<sample key>"`; parquet
the `key`, `__key__` or `id` column, else `"<file stem>/<row index>"`; images the file's path below
the input folder (the folder all input entries share). Shard stems must differ, or keys could
collide: `list_shards` checks.

Contract: `read_shard` streams: a tar is read member by member (`r|*`), Parquet batch by batch.
It never raises for damaged data. Each sample that cannot be read becomes a `Record` with
`data=None` and `error="reason_code: message"` (`missing_image`, `missing_file`, `read_failed`,
`image_too_large`); damage to the shard itself (truncated tar, not a tar, unreadable Parquet,
shard file gone since listing) ends the stream with one record marked `shard_failure`, keyed
`"<shard stem>/__shard__"`, whose error is `"shard_unreadable: ..."` (or `"shard_ungrouped: ..."`,
see `_TarSamples`). It raises `ShardError` only when the storage fails (network, throttling,
the service's own errors, permissions, missing filesystem package): the shard is then not done
and should be retried whole.
"""

from __future__ import annotations

import errno
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage import error_chain

# What `decode` reads (HEIF only where a plugin for PIL is registered, else an unsupported_format
# row): the WebDataset image extensions, and those of photos and scans found in folders.
IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "jfif", "png", "webp", "avif", "heic", "heif", "bmp", "gif", "tif", "tiff",
     "ppm", "pgm", "pbm", "pnm"}
)

IMAGE_COLUMNS = ("image", "jpg", "png", "img")  # tried in this order, case-insensitively
KEY_COLUMNS = ("key", "__key__", "id")

MAX_TEXT_BYTES = 1 << 20  # larger non-image tar members are not metadata; they are skipped unread
MAX_IMAGE_BYTES = 256 << 20  # an image (tar member or file) larger than this is an error, not a memory spike
_TAR_BLOCK_SIZE = 16 << 20  # read-ahead for streaming tars from object stores
_PARQUET_BATCH_ROWS = 64  # image rows are large: keep batches small


class SourceError(ValueError):
    """The input paths cannot be turned into shards; the message names the path and why."""


class ShardError(RuntimeError):
    """The storage holding a shard failed (network, credentials): retry the shard whole."""


@dataclass(frozen=True)
class Shard:
    """One unit of work. `uri` has its scheme unless local; "images" shards list their `files`
    and have a stable id `"<root>#00000"` as `uri`."""

    uri: str
    format: str
    files: tuple[str, ...] = ()


SHARD_FAILURE_REASONS = ("shard_unreadable", "shard_ungrouped")  # only shard-failure records carry these


def is_shard_failure(error: str | None) -> bool:
    """Whether an output row's `error` reports damage to its shard rather than to one sample."""
    return error is not None and error.split(":", 1)[0] in SHARD_FAILURE_REASONS


@dataclass
class Record:
    """One sample. `data` is None exactly when `error` ("reason_code: message") is set; `key`
    and `error` are valid UTF-8 (see `valid_utf8`). `shard_failure` marks the record that reports damage to the shard itself (its key ends in
    `/__shard__`, but so may a sample's)."""

    key: str
    source: str
    data: bytes | None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    shard_failure: bool = False

    def __post_init__(self) -> None:
        # Text that names the sample (`source` stays the path it can be opened by).
        self.key = valid_utf8(self.key)
        if self.error is not None:
            self.error = valid_utf8(self.error)


def valid_utf8(text: str) -> str:
    """`text` as valid UTF-8, which Arrow and Parquet require. Names from tar headers and file
    systems come in any encoding, and Python keeps the bytes it could not decode as lone
    surrogates (`caf\\udce9`); they are written as `\\xNN` (`caf\\xe9`), the same on every run, so
    keys stay stable across reruns."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte, e.g. from JSON's "\ud800"
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def shard_stem(uri: str) -> str:
    """`s3://b/shards/00042.tar` -> `00042`: the prefix of every key read from that shard."""
    name = posixpath.basename(uri.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar", ".parquet"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name else name


def join_url(folder_url: str, relative: str) -> str:
    """`relative` joined to a folder URL, `.` and `..` resolved, the scheme kept."""
    scheme, sep, folder = folder_url.rpartition("://")
    return f"{scheme}{sep}{posixpath.normpath(posixpath.join(folder, relative))}"


# --- reading ------------------------------------------------------------------------------------


def read_shard(
    shard: Shard, storage_options: dict | None = None, image_column: str | None = None
) -> Iterator[Record]:
    """Stream the samples of one shard (see the module docstring for the error contract)."""
    options = storage_options or {}
    if shard.format == "webdataset":
        return _read_webdataset(shard.uri, options)
    if shard.format == "parquet":
        return _read_parquet(shard.uri, options, image_column)
    if shard.format == "images":
        return _read_images(shard, options)
    raise SourceError(f"{shard.uri}: unknown shard format {shard.format!r}")


def _read_webdataset(uri: str, options: dict) -> Iterator[Record]:
    fs, path = _shard_filesystem(uri, options)
    samples = _TarSamples(uri)
    problem = None
    try:
        with (
            fs.open(path, "rb", block_size=_TAR_BLOCK_SIZE) as f,
            tarfile.open(fileobj=f, mode="r|*") as tar,
        ):
            for member in tar:
                tar.members = []  # stream mode keeps every header otherwise: memory grows with the shard
                key, ext = _split_member_name(member.name)
                if key is None or not member.isfile():
                    continue
                yield from samples.add(key, ext, _read_member(tar, member, ext))
            # Stream mode ends quietly when the file stops inside (or right before) a header; a
            # whole tar ends with a zero block, which the stream has then read in full.
            if tar.fileobj.pos < tar.offset + tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"unexpected end of data: the tar stops at byte {tar.fileobj.pos} without its end-of-archive block")
    except Exception as err:  # noqa: BLE001  (tarfile, gzip, zlib and the storage all raise their own)
        _raise_if_storage_failed(err, fs, uri)
        problem = f"{type(err).__name__}: {err}"
    yield from samples.finish(problem)


def _is_image_extension(ext: str) -> bool:
    """By its last part, as WebDataset's decoders do: `seg.png` and `2021.jpg` are images."""
    return ext.rpartition(".")[2].lower() in IMAGE_EXTENSIONS


def _split_member_name(name: str) -> tuple[str | None, str]:
    """`dir/000123.seg.png` -> (`dir/000123`, `seg.png`): the key ends at the basename's first dot
    (the WebDataset convention). Hidden members such as macOS `._000123.jpg` have no key."""
    folder, _, base = valid_utf8(name).removeprefix("./").rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _read_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str
) -> bytes | str | _Json | _TooLarge | None:
    """Image bytes; text metadata (json parsed); or None for members we do not keep."""
    if _is_image_extension(ext):
        if member.size > MAX_IMAGE_BYTES:
            return _TooLarge(member.size)
        return tar.extractfile(member).read()
    if member.size > MAX_TEXT_BYTES:
        return None
    raw = tar.extractfile(member).read()
    if ext == "json":
        try:
            return _Json(json.loads(raw))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return _Json(raw.decode("utf-8", "replace"), error=str(err))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # Captions deserve a best effort; other binary members (.npy, .cls ...) are not metadata.
        return raw.decode("utf-8", "replace") if ext == "txt" else None


@dataclass
class _Json:
    value: Any
    error: str | None = None


@dataclass
class _TooLarge:
    size: int


@dataclass
class _Sample:
    """The members of one key. Of several image members, one plain `KEY.jpg` wins over any
    `KEY.seg.png` / `KEY.2021.jpg` (the sample's picture, not a mask or a depth map beside it);
    among equals the first in the tar wins; the others are ignored."""

    key: str
    image: bytes | None = None
    image_error: str | None = None
    image_rank: int = 2  # 0: the image came from a plain extension, 1: a compound one, 2: none yet
    metadata: dict[str, Any] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)

    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_error is not None

    def add(self, ext: str, value: Any) -> None:
        self.members.append(ext)  # also the members not kept: a key never vanishes unreported
        if isinstance(value, (bytes, _TooLarge)):
            self._offer_image(ext, value)
        elif isinstance(value, _Json):
            self.metadata["json"] = value.value
            if value.error:
                self.metadata["json_error"] = value.error
        elif value is not None:
            self.metadata[ext] = value

    def _offer_image(self, ext: str, value: bytes | _TooLarge) -> None:
        rank = 1 if "." in ext else 0
        if rank >= self.image_rank:
            return
        self.image_rank = rank
        if isinstance(value, _TooLarge):
            self.image, self.image_error = None, f"image_too_large: {self.key}.{ext} is {value.size} bytes"
        else:
            self.image, self.image_error = value, None

    def merge(self, later: _Sample) -> _Sample:
        """Join a later run of this key to this one, which (waiting for its image) has none."""
        self.members += later.members
        self.image, self.image_error, self.image_rank = later.image, later.image_error, later.image_rank
        self.metadata.update(later.metadata)
        return self


class _TarSamples:
    """Group tar members into samples and account for every one of them.

    A sample is a run of consecutive members that share a key (the WebDataset convention, which
    img2dataset and `webdataset.TarWriter` follow). Tars made by hand are often not grouped:
    - metadata seen before its image is small, so it waits and is joined to the image later;
    - members of a sample already emitted cannot be joined without holding every image in
      memory: they are dropped, counted and reported on a final `shard_ungrouped` record;
    - a key whose image never comes (only metadata, or members not kept, like `.npy`) becomes a
      `missing_image` record at the end.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.stem = shard_stem(uri)
        self.current: _Sample | None = None
        self.waiting: dict[str, _Sample] = {}  # metadata only, image not seen yet
        self.emitted: set[str] = set()
        self.late: list[str] = []  # "key.ext" of members whose sample was already emitted

    def add(self, key: str, ext: str, value: Any) -> Iterator[Record]:
        if self.current is not None and self.current.key != key:
            yield from self._close_current()
        if self.current is None:
            self.current = _Sample(key)
        self.current.add(ext, value)

    def finish(self, problem: str | None) -> Iterator[Record]:
        yield from self._close_current()
        for sample in self.waiting.values():
            error = f"missing_image: no image member (found: {', '.join(sample.members)})"
            yield self._record(sample.key, None, sample.metadata, error)
        late = ""
        if self.late:
            late = (
                f"{len(self.late)} members came after their sample was emitted (tar not grouped by "
                f"key), e.g. {', '.join(self.late[:3])}"
            )
        if problem:
            error = f"shard_unreadable: {problem}" + (f"; {late}" if late else "")
        elif late:
            error = f"shard_ungrouped: {late}"
        else:
            return
        counts = {"samples": len(self.emitted), "late_members": len(self.late)}
        yield Record(f"{self.stem}/__shard__", self.uri, None, counts, error, shard_failure=True)

    def _close_current(self) -> Iterator[Record]:
        sample, self.current = self.current, None
        if sample is None:
            return
        if sample.key in self.emitted:
            self.late += [f"{sample.key}.{ext}" for ext in sample.members]
            return
        if sample.key in self.waiting:
            sample = self.waiting.pop(sample.key).merge(sample)
        if not sample.has_image:
            self.waiting[sample.key] = sample
            return
        self.emitted.add(sample.key)
        yield self._record(sample.key, sample.image, sample.metadata, sample.image_error)

    def _record(self, key: str, data: bytes | None, metadata: dict, error: str | None) -> Record:
        return Record(f"{self.stem}/{key}", self.uri, data, metadata, error)


def parquet_schema(uri: str, options: dict[str, Any]) -> pa.Schema:
    """The Arrow schema of a Parquet shard, from its footer alone."""
    fs, path = _shard_filesystem(uri, options)
    with fs.open(path, "rb", cache_type="none") as f:
        return pq.ParquetFile(f).schema_arrow


def _read_parquet(uri: str, options: dict, wanted_column: str | None) -> Iterator[Record]:
    fs, path = _shard_filesystem(uri, options)
    stem, folder, rows = shard_stem(uri), posixpath.dirname(uri), 0
    problem = None
    try:
        # No read-ahead cache: Parquet reads exact column-chunk ranges, read-ahead would fetch more.
        with fs.open(path, "rb", cache_type="none") as f:
            parquet = pq.ParquetFile(f)
            column = image_column(parquet.schema_arrow, wanted_column)
            names = parquet.schema_arrow.names
            key_column = next((c for c in KEY_COLUMNS if c in names and c != column), None)
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                images = batch.column(column).to_pylist()
                for cell, metadata in zip(images, batch.drop_columns([column]).to_pylist()):
                    key = metadata.get(key_column) if key_column else None
                    key = str(key) if key is not None else f"{stem}/{rows}"
                    data, error = _image_cell(cell, folder, options)
                    yield Record(key, uri, data, metadata, error)
                    rows += 1
    except ShardError:  # an image file a cell names failed in storage
        raise
    except Exception as err:  # noqa: BLE001  (pyarrow and the storage raise many kinds)
        _raise_if_storage_failed(err, fs, uri)
        problem = f"{type(err).__name__}: {err}"
    if problem:
        yield Record(f"{stem}/__shard__", uri, None, {"rows": rows}, f"shard_unreadable: {problem}", shard_failure=True)


def image_column(schema: pa.Schema, wanted: str | None) -> str:
    if wanted:
        if wanted not in schema.names:
            raise ValueError(f"no column {wanted!r} (columns: {', '.join(schema.names)})")
        return wanted
    candidates = [f.name for f in schema if _holds_image_bytes(f.type)]
    for name in IMAGE_COLUMNS:
        for candidate in candidates:
            if candidate.lower() == name:
                return candidate
    if candidates:
        return candidates[0]
    raise ValueError(
        "no image column: no binary or {bytes, path} column "
        f"(columns: {', '.join(schema.names)}); set image_column"
    )


def _holds_image_bytes(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and _holds_image_bytes(kind.field(index).type)
    return False


def _image_cell(cell: Any, folder: str, options: dict) -> tuple[bytes | None, str | None]:
    """Bytes from a binary cell or a Hugging Face image struct; a struct (or string) holding only
    a path is read from that path, relative to the Parquet file's folder."""
    path = None
    if isinstance(cell, dict):
        cell, path = cell.get("bytes"), cell.get("path")
    elif isinstance(cell, str):
        cell, path = None, cell
    if cell is not None:
        return bytes(cell), None
    if not path:
        return None, "missing_image: the image cell is empty"
    url = path if "://" in path or path.startswith("/") else join_url(folder, path)
    try:
        fs, file_path = url_to_fs(url, **options)
    except ImportError as err:  # the scheme's package is not installed: no cell of it can be read
        raise ShardError(f"{url}: no filesystem for this URL ({err})") from err
    except Exception as err:  # noqa: BLE001  (a cell naming an unknown scheme is bad data)
        return None, f"missing_file: image path {url} could not be read ({type(err).__name__}: {err})"
    try:
        data = _read_image_file(fs, file_path)
    except Exception as err:  # noqa: BLE001
        _raise_if_storage_failed(err, fs, url)
        return None, f"missing_file: image path {url} could not be read ({type(err).__name__}: {err})"
    if isinstance(data, _TooLarge):
        return None, f"image_too_large: image path {url} is {data.size} bytes"
    return data, None


def _read_images(shard: Shard, options: dict) -> Iterator[Record]:
    root = shard.uri.rsplit("#", 1)[0]
    prefix = root if root.endswith("/") or not root else root + "/"
    for url in shard.files:
        key = url[len(prefix) :] if prefix and url.startswith(prefix) else url
        fs, path = _shard_filesystem(url, options)
        try:
            data = _read_image_file(fs, path)
        except Exception as err:  # noqa: BLE001
            _raise_if_storage_failed(err, fs, url)
            reason = "missing_file" if isinstance(err, FileNotFoundError) else "read_failed"
            yield Record(key, url, None, {}, f"{reason}: {type(err).__name__}: {err}")
            continue
        if isinstance(data, _TooLarge):
            yield Record(key, url, None, {}, f"image_too_large: {key} is {data.size} bytes")
        else:
            yield Record(key, url, data, {}, None)


def _read_image_file(fs: fsspec.AbstractFileSystem, path: str) -> bytes | _TooLarge:
    """An image file's bytes; its size instead, unread, when it is over `MAX_IMAGE_BYTES` (as for
    tar members: an error, not a memory spike). On object stores the size costs a HEAD request."""
    size = fs.size(path)
    if size is not None and size > MAX_IMAGE_BYTES:
        return _TooLarge(size)
    return fs.cat_file(path)


def _shard_filesystem(uri: str, options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return url_to_fs(uri, **options)
    except Exception as err:  # noqa: BLE001  (e.g. a missing fsspec backend: nothing can be read)
        raise ShardError(f"{uri}: no filesystem for this URL ({err})") from err


def _raise_if_storage_failed(err: Exception, fs: fsspec.AbstractFileSystem, uri: str) -> None:
    """Storage failures may pass on a retry; damaged bytes never will, so only the first raise."""
    if isinstance(fs, LocalFileSystem) or isinstance(err, FileNotFoundError):
        return
    if any(_is_storage_error(e) for e in error_chain(err)):
        raise ShardError(f"{uri}: storage failed ({type(err).__name__}: {err})") from err


def _is_storage_error(err: BaseException) -> bool:
    """Whether one error of a chain comes from the storage rather than from the bytes it served.
    s3fs, once its own retries are spent, raises a plain OSError (EBUSY for SlowDown or 503,
    EREMOTEIO for InternalError) from botocore's error: neither its type nor its module say
    "storage", its errno and its cause do."""
    if isinstance(err, _STORAGE_ERRORS) or type(err).__module__.split(".")[0] in _STORAGE_LIBRARIES:
        return True
    return isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS


_STORAGE_ERRORS = (ConnectionError, TimeoutError, PermissionError)
_STORAGE_LIBRARIES = frozenset(
    {"botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "azure", "aiohttp", "requests", "urllib3",
     "fsspec", "google", "huggingface_hub"}
)
# What a remote filesystem's OSError carries when the service, not the data, failed.
_STORAGE_ERRNOS = frozenset(
    {errno.EBUSY, errno.EREMOTEIO, errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.EAGAIN}
)
