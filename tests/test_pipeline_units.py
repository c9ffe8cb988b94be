"""The pipeline's parts without Ray: the CPU stage, the captioner, shard assembly, output tables,
and all-or-nothing publishing."""

from __future__ import annotations

import json

import os
import pickle

import numpy as np
import pyarrow as pa
import torch
import pytest

from gitmodel.image_processing import GitImageProcessor
from pipeline import stages
from pipeline.captioner import Captioner, CaptionerConfig, CaptioningError, image_seed, stacked_crops
from pipeline.runner import ShardAssembler
from pipeline.sink import file_summary, output_table
from pipeline.sources import Record, Shard, ShardError
from pipeline.stages import PreprocessConfig, ShardTask, preprocess_shard
from pipeline.storage import Folder
from tests.pipeline_fixtures import image_zoo, scene_jpeg, tar_bytes, tiny_model  # noqa: F401  (fixtures)


def preprocess_config(**kwargs) -> PreprocessConfig:
    processor = GitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return PreprocessConfig(processor=processor.to_dict(), **kwargs)


def tar_shard(tmp_path, members) -> Shard:
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes(members))
    return Shard(str(path), "webdataset")


# --- the CPU stage ----------------------------------------------------------------------------


def test_a_shard_streams_in_batches_then_its_end_marker(tmp_path):
    shard = tar_shard(tmp_path, [(f"{i}.jpg", scene_jpeg(i)) for i in range(5)])
    batches = list(preprocess_shard(ShardTask(shard), preprocess_config(rows_per_batch=2)))

    assert [b.num_rows for b in batches] == [2, 2, 2]  # the marker rides in the last batch
    rows = pa.concat_tables(batches).to_pylist()
    assert [r["seq"] for r in rows] == [0, 1, 2, 3, 4, -1]
    assert all(len(r["pixels"]) == 32 * 32 * 3 and (r["width"], r["height"]) == (48, 40) for r in rows[:5])
    marker = json.loads(rows[-1]["marker"])
    assert (marker["rows"], marker["storage_error"]) == (5, None)
    assert marker["read_s"] >= 0 and marker["decode_s"] > 0  # the run summary's stage timings


def test_every_bad_image_is_a_row_with_its_reason(tmp_path):
    zoo = image_zoo()
    shard = tar_shard(tmp_path, [(f"{name}.{ext}", data) for name, (ext, data, _) in zoo.items()])
    rows = {r["key"]: r for r in pa.concat_tables(list(preprocess_shard(ShardTask(shard), preprocess_config()))).to_pylist()}
    for name, (_, _, expected) in zoo.items():
        row = rows[f"s/{name}"]
        if isinstance(expected, str):
            assert row["error"].startswith(expected) and row["pixels"] is None, name
        else:
            assert row["error"] is None and (row["width"], row["height"]) == expected, name


def test_retry_skips_keys_already_captioned_but_keeps_their_seq(tmp_path):
    shard = tar_shard(tmp_path, [(f"{i}.jpg", scene_jpeg(i)) for i in range(4)])
    rows = pa.concat_tables(list(preprocess_shard(ShardTask(shard, frozenset({"s/0", "s/2"})), preprocess_config())))
    assert [(r["key"], r["seq"]) for r in rows.to_pylist()] == [("s/1", 1), ("s/3", 3), ("", -1)]
    assert '"rows": 2' in rows.to_pylist()[-1]["marker"]


def test_a_storage_failure_is_retried_then_reported_on_the_marker(monkeypatch):
    calls = []

    def failing(shard, options, column):
        calls.append(1)
        yield Record("s/0", shard.uri, scene_jpeg(0))
        raise ShardError("s3://b/s.tar: storage failed (ConnectionError)")

    monkeypatch.setattr(stages, "read_shard", failing)
    monkeypatch.setattr(stages.time, "sleep", lambda s: None)
    rows = pa.concat_tables(list(preprocess_shard(ShardTask(Shard("s3://b/s.tar", "webdataset")), preprocess_config())))
    assert len(calls) == stages.STORAGE_ATTEMPTS
    assert [r["seq"] for r in rows.to_pylist()] == [0, -1]  # the retries did not repeat record 0
    assert "storage failed" in rows.to_pylist()[-1]["marker"]


# --- shard assembly on the driver -------------------------------------------------------------


