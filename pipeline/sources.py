"""Step 1 of the data path: find the input shards, then read each one as a stream of samples.

Inputs live at any fsspec URL (local paths, file://, s3://, gs://, hf://, ...) in one of three formats:

- "webdataset": tar shards as img2dataset writes them (`KEY.jpg` beside `KEY.json`, `KEY.txt`);
- "parquet": Parquet files with an image column (raw bytes, or the Hugging Face {bytes, path} struct);
- "images": plain image files, grouped `images_per_shard` at a time so the unit of work is a shard.

An input path is a brace range (`shards/{00000..00999}.tar`), a glob (`shards/*.tar`), a folder
(searched recursively for the format's files, hidden files skipped), a list file (a `.txt` whose
lines are paths or URLs; relative ones are relative to the list file's folder; blank lines and
`# comments` skipped), a single file, or a list of any of these.

Sample keys are stable and unique within a job: webdataset `"<shard stem>/<sample key>"`; parquet
the `key`, `__key__` or `id` column, else `"<file stem>/<row index>"`; images the file's path below
the input folder (the folder all input entries share). Shard stems must differ, or keys could
collide: `list_shards` checks.

Contracts:
- `list_shards` raises `SourceError` (a ValueError naming the path) when a path does not exist,
  nothing matches, the format is unknown, or the storage cannot be reached or listed.
- `read_shard` streams: a tar is read member by member (`r|*`), Parquet batch by batch.
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
import os
import posixpath
import re
import tarfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage import error_chain, storage_error_cause

FORMATS = ("webdataset", "parquet", "images")
# What `decode` reads (HEIF only where a plugin for PIL is registered, else an unsupported_format
# row): the WebDataset image extensions, and those of photos and scans found in folders.
IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "jfif", "png", "webp", "avif", "heic", "heif", "bmp", "gif", "tif", "tiff",
     "ppm", "pgm", "pbm", "pnm"}
)
_SUFFIXES = {
    "webdataset": (".tar", ".tar.gz", ".tgz"),
    "parquet": (".parquet",),
    "images": tuple(f".{ext}" for ext in sorted(IMAGE_EXTENSIONS)),
}
LIST_FILE_SUFFIX = ".txt"

IMAGE_COLUMNS = ("image", "jpg", "png", "img")  # tried in this order, case-insensitively
KEY_COLUMNS = ("key", "__key__", "id")

MAX_TEXT_BYTES = 1 << 20  # larger non-image tar members are not metadata; they are skipped unread
MAX_IMAGE_BYTES = 256 << 20  # an image (tar member or file) larger than this is an error, not a memory spike
MAX_BRACE_EXPANSION = 1_000_000
_TAR_BLOCK_SIZE = 16 << 20  # read-ahead for streaming tars from object stores
_PARQUET_BATCH_ROWS = 64  # image rows are large: keep batches small
_GLOB_CHARS = re.compile(r"[*?\[]")
_WILDCARDS = re.compile(r"[*?\[{]")  # glob characters and braces


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


# --- listing ------------------------------------------------------------------------------------


def list_shards(
    path: str | list[str],
    format: str,
    storage_options: dict | None = None,
    images_per_shard: int = 1000,
) -> list[Shard]:
    """All shards under `path` (see the module docstring for path forms), sorted and de-duplicated."""
    if format not in FORMATS:
        raise SourceError(f"unknown input format {format!r}: expected one of {', '.join(FORMATS)}")
    if images_per_shard < 1:
        raise SourceError(f"images_per_shard must be at least 1, not {images_per_shard}")
    entries = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not entries:
        raise SourceError("no input path given")
    options = storage_options or {}
    for entry in entries:  # fsspec caches listings: this one must see shards written since the last
        _filesystem(str(entry), options)[0].invalidate_cache()
    found = {str(entry): _find(str(entry), format, options) for entry in entries}

    if format == "images":
        shards = _image_shards(found, images_per_shard, options)
    else:
        uris = sorted({uri for files in found.values() for uri in files})
        _check_unique_stems(uris)
        shards = [Shard(uri, format) for uri in uris]
    _check_utf8_names(shards)
    return shards


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: `{a,b}` lists, `{0..10}` / `{00000..00999}` / `{0..10..2}`
    ranges (zero padding kept), several and nested braces. Braces that are neither stay literal.
    A pattern that would give over `MAX_BRACE_EXPANSION` paths is refused before any is made."""
    count = _expansion_count(pattern, {})
    if count > MAX_BRACE_EXPANSION:
        raise SourceError(f"{pattern}: expands to over {MAX_BRACE_EXPANSION} paths ({count})")
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
    group = _first_brace_group(pattern)
    if group is None:
        return [pattern]
    start, end, alternatives = group
    head, tail = pattern[:start], pattern[end + 1 :]
    expanded, tails = [], None
    for alt in alternatives:
        if "{" in alt:  # a nested group: it and the tail expand together
            expanded += [head + x for x in _expand(alt + tail)]
            continue
        tails = _expand(tail) if tails is None else tails  # the same for every plain alternative
        expanded += [head + alt + x for x in tails]
    return expanded


