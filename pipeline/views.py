"""Step 5 of the data path: what is derived from the committed data files, for dataset builders.

    OUTPUT/part-X.parquet                     every row: the commit (pipeline.sink)
    OUTPUT/__dataset__/filtered/part-X.parquet  the rows output.filter keeps (no error, none of its flags),
                                              and in them the `captions` it keeps
    OUTPUT/__dataset__/webdataset/part-X.tar    the ok rows as WebDataset samples (output.webdataset)
    OUTPUT/__dataset__/README.md              the dataset card (pipeline.card), once the job is complete
    OUTPUT/.gitcap/views/part-X.json          which version of part-X.parquet its views were built
                                              from, with which settings, and its statistics

Why `__dataset__`: every reader of OUTPUT must see each row once. pyarrow and pandas read every
file below the folder except under names starting with `.` or `_`; Hugging Face `datasets`
(`load_dataset("parquet", data_dir=OUTPUT)` or `load_dataset(OUTPUT)`) reads `_filtered/` (its
rows would be counted twice) and skips only `.` names and folders starting with `__`; DuckDB's
`OUTPUT/*.parquet` does not descend. A `__` folder is the one visible name all four skip. The card
cannot be `OUTPUT/README.md`: pyarrow and pandas would try to read it as Parquet and fail.

Exactly-once, as the data files are: each view file is named after its data file and published
whole (`Folder.publish`), so building it again replaces it, never adds to it. The views of a file
are built right after it is committed (from the table still in memory), then its record is
written. `finish_dataset`, at the end of every run, rebuilds from the data file any view whose
record is missing (a crash between commit and views), names an older version of the file
(`--retry-failed` republishes files under their own names) or other view settings (output.filter
and output.webdataset may change between runs: they are not part of the job's fingerprint), or
whose file is gone, and deletes views of files or settings that no longer exist (data files are
listed again for that, right before). Then, once every shard is committed, it writes the card.

WebDataset samples: `KEY.<ext>` (the image bytes as read, `ext` from their format), `KEY.txt`
(the best caption) and `KEY.json` (every other column but the error: key, source, score, words,
flags, captions and scores, width, height, model, the source's metadata). A sample's name is its
key with each `.` made `_`, because WebDataset splits a member's name at the first dot; the JSON
keeps the key as it is. The image bytes come from the data files, which is why the tars need
`output.include_image`.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.card import file_stats, render_card
from pipeline.job import CaptionJob, FilterConfig, OutputConfig
from pipeline.progress import PROGRESS
from pipeline.sink import ParquetSink, write_parquet
from pipeline.storage import Folder

DATASET = "__dataset__"
FILTERED = f"{DATASET}/filtered"
WEBDATASET = f"{DATASET}/webdataset"
CARD_FILE = f"{DATASET}/README.md"
RECORDS = f"{PROGRESS}/views"
IMAGE_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif"}  # else the format's name, lower-cased
TAR_BATCH_ROWS = 256  # rows turned into Python objects at a time: images can be large


def publish_views(folder: Folder, output: OutputConfig, name: str, table: pa.Table, manifest: dict[str, Any]) -> dict:
    """Publish the views of the just-committed data file `name` (its rows: `table`), then their
    record; returns the record."""
    stem = name.removesuffix(".parquet")
    kept = kept_captions = None
    if output.filter is not None:
        view = filtered_view(table, output.filter).replace_schema_metadata(None)
        with folder.publish(f"{FILTERED}/{name}") as f:
            write_parquet(view, f)
        kept = view.num_rows
        if "captions" in view.column_names:
            kept_captions = pc.sum(pc.list_value_length(view["captions"])).as_py() or 0
    if output.webdataset:
        with folder.publish(f"{WEBDATASET}/{stem}.tar") as f:
            write_webdataset_tar(table, f, mtime=int(manifest["committed_at"]))
    record = {"file": name, "data": _version(manifest), "views": _view_settings(output), "kept": kept,
              "kept_captions": kept_captions, "stats": file_stats(table)}
    folder.write_json(f"{RECORDS}/{stem}.json", record)
    return record


def finish_dataset(folder: Folder, job: CaptionJob, manifests: dict[str, dict], complete: bool) -> None:
    """Bring every view up to date with the committed data files (`manifests`: pipeline.progress),
    and when the job is `complete`, write the dataset card if it says something new."""
    records = _sync_views(folder, job.output, manifests)
    if complete:
        card = render_card(job, manifests, records).encode()
        if not folder.exists(CARD_FILE) or folder.read_bytes(CARD_FILE) != card:
            folder.write_bytes(CARD_FILE, card)


def _sync_views(folder: Folder, output: OutputConfig, manifests: dict[str, dict]) -> dict[str, dict]:
    stored = folder.read_many(list(folder.list(RECORDS, suffix=".json")))
    records = {record["file"]: record for record in map(json.loads, stored.values())}
    sink = ParquetSink(folder)
    present = set(folder.list(FILTERED)) | set(folder.list(WEBDATASET))
    for name, manifest in sorted(manifests.items()):
        record = records.get(name)
        if (record is None or record["data"] != _version(manifest) or record["views"] != _view_settings(output)
                or not _view_files(name, output) <= present):  # a view deleted since: its record alone is no view
            records[name] = publish_views(folder, output, name, sink.read(name), manifest)
    # Listed again: a file committed since `manifests` was read (by a run that started while this
    # one was finishing) keeps its views and their record.
    files = set(manifests) | set(sink.data_files())
    for name in set(records) - files:
        folder.delete(f"{RECORDS}/{name.removesuffix('.parquet')}.json")
        del records[name]
    keep = {view for name in files for view in _view_files(name, output)}
    for prefix in (FILTERED, WEBDATASET):
        for name in set(folder.list(prefix)) - keep:
            folder.delete(name)
    return {name: record for name, record in records.items() if name in manifests}


def _view_files(name: str, output: OutputConfig) -> set[str]:
    """The view files of data file `name` under the view settings of `output`."""
    stem = name.removesuffix(".parquet")
    return ({f"{FILTERED}/{name}"} if output.filter is not None else set()) | (
        {f"{WEBDATASET}/{stem}.tar"} if output.webdataset else set())


def _version(manifest: dict[str, Any]) -> dict[str, Any]:
    """What tells one version of a data file from another (a retry republishes it under its name)."""
    return {"size": manifest["size"], "committed_at": manifest["committed_at"]}


def _view_settings(output: OutputConfig) -> dict[str, Any]:
    drop = None if output.filter is None else sorted(output.filter.drop_flags)
    return {"filter": drop, "webdataset": output.webdataset}


def filtered_view(table: pa.Table, rules: FilterConfig) -> pa.Table:
    """The rows the filter keeps; in rows with several captions, only the captions it keeps (the best
    caption, which kept its row, stays first, and `scores` and `captions_flags` stay aligned)."""
    view = table.filter(kept_rows(table, rules))
    if "captions_flags" not in view.column_names:
        return view
    drop = set(rules.drop_flags)
    keep = [[not drop.intersection(flags) for flags in row] for row in view["captions_flags"].to_pylist()]
    for name in ("captions", "scores", "captions_flags"):
        field = view.schema.field(name)
        values = [[v for v, k in zip(row, row_keep) if k] for row, row_keep in zip(view[name].to_pylist(), keep)]
        view = view.set_column(view.schema.get_field_index(name), field, pa.array(values, field.type))
    return view


def kept_rows(table: pa.Table, rules: FilterConfig) -> pa.Array:
    """True for the rows the filtered view keeps: no error, and none of the flags it drops."""
    drop = set(rules.drop_flags)
    keep = [error is None and not drop.intersection(flags or ()) for error, flags in
            zip(table["error"].to_pylist(), table["flags"].to_pylist())]
    return pa.array(keep, pa.bool_())


def write_webdataset_tar(table: pa.Table, f: BinaryIO, mtime: int) -> None:
    """The ok rows of `table` as WebDataset samples, streamed into `f` (object stores included)."""
    ok = table.filter(pc.is_null(table["error"]))
    described = [
        n for n in ok.column_names if n not in ("image", "error") and not pa.types.is_binary(ok.schema.field(n).type)
    ]
    names = SampleNames()
    with tarfile.open(fileobj=f, mode="w|") as tar:
        for batch in ok.to_batches(max_chunksize=TAR_BATCH_ROWS):
            for image, row in zip(batch.column("image").to_pylist(), batch.select(described).to_pylist()):
                name = names.of(row["key"])
                _add_member(tar, f"{name}.{image_extension(image['bytes'])}", image["bytes"], mtime)
                _add_member(tar, f"{name}.txt", row["caption"].encode(), mtime)
                _add_member(tar, f"{name}.json", json.dumps(row, ensure_ascii=False, default=str).encode(), mtime)


class SampleNames:
    """The name of each key's sample in one tar (its members are NAME.jpg, NAME.txt, NAME.json; the
    key itself is in the json). WebDataset readers end a sample's name at the first dot of a member's
    file name, so dots become `_`; empty, `.` and `..` path parts are dropped, so that unpacking a tar
    never writes outside its folder; and a name already given in this tar (a repeated key, or `a.b`
    beside `a_b`) gets `_2`, `_3`, ...: two samples of one name would be read as one, or refused."""

    def __init__(self) -> None:
        self.given: set[str] = set()

    def of(self, key: str) -> str:
        parts = [part.replace(".", "_") for part in key.split("/") if part not in ("", ".", "..")]
        base = "/".join(parts) or "_"
        name, n = base, 1
        while name in self.given:
            n += 1
            name = f"{base}_{n}"
        self.given.add(name)
        return name


def image_extension(data: bytes) -> str:
    """The usual file extension of encoded image bytes (only their header is read)."""
    image_format = Image.open(io.BytesIO(data)).format
    return IMAGE_EXTENSIONS.get(image_format, image_format.lower())


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))
