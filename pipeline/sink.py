"""Step 4 of the data path: captioned rows become Parquet files under `output.path`.

A data file holds whole shards, and landing it is the commit: it is published atomically
(`storage.Folder.publish`), and its footer records which shards it holds (`gitcap` key-value
metadata). So the set of `*.parquet` files in the folder *is* the committed output, which is what
pandas, pyarrow, DuckDB and Hugging Face `datasets` read; bookkeeping lives in the hidden `.gitcap/`.

Columns: key, source, caption, score (mean token log-prob), error ("reason: message", null on
success), width, height (original, upright), model, words and flags (the best caption's word
count and quality flags, see pipeline.quality; null on error rows); with num_return_sequences > 1
also captions and scores (best first) and captions_flags (each caption's flags); with output.include_image the image as a Hugging Face
{bytes, path} struct; then the source's metadata (WebDataset members by extension, Parquet's
other columns). A metadata column whose name is taken gets the prefix `source_`.
"""

from __future__ import annotations

import json
import pickle
from collections import Counter
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.job import QualityConfig
from pipeline.quality import captions_flags_column, quality_columns
from pipeline.sources import is_shard_failure
from pipeline.storage import Folder

FOOTER_KEY = b"gitcap"
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face `Image`
BASE_FIELDS = [
    pa.field("key", pa.string()),
    pa.field("source", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("error", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("model", pa.string()),
]
QUALITY_FIELDS = [pa.field("words", pa.int32()), pa.field("flags", pa.list_(pa.string()))]
MULTI_FIELDS = [
    pa.field("captions", pa.list_(pa.string())),
    pa.field("scores", pa.list_(pa.float32())),
    pa.field("captions_flags", pa.list_(pa.list_(pa.string()))),
]
RESERVED = frozenset(f.name for f in BASE_FIELDS + QUALITY_FIELDS + MULTI_FIELDS) | {"image"}


def output_table(rows: pa.Table, model_id: str, multi: bool, include_image: bool,
                 quality: QualityConfig | None = None, metadata_types: dict[str, pa.DataType] | None = None) -> pa.Table:
    """Captioner rows (markers removed) as output rows, in (shard, seq) order, flagged by `quality`
    (default thresholds when None). `metadata_types`: the source's own column types (a Parquet
    input's schema), which every data file keeps whatever values its rows happen to hold."""
    rows = rows.take(pc.sort_indices(rows, [("shard", "ascending"), ("seq", "ascending")]))
    columns: dict[str, pa.Array] = {f.name: rows[f.name].cast(f.type) for f in BASE_FIELDS if f.name != "model"}
    columns["model"] = pa.array([model_id] * rows.num_rows, pa.string())
    quality = quality or QualityConfig()
    columns["words"], columns["flags"] = quality_columns(rows["caption"], rows["score"], quality)
    fields = BASE_FIELDS + QUALITY_FIELDS
    if multi:
        columns.update(captions=rows["captions"], scores=rows["scores"],
                       captions_flags=captions_flags_column(rows["captions"], rows["scores"], quality))
        fields += MULTI_FIELDS
    if include_image:
        image, key = rows["image"].combine_chunks(), rows["key"].combine_chunks()
        columns["image"] = pa.StructArray.from_arrays([image, key], fields=list(IMAGE_STRUCT))
        fields.append(pa.field("image", IMAGE_STRUCT))
    for name, values in _metadata_columns(rows["meta"].to_pylist(), metadata_types or {}).items():
        columns[name] = values
        fields.append(pa.field(name, values.type))
    return pa.Table.from_arrays([columns[f.name] for f in fields], schema=pa.schema(fields))


def _metadata_columns(pickled: list[bytes | None], types: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    records = [pickle.loads(p) if p is not None else {} for p in pickled]
    names = list(dict.fromkeys(name for record in records for name in record))
    columns = {}
    for name in names:
        values = [record.get(name) for record in records]
        column = name
        while column in RESERVED or column in columns:
            column = f"source_{column}"
        columns[column] = _array(values, types.get(name))
    return columns


def _array(values: list[Any], known: pa.DataType | None = None) -> pa.Array:
    """The values as the source's own type where known: readers take a folder's schema from one
    file and fail on a file whose types differ, and a batch of rows alone cannot tell (a nullable
    float column with only nulls in one file). Else Arrow's own type for the values; text when
    they disagree; never the untyped null type."""
    if known is not None:
        try:
            return pa.array(values, known)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            pass  # input files whose schemas differ: this file's own types, as below
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        array = json_text(values)
    return array.cast(pa.string()) if pa.types.is_null(array.type) else array


def json_text(values: list[Any]) -> pa.Array:
    """Values no one Arrow type holds (numbers beside text, lists beside structs) as JSON text."""
    return pa.array([None if v is None else json.dumps(v, default=str) for v in values], pa.string())


def file_summary(table: pa.Table, shards: list[str]) -> dict[str, Any]:
    """Counts that go into the file's footer and its progress manifest."""
    errors = [e for e in table["error"].to_pylist() if e is not None]
    failed_sources = [
        {"shard": source, "error": error}
        for source, error in zip(table["source"].to_pylist(), table["error"].to_pylist())
        if is_shard_failure(error)
    ]
    with_errors = sorted({s for s, e in zip(table["source"].to_pylist(), table["error"].to_pylist()) if e is not None})
    return {
        "shards": sorted(shards),
        "rows": table.num_rows,
        "ok": table.num_rows - len(errors),
        "failed": len(errors) - len(failed_sources),
        "errors": dict(Counter(e.split(":", 1)[0] for e in errors)),
        "failed_sources": failed_sources,
        "sources_with_errors": with_errors,
    }


def write_parquet(table: pa.Table, f: BinaryIO) -> None:
    """`table` as Parquet into `f`; an empty table as a file with no row groups, because Hugging
    Face `datasets` fails on a row group of zero rows (and skips a file with none)."""
    if table.num_rows:
        pq.write_table(table, f, compression="zstd")
    else:
        pq.ParquetWriter(f, table.schema, compression="zstd").close()


class ParquetSink:
    """The committed data files under an output folder."""

    def __init__(self, folder: Folder):
        self.folder = folder

    def data_files(self) -> dict[str, int]:
        """{name: size} of every committed data file."""
        return self.folder.list("", suffix=".parquet")

    def write(self, name: str, table: pa.Table, info: dict[str, Any]) -> int:
        """Publish `table` as `name` (replacing any file of that name, atomically); returns its size."""
        metadata = {**(table.schema.metadata or {}), FOOTER_KEY: json.dumps(info, sort_keys=True).encode()}
        with self.folder.publish(name) as f:
            write_parquet(table.replace_schema_metadata(metadata), f)
            return f.tell()

    def read(self, name: str, columns: list[str] | None = None) -> pa.Table:
        with self.folder.fs.open(self.folder.path(name), "rb") as f:
            return pq.read_table(f, columns=columns)

    def read_info(self, name: str) -> dict[str, Any]:
        """The footer record of a data file: which shards it holds, and its counts."""
        with self.folder.fs.open(self.folder.path(name), "rb") as f:
            metadata = pq.ParquetFile(f).schema_arrow.metadata or {}
        if FOOTER_KEY not in metadata:
            raise ValueError(f"{self.folder.uri(name)} was not written by gitcap (no '{FOOTER_KEY.decode()}' footer)")
        return json.loads(metadata[FOOTER_KEY])
