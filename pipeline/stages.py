"""Steps 1-2 of the data path as one CPU stage: read a shard, decode each image, crop it to uint8.

One call handles one shard and streams it out in batches of rows (Arrow tables), so a shard never
sits whole in memory and the captioner can start on its first batch while the rest is decoded.
Every record becomes exactly one row; a record that cannot be used carries its reason in `error`
and no pixels. Each shard ends with one *end marker* row that says how many rows the shard sent
(and whether the storage failed part-way): the driver knows a shard is complete when it has seen
that many distinct `seq` numbers, whatever order the rows arrive in, and even if Ray retried a
task and delivered some rows twice.

Crops travel as raw uint8 bytes (H*W*3), not floats: a quarter of the size, normalised later on
the device that runs the model.
"""

from __future__ import annotations

import functools
import json
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from gitmodel.image_processing import GitImageProcessor
from pipeline.decode import ImageDecodeError, decode_image
from pipeline.sources import KEY_COLUMNS, Record, Shard, ShardError, read_shard, valid_utf8

PREPROCESS_CPUS = 0.5  # Ray CPUs each read+decode task reserves: a shard is part decoding, part waiting on storage

# Columns of the rows that flow from this stage to the captioner.
ROW_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),  # the unit of work this row belongs to (Shard.uri)
        ("seq", pa.int64()),  # the record's position in its shard; -1 on the end marker
        ("key", pa.string()),
        ("source", pa.string()),
        ("pixels", pa.binary()),  # uint8 (H, W, 3) crop; null when `error` is set
        ("width", pa.int32()),  # original size, after EXIF orientation
        ("height", pa.int32()),
        ("error", pa.string()),  # "reason_code: message"
        ("meta", pa.binary()),  # pickled {column: value}: the source's metadata, passed through
        ("image", pa.binary()),  # the encoded image, only when the output keeps it
        ("marker", pa.string()),  # end marker only: JSON {"rows": n, "storage_error": str | null, "read_s", "decode_s"}
    ]
)

STORAGE_ATTEMPTS = 3  # a shard whose storage fails this often is left for the next run


@dataclass(frozen=True)
class ShardTask:
    """A shard to process, and the keys in it to leave out (already captioned, on --retry-failed)."""

    shard: Shard
    skip_keys: frozenset[str] = field(default_factory=frozenset)

    def to_json(self) -> str:
        return json.dumps(
            {"uri": self.shard.uri, "format": self.shard.format, "files": list(self.shard.files),
             "skip_keys": sorted(self.skip_keys)}
        )

    @classmethod
    def from_json(cls, text: str) -> ShardTask:
        d = json.loads(text)
        return cls(Shard(d["uri"], d["format"], tuple(d["files"])), frozenset(d["skip_keys"]))


@dataclass(frozen=True)
class PreprocessConfig:
    """What the CPU stage needs, small enough to ship with every task."""

    processor: dict[str, Any]  # GitImageProcessor.to_dict() of the model's image processor
    storage_options: dict[str, Any] = field(default_factory=dict)
    image_column: str | None = None
    include_image: bool = False
    rows_per_batch: int = 32
    max_pixels: int = 100_000_000


def read_and_preprocess(batch: dict[str, Any], config: PreprocessConfig) -> Iterator[pa.Table]:
    """Ray Data `map_batches` body: each input row is one `ShardTask` (as JSON in column `task`)."""
    for task_json in batch["task"]:
        yield from preprocess_shard(ShardTask.from_json(str(task_json)), config)


