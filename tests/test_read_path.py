"""The read path under storage that fails part-way: which failures are retried (the storage's)
and which are recorded (the data's), and a retried shard never commits with records missing.

Failures are injected by `FailingFS`, an in-memory fsspec filesystem whose reads fail at a chosen
byte with a chosen exception; S3's failures are built by s3fs itself from botocore's ClientError,
exactly as s3fs raises them once its own retries are spent.
"""

from __future__ import annotations

import io
import json
import os
import pickle

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError
from fsspec.implementations.memory import MemoryFileSystem
from s3fs.errors import translate_boto_error

from gitmodel.image_processing import GitImageProcessor
from pipeline import stages
from pipeline.listing import list_shards
from pipeline.sources import Record, Shard, ShardError, read_shard
from pipeline.stages import PreprocessConfig, ShardTask, preprocess_shard
from tests.pipeline_fixtures import scene_jpeg, tar_bytes
from tests.test_sources import latin1_tar


def s3_error(code: str) -> OSError:
    """What s3fs raises for an S3 error code: e.g. SlowDown -> OSError(EBUSY) from ClientError."""
    return translate_boto_error(ClientError({"Error": {"Code": code, "Message": code}}, "GetObject"))


class _FailingReader(io.RawIOBase):
    """The bytes of a file, until byte `fail_at`: a read reaching past it raises `error`."""

    def __init__(self, data: bytes, fail_at: int, error: BaseException):
        self.data, self.fail_at, self.error, self.pos = data, fail_at, error, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.pos + len(buffer) > self.fail_at:
            raise self.error
        chunk = self.data[self.pos : self.pos + len(buffer)]
        buffer[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = [offset, self.pos + offset, len(self.data) + offset][whence]
        return self.pos

    def tell(self) -> int:
        return self.pos


class FailingFS(MemoryFileSystem):
    """Each opening of a file takes the next step of `plan` (the last step repeats): None reads
    the file whole, an exception is raised at once, (byte, exception) fails at that byte."""

    protocol = "failing"
    store: dict = {}
    pseudo_dirs = [""]
    plan: list = [None]
    opened = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("failing://"))

    def _open(self, path, mode="rb", **kwargs):
        if "r" not in mode:
            return super()._open(path, mode, **kwargs)
        data = bytes(self.store[self._strip_protocol(path)].getbuffer())
        step = FailingFS.plan[min(FailingFS.opened, len(FailingFS.plan) - 1)]
        FailingFS.opened += 1
        if step is None:
            return io.BytesIO(data)
        if isinstance(step, BaseException):
            raise step
        return io.BufferedReader(_FailingReader(data, *step))

    def cat_file(self, path, start=None, end=None, **kwargs):
        with self._open(path) as f:
            return f.read()[start:end]


@pytest.fixture
def failing_fs(monkeypatch):
    fsspec.register_implementation("failing", FailingFS, clobber=True)
    monkeypatch.setattr(FailingFS, "store", {})
    monkeypatch.setattr(FailingFS, "opened", 0)
    monkeypatch.setattr(stages.time, "sleep", lambda s: None)

    def serve(path: str, data: bytes, *plan) -> str:
        FailingFS().pipe_file(path, data)
        FailingFS.plan = list(plan) or [None]
        return f"failing://{path.lstrip('/')}"

    return serve


def ten_sample_tar() -> bytes:
    return tar_bytes([m for i in range(10) for m in [(f"{i:03d}.jpg", scene_jpeg(i)), (f"{i:03d}.txt", b"a scene")]])


def preprocess_config() -> PreprocessConfig:
    processor = GitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return PreprocessConfig(processor=processor.to_dict())


def preprocess(shard: Shard) -> tuple[list[dict], dict]:
    """The shard's rows and its end marker."""
    rows = pa.concat_tables(list(preprocess_shard(ShardTask(shard), preprocess_config()))).to_pylist()
    return [r for r in rows if r["seq"] >= 0], json.loads(rows[-1]["marker"])


# --- which failures are the storage's ------------------------------------------------------------