def _expansion_count(pattern: str, known: dict[str, int]) -> int:
    """How many paths `_expand(pattern)` gives, without making them. An alternative without
    braces gives as many as the tail after its group, so ranges cost one count of their tail,
    and `known` counts each tail once however many alternatives share it."""
    if pattern not in known:
        group = _first_brace_group(pattern)
        if group is None:
            known[pattern] = 1
        else:
            _, end, alternatives = group
            tail = pattern[end + 1 :]
            braced = [] if isinstance(alternatives, _Numbers) else [alt for alt in alternatives if "{" in alt]
            plain = len(alternatives) - len(braced)
            known[pattern] = plain * _expansion_count(tail, known) + sum(
                _expansion_count(alt + tail, known) for alt in braced
            )
    return known[pattern]


def _first_brace_group(pattern: str) -> tuple[int, int, Sequence[str]] | None:
    """The first `{...}` that expands: its span and its alternatives."""
    search_from = 0
    while (start := pattern.find("{", search_from)) >= 0:
        depth, commas = 0, []
        for i in range(start, len(pattern)):
            if pattern[i] == "{":
                depth += 1
            elif pattern[i] == "}":
                depth -= 1
                if depth == 0:
                    break
            elif pattern[i] == "," and depth == 1:
                commas.append(i)
        else:
            return None  # unbalanced: the rest is literal
        end, inner = i, pattern[start + 1 : i]
        if commas:
            bounds = [start, *commas, end]
            return start, end, [pattern[a + 1 : b] for a, b in zip(bounds, bounds[1:])]
        if (numbers := _numeric_range(inner)) is not None:
            return start, end, numbers
        search_from = start + 1  # a literal brace, e.g. "{name}"
    return None


@dataclass(frozen=True)
class _Numbers(Sequence[str]):
    """A brace range's numbers as text, made one at a time: `{0..99999999}` costs nothing to count."""

    numbers: range
    width: int

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]  (no slices needed)
        return f"{self.numbers[index]:0{self.width}d}"


def _numeric_range(inner: str) -> _Numbers | None:
    match = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?", inner)
    if not match:
        return None
    first, last = int(match[1]), int(match[2])
    step = abs(int(match[3] or 1)) or 1
    # Like bash: a leading zero on either end pads every number to the longer end's width.
    padded = any(re.match(r"-?0\d", end) for end in (match[1], match[2]))
    width = max(len(match[1]), len(match[2])) if padded else 0
    numbers = range(first, last + 1, step) if first <= last else range(first, last - 1, -step)
    return _Numbers(numbers, width)


def _find(entry: str, fmt: str, options: dict) -> list[str]:
    """The URLs of the files one input entry names."""
    with _listing_errors(entry):
        files: list[str] = []
        concrete: list[str] = []
        for pattern in expand_braces(os.path.expanduser(entry)):
            if not _GLOB_CHARS.search(pattern):
                concrete.append(pattern)
                continue
            fs, path = _filesystem(pattern, options)
            matches = fs.glob(path, detail=True)
            files += [_url(fs, p) for p, info in matches.items() if _wanted(p, info, fmt)]
        files += _expand_concrete(concrete, fmt, options, entry, list_files=True)
        if not files:
            suffixes = ", ".join(_SUFFIXES[fmt])
            raise SourceError(f"{entry}: no {fmt} files found ({suffixes}){_why_empty(entry, options)}")
        return files


def _why_empty(entry: str, options: dict) -> str:
    """A glob over a missing folder or bucket matches nothing without an error: find out which."""
    if not _WILDCARDS.search(entry):
        return ""
    fs, folder = _filesystem(_fixed_folder(entry), options)
    try:
        fs.info(folder)
    except FileNotFoundError as err:
        why = f" ({err})" if str(err) and folder not in str(err) else ""
        return f": {_url(fs, folder)} does not exist{why}"
    return ""