def preprocess_shard(task: ShardTask, config: PreprocessConfig) -> Iterator[pa.Table]:
    """Rows for every record of the shard, in batches, then the end marker."""
    processor = _image_processor(json.dumps(config.processor, sort_keys=True))
    rows: list[dict[str, Any]] = []
    sent = 0  # rows sent, for the end marker
    done = 0  # records read so far: a retry after a storage failure skips this many
    storage_error = None
    started, decode_s, waited_s = time.perf_counter(), 0.0, 0.0
    for attempt in range(STORAGE_ATTEMPTS):
        resumed_at, reached, failure = done, 0, None
        try:
            records = read_shard(task.shard, config.storage_options, config.image_column)
            for seq, record in enumerate(records):
                if record.shard_failure:
                    # Never skipped: a retry can fail sooner than the attempt before it did.
                    seq, failure = max(seq, done), record.error
                else:
                    reached = seq + 1
                    if seq < done:
                        continue
                done = seq + 1
                if record.key in task.skip_keys:
                    continue
                decode_started = time.perf_counter()
                rows.append(preprocess_record(record, seq, task.shard, processor, config))
                decode_s += time.perf_counter() - decode_started
                sent += 1
                if len(rows) >= config.rows_per_batch:
                    handed_over = time.perf_counter()
                    yield _table(rows)
                    waited_s += time.perf_counter() - handed_over  # downstream's time, not ours
                    rows = []
            storage_error = _cut_short(task.shard, reached, resumed_at, failure)
            break
        except ShardError as err:
            storage_error = str(err)
            if attempt + 1 < STORAGE_ATTEMPTS:
                time.sleep(min(2**attempt, 10))
    # Time spent reading the shard (storage, tar/Parquet parsing) and decoding + cropping its
    # images, for the run summary's per-stage timings.
    read_s = time.perf_counter() - started - decode_s - waited_s
    marker = json.dumps({"rows": sent, "storage_error": storage_error, "read_s": read_s, "decode_s": decode_s})
    rows.append({"shard": task.shard.uri, "seq": -1, "key": "", "source": task.shard.uri, "marker": marker})
    yield _table(rows)


def _cut_short(shard: Shard, reached: int, resumed_at: int, failure: str | None) -> str | None:
    """Why a retry that ended before the records an earlier attempt had read cannot complete the
    shard: the records after it were never read, so the shard must stay uncommitted (the next
    run redoes it) rather than be committed short. None when the retry got that far."""
    if reached >= resumed_at:
        return None
    why = f": {failure}" if failure else ""
    return f"{shard.uri}: storage failed (a retry ended after {reached} of the {resumed_at} records read before{why})"


def preprocess_record(
    record: Record, seq: int, shard: Shard, processor: GitImageProcessor, config: PreprocessConfig
) -> dict[str, Any]:
    """One record as a row: a uint8 crop and the original size, or the reason there is none."""
    row: dict[str, Any] = {"shard": shard.uri, "seq": seq, "key": record.key, "source": valid_utf8(record.source)}
    if record.shard_failure:
        # Damage to the shard itself: its counts belong in the message, not in metadata columns.
        counts = ", ".join(f"{k}={v}" for k, v in record.metadata.items())
        row["error"] = f"{record.error} ({counts})" if counts else record.error
        return row
    row["meta"] = pickle.dumps(_metadata_columns(record, shard.format), protocol=pickle.HIGHEST_PROTOCOL)
    if config.include_image and record.data is not None:
        row["image"] = record.data
    if record.error:
        row["error"] = record.error
        return row
    try:
        decoded = decode_image(record.data, max_pixels=config.max_pixels)
        crop = processor.to_uint8(decoded.image)
    except ImageDecodeError as err:
        row["error"] = str(err)
        return row
    except Exception as err:  # noqa: BLE001  (one odd image must never stop the shard)
        row["error"] = f"preprocess_failed: {type(err).__name__}: {err}"
        return row
    row.update(pixels=crop.tobytes(), width=decoded.width, height=decoded.height)
    return row


def _metadata_columns(record: Record, format: str) -> dict[str, Any]:
    """The source's metadata as output columns: WebDataset members by extension (the `.json`
    member as JSON text: its fields differ from sample to sample), Parquet's other columns as they
    are, less the column the key came from."""
    columns = {}
    for name, value in record.metadata.items():
        if name in KEY_COLUMNS and value is not None and str(value) == record.key:
            continue
        if format == "webdataset" and name == "json" and not isinstance(value, str):
            value = json.dumps(value, sort_keys=True)
        columns[name] = value
    return columns


@functools.lru_cache(maxsize=4)
def _image_processor(config_json: str) -> GitImageProcessor:
    processor = GitImageProcessor.from_dict(json.loads(config_json))
    processor.fixed_output_size()  # crops of one size, or a ValueError saying why not
    return processor


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