@pytest.mark.parametrize("error", [ConnectionResetError("reset"), s3_error("SlowDown"),
                                   s3_error("ServiceUnavailable"), s3_error("InternalError"),
                                   TimeoutError("read timed out")])
def test_storage_failing_mid_tar_raises_shard_error_not_damage(failing_fs, error):
    data = ten_sample_tar()
    url = failing_fs("/b/ten.tar", data, (len(data) // 2, error))
    with pytest.raises(ShardError, match="failing://b/ten.tar: storage failed"):
        list(read_shard(Shard(url, "webdataset")))


def test_s3fs_errors_are_told_apart_by_their_cause_not_their_type():
    """s3fs raises plain OSErrors: SlowDown (EBUSY) and InternalError (EREMOTEIO) are the
    storage's, and so is any error it built from botocore's; a missing object is the data's."""
    assert type(s3_error("SlowDown")) is OSError and type(s3_error("InternalError")) is OSError
    assert isinstance(s3_error("NoSuchKey"), FileNotFoundError)


def test_damage_is_still_damage_on_a_remote_filesystem(failing_fs):
    data = ten_sample_tar()
    url = failing_fs("/b/cut.tar", data[: len(data) // 2])
    *samples, last = read_shard(Shard(url, "webdataset"))
    assert samples and last.shard_failure and last.error.startswith("shard_unreadable: ReadError")


def test_object_gone_since_listing_is_damage_not_a_storage_failure(failing_fs):
    url = failing_fs("/b/gone.tar", ten_sample_tar(), s3_error("NoSuchKey"))
    (record,) = read_shard(Shard(url, "webdataset"))
    assert record.shard_failure and record.error.startswith("shard_unreadable: FileNotFoundError")


def test_image_file_whose_storage_fails_raises_shard_error(failing_fs):
    url = failing_fs("/b/img/a.jpg", scene_jpeg(0), s3_error("SlowDown"))
    with pytest.raises(ShardError, match="storage failed"):
        list(read_shard(Shard("failing://b/img#00000", "images", (url,))))


def test_image_a_parquet_cell_names_whose_storage_fails_raises_shard_error(failing_fs, tmp_path):
    url = failing_fs("/b/img.jpg", scene_jpeg(0), ConnectionResetError("connection reset by peer"))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": url}], image_type)}), tmp_path / "p.parquet")
    with pytest.raises(ShardError, match="failing://b/img.jpg: storage failed"):
        list(read_shard(Shard(str(tmp_path / "p.parquet"), "parquet")))


def test_image_a_parquet_cell_names_that_is_gone_is_a_missing_file_row(failing_fs, tmp_path):
    url = failing_fs("/b/img.jpg", scene_jpeg(0), s3_error("NoSuchKey"))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": url}], image_type)}), tmp_path / "p.parquet")
    (record,) = read_shard(Shard(str(tmp_path / "p.parquet"), "parquet"))
    assert record.error.startswith("missing_file:") and not record.shard_failure


# --- a retried shard is committed whole or not at all ---------------------------------------------


def test_storage_failing_on_every_attempt_leaves_the_shard_uncommitted(failing_fs):
    data = ten_sample_tar()
    url = failing_fs("/b/ten.tar", data, (len(data) // 2, s3_error("SlowDown")))
    rows, marker = preprocess(Shard(url, "webdataset"))
    assert FailingFS.opened == stages.STORAGE_ATTEMPTS
    assert "storage failed" in marker["storage_error"] and "SlowDown" in marker["storage_error"]


def test_a_retry_completes_the_shard_without_repeating_rows(failing_fs):
    data = ten_sample_tar()
    url = failing_fs("/b/ten.tar", data, (len(data) // 2, ConnectionResetError("reset")), None)
    rows, marker = preprocess(Shard(url, "webdataset"))
    assert marker["storage_error"] is None and marker["rows"] == 10
    assert [r["key"] for r in rows] == [f"ten/{i:03d}" for i in range(10)]
    assert [r["seq"] for r in rows] == list(range(10))


@pytest.mark.parametrize("second", [FileNotFoundError("b/ten.tar"), (1024, ConnectionResetError("reset"))],
                         ids=["object gone", "fails sooner"])
def test_a_retry_that_ends_before_the_first_attempt_got_leaves_the_shard_uncommitted(failing_fs, second):
    """Attempt 1 reads part of the shard and fails in storage; attempt 2 fails before reaching
    that point. The shard must not be committed with the rest of its records never read."""
    data = ten_sample_tar()
    url = failing_fs("/b/ten.tar", data, (len(data) * 2 // 3, ConnectionResetError("reset")), second, second)
    rows, marker = preprocess(Shard(url, "webdataset"))
    assert 0 < len(rows) < 10 and marker["rows"] == len(rows)
    assert marker["storage_error"] and "storage failed" in marker["storage_error"]


def test_a_shard_failure_on_a_retry_is_a_row_not_skipped(failing_fs):
    """Attempt 2 finds the shard damaged before the record attempt 1 stopped at: that record
    is sent (not skipped as already done) and the shard is left uncommitted."""
    data = ten_sample_tar()
    url = failing_fs("/b/ten.tar", data, (len(data) * 2 // 3, ConnectionResetError("reset")), FileNotFoundError("gone"))
    rows, marker = preprocess(Shard(url, "webdataset"))
    failure = [r for r in rows if r["error"] and r["error"].startswith("shard_unreadable")]
    assert len(failure) == 1 and failure[0]["seq"] == len(rows) - 1  # after the rows attempt 1 sent
    assert "shard_unreadable: FileNotFoundError" in marker["storage_error"]


def test_a_retry_that_finds_damage_past_the_first_attempt_commits_it_as_damage(failing_fs):
    data = ten_sample_tar()
    cut = data[: len(data) * 2 // 3]
    url = failing_fs("/b/ten.tar", cut, (len(cut) // 3, ConnectionResetError("reset")), None)
    rows, marker = preprocess(Shard(url, "webdataset"))
    assert marker["storage_error"] is None and marker["rows"] == len(rows)
    assert rows[-1]["error"].startswith("shard_unreadable: ReadError")
    assert [r["seq"] for r in rows] == list(range(len(rows)))


# --- names and markers --------------------------------------------------------------------------


def test_a_tar_with_non_utf8_member_names_gives_rows_not_a_crash(tmp_path):
    path = latin1_tar(tmp_path / "l.tar", [("caf\xe9.jpg", scene_jpeg(0)), ("caf\xe9.txt", b"x"), ("ok.jpg", scene_jpeg(1))])
    rows, marker = preprocess(Shard(str(path), "webdataset"))
    assert [(r["key"], r["error"]) for r in rows] == [("l/caf\\xe9", None), ("l/ok", None)]
    assert marker["rows"] == 2


def test_image_files_with_non_utf8_names_give_rows_with_valid_keys_and_sources(tmp_path):
    (tmp_path / os.fsdecode(b"caf\xe9.jpg")).write_bytes(scene_jpeg(0))
    (shard,) = list_shards(str(tmp_path), "images")
    rows, marker = preprocess(shard)
    assert [(r["key"], r["source"], r["error"]) for r in rows] == [("caf\\xe9.jpg", f"{tmp_path}/caf\\xe9.jpg", None)]


def test_a_sample_keyed_like_the_shard_record_is_an_ordinary_row(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes([("__shard__.jpg", b"not an image"), ("__shard__.txt", b"a caption")]))
    rows, marker = preprocess(Shard(str(path), "webdataset"))
    (row,) = rows
    assert row["key"] == "s/__shard__" and row["error"].startswith("not_an_image:")
    assert pickle.loads(row["meta"]) == {"txt": "a caption"}  # its metadata kept, as for any sample


def test_shard_damage_keeps_its_counts_in_the_message_not_in_columns():
    record = Record("s/__shard__", "x.tar", None, {"samples": 3, "late_members": 0}, "shard_unreadable: ReadError",
                    shard_failure=True)
    row = stages.preprocess_record(record, 7, Shard("x.tar", "webdataset"), None, preprocess_config())
    assert row["error"] == "shard_unreadable: ReadError (samples=3, late_members=0)" and "meta" not in row