def _expand_concrete(
    urls: list[str], fmt: str, options: dict, entry: str, list_files: bool
) -> list[str]:
    """Files for paths without wildcards: each must exist; folders are searched, list files read."""
    by_fs: dict[int, tuple[fsspec.AbstractFileSystem, list[str]]] = {}
    for url in urls:
        fs, path = _filesystem(url, options)
        by_fs.setdefault(id(fs), (fs, []))[1].append(path)

    files: list[str] = []
    for fs, paths in by_fs.values():
        infos, why_missing = _stat_many(fs, paths)
        missing = [p for p in paths if p not in infos]
        if missing:
            shown = [_url(fs, p) for p in missing]
            raise SourceError(_missing_message(entry, shown, len(paths), why_missing[missing[0]]))
        for path in paths:
            if infos[path]["type"] == "directory":
                found = fs.find(path, detail=True)
                files += [_url(fs, p) for p, info in found.items() if _wanted(p, info, fmt, under=path)]
            elif list_files and path.endswith(LIST_FILE_SUFFIX):
                lines = _read_list_file(fs, path)
                files += _expand_concrete(lines, fmt, options, entry, list_files=False)
            else:
                files.append(_url(fs, path))
    return files


def _stat_many(
    fs: fsspec.AbstractFileSystem, paths: list[str]
) -> tuple[dict[str, dict], dict[str, str]]:
    """`fs.info` of each existing path, and the storage's word on each missing one. A folder that
    holds several of the paths is listed once: a 1000-shard brace range costs one request."""
    by_parent: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        by_parent[posixpath.dirname(path.rstrip("/"))].append(path)
    infos: dict[str, dict] = {}
    why_missing: dict[str, str] = {}
    for parent, group in by_parent.items():
        try:
            if len(group) == 1:
                infos[group[0]] = fs.info(group[0])
                continue
            listing = {info["name"].rstrip("/"): info for info in fs.ls(parent, detail=True)}
        except FileNotFoundError as err:  # e.g. s3fs: "The specified bucket does not exist"
            why_missing.update((p, str(err)) for p in group)
            continue
        infos.update((p, listing[p.rstrip("/")]) for p in group if p.rstrip("/") in listing)
    return infos, defaultdict(str, why_missing)


def _missing_message(entry: str, missing: list[str], wanted: int, why: str) -> str:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    # Keep the storage's reason ("The specified bucket does not exist") unless it only repeats the path.
    repeats_path = why in missing[0] or missing[0].split("://")[-1] in why
    detail = f" ({why})" if why and not repeats_path else ""
    if wanted == 1:
        what = "" if shown == entry else f" {shown}"
        return f"{entry}:{what} does not exist{detail}"
    hint = "; a glob takes only the shards that exist" if "{" in entry else ""
    return f"{entry}: {len(missing)} of {wanted} paths do not exist: {shown}{detail}{hint}"