def result_rows(shard: str, seqs: list[int], marker_rows: int | None = None) -> pa.Table:
    rows = [{"shard": shard, "seq": s, "key": f"{shard}/{s}", "marker": None} for s in seqs]
    if marker_rows is not None:
        rows.append({"shard": shard, "seq": -1, "key": "", "marker": f'{{"rows": {marker_rows}, "storage_error": null}}'})
    return pa.Table.from_pylist(rows, schema=pa.schema([("shard", pa.string()), ("seq", pa.int64()),
                                                        ("key", pa.string()), ("marker", pa.string())]))


def test_a_shard_completes_when_its_marker_and_all_its_rows_have_come_in_any_order():
    assembler = ShardAssembler()
    assert assembler.add(result_rows("a", [2], marker_rows=3)) == []
    assert assembler.add(result_rows("b", [0])) == []
    assert assembler.add(result_rows("a", [0, 2])) == []  # a repeated row (a Ray retry) is dropped
    (done,) = assembler.add(result_rows("a", [1]))
    assert done.uri == "a" and sorted(done.rows["seq"].to_pylist()) == [0, 1, 2]
    assert "marker" not in done.rows.column_names
    (empty,) = assembler.add(result_rows("c", [], marker_rows=0))
    assert empty.rows.num_rows == 0


# --- the captioner ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioner(tiny_model):
    return Captioner(CaptionerConfig(model_path=tiny_model, generate_kwargs={"max_new_tokens": 5}))


def captioner_input(tmp_path, members) -> pa.Table:
    shard = tar_shard(tmp_path, members)
    return pa.concat_tables(list(preprocess_shard(ShardTask(shard), preprocess_config())))


def test_error_rows_and_markers_pass_the_model_untouched(tmp_path, captioner):
    batch = captioner_input(tmp_path, [("a.jpg", scene_jpeg(0)), ("b.jpg", b""), ("c.jpg", scene_jpeg(1))])
    out = captioner(batch).to_pylist()
    assert [r["key"] for r in out] == ["s/a", "s/b", "s/c", ""]
    assert isinstance(out[0]["caption"], str) and out[0]["score"] <= 0 and out[0]["error"] is None
    assert out[1]["caption"] is None and out[1]["error"].startswith("empty")
    assert out[3]["caption"] is None and out[3]["marker"] is not None
    assert "pixels" not in captioner(batch).column_names


def test_a_batch_that_fails_is_split_until_the_bad_image_is_alone(tmp_path, captioner, monkeypatch):
    batch = captioner_input(tmp_path, [(f"{i}.jpg", scene_jpeg(i)) for i in range(4)])
    real = Captioner.caption

    def fragile(self, crops, keys):
        if "s/2" in keys:
            raise RuntimeError("CUDA out of memory")
        return real(self, crops, keys)

    monkeypatch.setattr(Captioner, "caption", fragile)
    out = {r["key"]: r for r in captioner(batch).to_pylist()}
    assert out["s/2"]["error"] == "caption_failed: RuntimeError: CUDA out of memory"
    assert all(out[f"s/{i}"]["caption"] is not None for i in (0, 1, 3))


def test_after_running_out_of_memory_batches_go_in_pieces_that_fit(tmp_path, tiny_model, monkeypatch):
    fresh = Captioner(CaptionerConfig(model_path=tiny_model, generate_kwargs={"max_new_tokens": 3}))
    batch = captioner_input(tmp_path, [(f"{i}.jpg", scene_jpeg(i)) for i in range(7)])
    real, sizes = Captioner.caption, []

    def small_device(self, crops, keys):
        sizes.append(len(keys))
        if len(keys) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, crops, keys)

    monkeypatch.setattr(Captioner, "caption", small_device)
    first = fresh(batch)
    assert sizes == [7, 3, 1, 2, 4, 2, 2] and fresh.images_that_fit == 2
    assert first["caption"].null_count == 1  # the end marker: every image was captioned
    sizes.clear()
    again = fresh(batch)
    assert sizes == [2, 2, 2, 1]  # no more failed attempts
    assert again["caption"].to_pylist() == first["caption"].to_pylist()


