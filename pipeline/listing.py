"""Step 1 of the data path, first half: turn input paths into shards, the units of work.

An input path is a brace range (`shards/{00000..00999}.tar`), a glob (`shards/*.tar`), a folder
(searched recursively for the format's files, hidden files skipped), a list file (a `.txt` whose
lines are paths or URLs; relative ones are relative to the list file's folder; blank lines and
`# comments` skipped), a single file, or a list of any of these, at any fsspec URL. The formats
and what each shard holds are `pipeline.sources`'s; "images" files are grouped `images_per_shard`
at a time, and their keys are paths below the folder all input entries share.

Contract: `list_shards` raises `SourceError` (a ValueError naming the path) when a path does not
exist, nothing matches, the format is unknown, two shards share a stem (their keys could collide),
or the storage cannot be reached or listed.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.sources import IMAGE_EXTENSIONS, Shard, SourceError, join_url, shard_stem, valid_utf8
from pipeline.storage import storage_error_cause

FORMATS = ("webdataset", "parquet", "images")
_SUFFIXES = {
    "webdataset": (".tar", ".tar.gz", ".tgz"),
    "parquet": (".parquet",),
    "images": tuple(f".{ext}" for ext in sorted(IMAGE_EXTENSIONS)),
}
LIST_FILE_SUFFIX = ".txt"
MAX_BRACE_EXPANSION = 1_000_000
_GLOB_CHARS = re.compile(r"[*?\[]")
_WILDCARDS = re.compile(r"[*?\[{]")  # glob characters and braces


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
            urls.append(join_url(folder, line))
    return urls


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