def _read_list_file(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The URLs a list file names; relative lines are relative to the list file's folder."""
    folder = _url(fs, posixpath.dirname(path))
    try:
        text = fs.cat_file(path).decode("utf-8-sig")  # a BOM, as Windows editors write, is not part of a path
    except UnicodeDecodeError as err:
        message = f"a list file must be UTF-8 text, one path a line ({err})"
        raise SourceError(f"{_url(fs, path)}: {message}") from None
    urls = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "://" in line or line.startswith(("/", "~")):
            urls.append(os.path.expanduser(line))
        else:
            urls.append(_join(folder, line))
    return urls


def _join(folder_url: str, relative: str) -> str:
    scheme, sep, folder = folder_url.rpartition("://")
    return f"{scheme}{sep}{posixpath.normpath(posixpath.join(folder, relative))}"


def _wanted(path: str, info: dict, fmt: str, under: str = "") -> bool:
    """A file of the format, not hidden (macOS `._x.jpg` files are not images) below `under`."""
    relative = path[len(under) :] if under and path.startswith(under) else posixpath.basename(path)
    hidden = any(part.startswith(".") for part in relative.split("/"))
    return info.get("type") == "file" and not hidden and path.lower().endswith(_SUFFIXES[fmt])


def _image_shards(found: dict[str, list[str]], per_shard: int, options: dict) -> list[Shard]:
    roots = []
    for entry in found:
        with _listing_errors(entry):
            roots.append(_root_of(entry, options))
    root = _common_root(roots)
    files = sorted({f for files in found.values() for f in files})
    return [
        Shard(f"{root}#{number:05d}", "images", tuple(files[start : start + per_shard]))
        for number, start in enumerate(range(0, len(files), per_shard))
    ]


def _root_of(entry: str, options: dict) -> str:
    """The folder an entry's image keys are relative to: the folder itself, a list file's or a
    single file's folder, or the fixed part of a brace or glob pattern."""
    if _WILDCARDS.search(entry):
        fs, path = _filesystem(_fixed_folder(entry), options)
        return _url(fs, path.rstrip("/") or "/")
    fs, path = _filesystem(os.path.expanduser(entry), options)
    return _url(fs, path if fs.isdir(path) else posixpath.dirname(path))


def _fixed_folder(pattern: str) -> str:
    """`s3://b/shards/{0..9}/*.tar` -> `s3://b/shards/`: the folder before the first wildcard."""
    pattern = os.path.expanduser(pattern)
    fixed = pattern[: _WILDCARDS.search(pattern).start()]
    return fixed[: fixed.rfind("/") + 1] or "."


def _common_root(roots: list[str]) -> str:
    """The deepest folder above all roots, so keys from several input folders stay unique."""
    if len(set(roots)) == 1:
        return roots[0]
    parts = os.path.commonprefix([root.rstrip("/").split("/") for root in roots])
    if parts and parts[0].endswith(":") and len(parts) < 3:  # URLs sharing only their scheme
        return parts[0] + "//" if len(parts) == 2 else ""
    return "/".join(parts) or ("/" if parts == [""] else "")


def _check_unique_stems(uris: list[str]) -> None:
    """Sample keys start with the shard's stem: two shards with one stem could give one key twice."""
    seen: dict[str, str] = {}
    for uri in uris:
        stem = shard_stem(uri)
        if stem in seen:
            raise SourceError(
                f"shards {seen[stem]} and {uri} share the name {stem!r}: their keys could collide"
            )
        seen[stem] = uri


def _check_utf8_names(shards: list[Shard]) -> None:
    """A shard's name travels in every row (Arrow text, UTF-8 only) and identifies it in the
    output's commits: it cannot be escaped the way keys are without losing the way back to the
    file. (Image files' own names can: their shard is named by their folder.)"""
    for shard in shards:
        if valid_utf8(shard.uri) != shard.uri:
            raise SourceError(f"{valid_utf8(shard.uri)}: the name is not valid UTF-8: rename it")


def shard_stem(uri: str) -> str:
    """`s3://b/shards/00042.tar` -> `00042`: the prefix of every key read from that shard."""
    name = posixpath.basename(uri.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar", ".parquet"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name else name


@contextmanager
def _listing_errors(entry: str) -> Iterator[None]:
    """Turn whatever the storage raised into a SourceError that names the path and the cause."""
    try:
        yield
    except SourceError:
        raise
    except FileNotFoundError as err:
        raise SourceError(f"{entry}: does not exist ({err})") from err
    except Exception as err:  # noqa: BLE001  (botocore, aiohttp, gcsfs, hf... all raise their own)
        raise SourceError(f"{entry}: cannot be listed: {storage_error_cause(err)}") from err


def _filesystem(url: str, options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, path = url_to_fs(url, **options)
    except (ImportError, ValueError) as err:  # e.g. gs:// without gcsfs, or an unknown scheme
        raise SourceError(f"{url}: no filesystem for this URL ({err})") from err
    if isinstance(fs, LocalFileSystem):
        # One local file has one name: `/d/./x.jpg` or `/d//x.jpg` must not be a second image
        # (a second key) beside `/d/x.jpg`, nor miss it in a listing of `/d`. Object stores keep
        # `.` and `//` in keys as they are.
        path = posixpath.normpath(path)
    return fs, path


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


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


def _read_parquet(uri: str, options: dict, image_column: str | None) -> Iterator[Record]:
    fs, path = _shard_filesystem(uri, options)
    stem, folder, rows = shard_stem(uri), posixpath.dirname(uri), 0
    problem = None
    try:
        # No read-ahead cache: Parquet reads exact column-chunk ranges, read-ahead would fetch more.
        with fs.open(path, "rb", cache_type="none") as f:
            parquet = pq.ParquetFile(f)
            column = _image_column(parquet.schema_arrow, image_column)
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


def _image_column(schema: pa.Schema, wanted: str | None) -> str:
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
    url = path if "://" in path or path.startswith("/") else _join(folder, path)
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