@pytest.mark.parametrize("generation", [{}, {"do_sample": True, "num_return_sequences": 2}])
def test_batches_padded_to_a_fixed_size_give_the_same_captions(tmp_path, tiny_model, generation):
    """On a GPU a batch is padded up to a multiple of GPU_PAD_MULTIPLE images (one CUDA graph per size);
    the padding's captions are dropped and the real images' are what they would have been."""
    config = CaptionerConfig(model_path=tiny_model, generate_kwargs={"max_new_tokens": 6, **generation})
    plain, padding = Captioner(config), Captioner(config)
    padding.pad_to_multiple = 4
    crops = np.random.default_rng(0).integers(0, 256, (5, *plain.crop_shape), dtype=np.uint8)
    keys = [f"k{i}" for i in range(5)]
    for n in (1, 3, 4, 5):
        (texts, scores), (expected_texts, expected_scores) = (c.caption(crops[:n], keys[:n]) for c in (padding, plain))
        assert texts == expected_texts  # scores agree to float rounding: other batch sizes, other kernels
        assert np.allclose(np.array(scores), np.array(expected_scores), rtol=1e-5, atol=0)
    assert [padding._padded_size(n) for n in (1, 4, 5)] == [4, 4, 8]
    padding.images_that_fit = 6  # after running out of memory: never pad past what fitted
    assert [padding._padded_size(n) for n in (5, 6)] == [6, 6]


def test_a_model_that_fails_on_every_image_stops_the_run(tmp_path, captioner, monkeypatch):
    batch = captioner_input(tmp_path, [(f"{i}.jpg", scene_jpeg(i)) for i in range(3)] + [("bad.jpg", b"")])

    def broken(self, crops, keys):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Captioner, "caption", broken)
    with pytest.raises(CaptioningError, match=r"each of the 3 images .*\(caption_failed: RuntimeError: CUDA error"):
        captioner(batch)


def test_image_seeds_depend_on_the_job_seed_and_key_alone():
    assert image_seed(0, "a/1") == image_seed(0, "a/1")
    assert len({image_seed(0, "a/1"), image_seed(1, "a/1"), image_seed(0, "a/2")}) == 3
    assert 0 <= image_seed(123, "k") < 2**62


# --- output tables ----------------------------------------------------------------------------


def test_metadata_columns_keep_their_types_and_never_shadow_ours():
    metas = [{"caption": "truth", "n": 1, "maybe": None, "mixed": 1}, {"caption": "t2", "n": 2, "maybe": None, "mixed": "x"}]
    rows = pa.table({
        "shard": ["s", "s"], "seq": [1, 0], "key": ["k1", "k0"], "source": ["s", "s"], "width": [4, 4],
        "height": [3, 3], "error": [None, None], "meta": [pickle.dumps(m) for m in metas],
        "image": pa.array([None, None], pa.binary()), "caption": ["c1", "c0"], "score": pa.array([-1.0, -2.0], pa.float32()),
    })
    table = output_table(rows, "model-x", multi=False, include_image=False)
    assert table.column_names == ["key", "source", "caption", "score", "error", "width", "height", "model", "words", "flags",
                                  "source_caption", "n", "maybe", "mixed"]
    assert table["key"].to_pylist() == ["k0", "k1"]  # shard, then seq order
    assert table["source_caption"].to_pylist() == ["t2", "truth"]
    assert table.schema.field("n").type == pa.int64() and table.schema.field("maybe").type == pa.string()
    assert table["mixed"].to_pylist() == ['"x"', "1"]

    # The source's own types, where known (a Parquet input's schema), hold whatever the rows hold:
    # readers take a folder's schema from one file and fail on another whose types differ.
    typed = output_table(rows, "model-x", multi=False, include_image=False,
                         metadata_types={"maybe": pa.float64(), "n": pa.int16(), "mixed": pa.int64()})
    assert typed.schema.field("maybe").type == pa.float64() and typed.schema.field("n").type == pa.int16()
    assert typed.schema.field("mixed").type == pa.string()  # input files that disagree: this file's own types


def test_only_shard_failures_count_as_failed_sources():
    table = pa.table({"key": ["a/__shard__", "a/x", "a/__shard__"], "source": ["a.tar"] * 3,
                      "error": ["missing_image: no image member", None, "shard_unreadable: ReadError"]})
    summary = file_summary(table, ["a.tar"])
    assert summary["failed_sources"] == [{"shard": "a.tar", "error": "shard_unreadable: ReadError"}]
    assert (summary["ok"], summary["failed"]) == (1, 1)  # a sample keyed like the shard record is a sample


# --- publishing -------------------------------------------------------------------------------


def publish_then_fail(folder: Folder, name: str) -> None:
    with pytest.raises(RuntimeError):
        with folder.publish(name) as f:
            f.write(b"half of a file")
            raise RuntimeError("killed mid-write")


def test_a_failed_local_write_leaves_the_old_file_or_nothing(tmp_path):
    folder = Folder(str(tmp_path))
    publish_then_fail(folder, "a.parquet")
    assert not (tmp_path / "a.parquet").exists()
    folder.write_bytes("a.parquet", b"v1")
    publish_then_fail(folder, "a.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == b"v1"
    assert not list((tmp_path / ".gitcap" / "attempts").iterdir())


def test_a_failed_s3_upload_is_aborted_not_published(s3_server, s3_bucket):
    folder = Folder(f"s3://{s3_bucket}/out", s3_server.storage_options)
    publish_then_fail(folder, "a.parquet")
    assert not s3_server.filesystem().exists(f"{s3_bucket}/out/a.parquet")
    folder.write_bytes("a.parquet", b"v1")
    assert folder.list("") == {"a.parquet": 2}
    assert folder.read_bytes("a.parquet") == b"v1"


# --- one writer at a time ---------------------------------------------------------------------


def test_a_second_run_is_refused_while_the_first_is_alive(tmp_path):
    import socket
    import subprocess
    import time

    from pipeline.job import CaptionJob
    from pipeline.progress import RUNS, STALE_RUN_S, ConcurrentRunError, JobProgress, new_run_record

    job = CaptionJob.from_dict({"input": {"path": "in"}, "output": {"path": str(tmp_path)}})
    progress = JobProgress(Folder(str(tmp_path)))
    progress.start(job, lambda: [], "m")
    exited = subprocess.Popen(["true"])  # noqa: S607  (a PID whose process is gone)
    exited.wait()

    def record(**values):
        run = {**new_run_record("r1", False), "updated_at": time.time(), **values}
        progress.folder.write_json(f"{RUNS}/r1.json", run)

    record(host=socket.gethostname(), pid=os.getppid())  # alive, on this host
    with pytest.raises(ConcurrentRunError, match="being written by run r1"):
        progress.check(job)
    record(host=socket.gethostname(), pid=exited.pid)  # killed, on this host
    assert progress.check(job) is not None
    record(host="elsewhere", pid=1)  # on another machine, and it wrote just now
    with pytest.raises(ConcurrentRunError):
        progress.check(job)
    record(host="elsewhere", pid=1, updated_at=time.time() - STALE_RUN_S - 1)  # silent for too long
    assert progress.check(job) is not None


def test_of_two_runs_that_start_together_exactly_one_goes_on(tmp_path):
    from pipeline.progress import ConcurrentRunError, JobProgress, new_run_record

    progress = JobProgress(Folder(str(tmp_path)))
    first, second = new_run_record("b-run", False), new_run_record("c-run", False)
    # Both passed `check` before either wrote its record; the one registered first goes on.
    progress.claim(first)
    with pytest.raises(ConcurrentRunError, match="being written by run b-run"):
        progress.claim(second)
    assert {r["run"]: r["state"] for r in progress.runs()} == {"b-run": "running", "c-run": "gave way to run b-run"}
    # A run that registered earlier elsewhere makes a later claimant give way, even this one.
    progress.write_run({**first, "state": "finished"})
    progress.write_run({**new_run_record("a-run", False), "host": "elsewhere", "registered_at": 0})
    with pytest.raises(ConcurrentRunError, match="run a-run"):
        progress.claim(new_run_record("d-run", False))


def test_crops_are_read_from_arrow_buffers_whatever_the_chunks_and_rows():
    shape = (2, 3, 3)
    crops = np.arange(5 * 18, dtype=np.uint8).reshape(5, *shape)
    rows_as_bytes = [c.tobytes() for c in crops]
    chunked = pa.chunked_array([pa.array(rows_as_bytes[:2], pa.binary()), pa.array(rows_as_bytes[2:], pa.binary())])
    sliced = pa.chunked_array([pa.array([b"x"] + rows_as_bytes, pa.large_binary()).slice(1)])  # a non-zero offset
    for column in (chunked, sliced):
        assert np.array_equal(stacked_crops(column, np.arange(5), shape), crops)
        assert np.array_equal(stacked_crops(column, np.array([0, 3, 4]), shape), crops[[0, 3, 4]])
    with pytest.raises(ValueError, match="crops of 17 bytes where the model's preprocessing makes 18"):
        stacked_crops(pa.chunked_array([pa.array(rows_as_bytes[:2] + [b"y" * 17])]), np.arange(3), shape)
