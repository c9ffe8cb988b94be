"""run_caption_job end to end on a real 2-CPU Ray: every source format, locally and on S3, odd and
broken inputs, reruns, refused reruns, --retry-failed, and readers of the output."""

from __future__ import annotations

import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ConcurrentRunError, JobMismatchError, job_status, run_caption_job
from pipeline.progress import JOB_FILE, PLAN_FILE, JobProgress, new_run_record
from pipeline.scenes import write_scenes
from pipeline.storage import Folder
from tests.pipeline_fixtures import (  # noqa: F401  (fixtures)
    assert_each_key_once,
    image_zoo,
    job,
    ray_local,
    read_output,
    scene_jpeg,
    tar_bytes,
    tiny_model,
    write_scene_shards,
)

pytestmark = pytest.mark.usefixtures("ray_local")


def test_webdataset_every_image_once_with_its_metadata(tmp_path, tiny_model):
    write_scene_shards(tmp_path / "in", shards=3, per_shard=5)
    summary = run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model))

    assert (summary.shards_done, summary.shards_total, summary.exit_code) == (3, 3, 0)
    assert (summary.images_ok, summary.images_failed) == (15, 0)
    frame = read_output(str(tmp_path / "out"))
    assert_each_key_once(frame, [f"{n:05d}/{i:06d}" for n in range(3) for i in range(n * 5, n * 5 + 5)])
    assert list(frame.columns[:8]) == ["key", "source", "caption", "score", "error", "width", "height", "model"]
    row = frame.set_index("key").loc["00001/000007"]
    assert row["source"] == str(tmp_path / "in" / "00001.tar")
    assert (row["width"], row["height"], row["model"]) == (48, 40, tiny_model)
    assert row["txt"] == "scene 7" and json.loads(row["json"]) == {"index": 7}
    assert frame["error"].isna().all() and frame["caption"].map(type).eq(str).all()
    assert (frame["score"] <= 0).all()
    # The run's summary lies beside the output, with the time each stage was busy.
    saved = json.loads((tmp_path / "out" / ".gitcap" / "summary.json").read_text())
    assert saved["run_id"] == summary.run_id and saved["images_ok"] == 15
    assert saved["fingerprint"] == summary.fingerprint and saved["settings"]["input"]["format"] == "webdataset"
    assert set(saved["stage_seconds"]) == {"read", "decode", "caption"} and all(saved["stage_seconds"].values())


def test_parquet_source_keeps_its_other_columns(tmp_path, tiny_model):
    write_scenes(str(tmp_path / "in"), count=10, seed=3, format="parquet", shard_size=4)
    summary = run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model,
                                  input={"format": "parquet"}))

    assert summary.images_ok == 10 and summary.shards_done == 3
    frame = read_output(str(tmp_path / "out"))
    assert_each_key_once(frame, [f"{i:09d}" for i in range(10)])
    # The source's own caption, width and height keep their values under a prefixed name.
    for name in ("source_caption", "source_width", "source_height", "seed", "index", "background", "metadata"):
        assert name in frame.columns, name
    assert "source_key" not in frame.columns  # the key column is the key
    row = frame.set_index("key").loc["000000004"]
    assert row["source_width"] == row["width"] == 96 and row["index"] == 4


def test_every_data_file_keeps_a_parquet_sources_column_types(tmp_path, tiny_model):
    """A nullable column that is all null in one wave would type itself as text there and as a
    number elsewhere: readers, which take a folder's schema from one file, then fail or mix types."""
    folder = tmp_path / "in"
    folder.mkdir()
    image = scene_jpeg(0)
    for name, watermark in (("0.parquet", [None, None]), ("1.parquet", [0.25, None])):
        pq.write_table(pa.table({"image": [image, image], "pwatermark": pa.array(watermark, pa.float64()),
                                 "n": pa.array([None, None], pa.int32())}), folder / name)
    run_caption_job(job(str(folder), str(tmp_path / "out"), tiny_model, input={"format": "parquet"}))

    files = sorted((tmp_path / "out").glob("*.parquet"))
    assert len(files) == 2  # a wave per shard
    for file in files:
        schema = pq.read_schema(file)
        assert (schema.field("pwatermark").type, schema.field("n").type) == (pa.float64(), pa.int32()), file.name
    assert sorted(pd.read_parquet(tmp_path / "out")["pwatermark"].dropna()) == [0.25]


def test_image_folder_source_with_the_images_kept(tmp_path, tiny_model):
    write_scenes(str(tmp_path / "in"), count=7, seed=1, format="images")
    summary = run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model,
                                  input={"format": "images", "images_per_shard": 3},
                                  output={"include_image": True}))

    assert (summary.shards_total, summary.images_ok) == (3, 7)
    frame = read_output(str(tmp_path / "out"))
    assert_each_key_once(frame, [f"{i:09d}.jpg" for i in range(7)])
    assert frame["source"].str.endswith(".jpg").all()
    row = frame.set_index("key").loc["000000003.jpg"]  # a Hugging Face Image struct
    assert row["image"] == {"bytes": (tmp_path / "in" / "000000003.jpg").read_bytes(), "path": "000000003.jpg"}


def test_input_and_output_on_s3(tmp_path, tiny_model, s3_server, s3_bucket):
    options = s3_server.storage_options
    write_scenes(f"s3://{s3_bucket}/in", count=12, seed=5, format="webdataset", shard_size=5,
                 storage_options=options)
    spec = job(f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", tiny_model,
               input={"storage_options": options}, output={"storage_options": options})
    summary = run_caption_job(spec)

    assert (summary.shards_done, summary.images_ok, summary.exit_code) == (3, 12, 0)
    frame = read_output(f"s3://{s3_bucket}/out", options)
    assert_each_key_once(frame, [f"{n:05d}/{i:09d}" for n, r in enumerate([range(5), range(5, 10), range(10, 12)]) for i in r])
    assert frame["source"].str.startswith(f"s3://{s3_bucket}/in/").all()
    status = job_status(f"s3://{s3_bucket}/out", options)
    assert (status.shards_done, status.shards_total, status.images_ok, status.complete) == (3, 3, 12, True)
    assert s3_server.filesystem().exists(f"{s3_bucket}/out/.gitcap/complete.json")


def test_a_storage_outage_stops_the_run_and_the_next_run_resumes(tmp_path, tiny_model, s3_server, s3_bucket,
                                                                 monkeypatch):
    import socket

    from pipeline import runner
    from pipeline.captioner import resolve_model
    from pipeline.runner import StorageUnavailableError
    from pipeline.listing import list_shards
    from tests.conftest import S3Server

    streak = 2  # of 16: each failed shard waits out its retries (~9 s), and this test should not
    monkeypatch.setattr(runner, "STORAGE_FAILURE_STREAK", streak)
    count = 3 * streak
    inputs, out = f"s3://{s3_bucket}/in", str(tmp_path / "out")
    write_scenes(inputs, count=count, seed=6, format="webdataset", shard_size=1, storage_options=s3_server.storage_options)
    live = job(inputs, out, tiny_model, input={"storage_options": s3_server.storage_options})
    # The job's first run listed its shards while the storage was up, then the storage went away:
    # its endpoint now refuses connections.
    JobProgress(Folder(out)).start(live, lambda: list_shards(inputs, "webdataset", s3_server.storage_options),
                                   resolve_model(tiny_model)[1])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{probe.getsockname()[1]}"
    options = {**S3Server(gone).storage_options, "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(StorageUnavailableError, match=f"the storage of {streak} shards in a row failed"):
        run_caption_job(job(inputs, out, tiny_model, input={"storage_options": options}))
    status = job_status(out)
    assert status.shards_done == 0 and status.last_run["state"].startswith(f"failed: the storage of {streak} shards")

    # The storage is back: the next run captions everything, each image once.
    summary = run_caption_job(live)
    assert summary.complete and summary.exit_code == 0
    assert_each_key_once(read_output(out), [f"{n:05d}/{n:09d}" for n in range(count)])


def test_parquet_on_s3_with_an_image_file_that_is_missing(tiny_model, s3_server, s3_bucket):
    import pyarrow as pa

    options = s3_server.storage_options
    fs = s3_server.filesystem()
    fs.pipe(f"{s3_bucket}/in/images/there.jpg", scene_jpeg(2))
    cells = [{"bytes": scene_jpeg(1), "path": None}, {"bytes": None, "path": "images/there.jpg"},
             {"bytes": None, "path": "images/gone.jpg"}]
    table = pa.table({"id": ["a", "b", "c"], "image": cells, "url": ["u1", "u2", "u3"]})
    with fs.open(f"{s3_bucket}/in/part.parquet", "wb") as f:
        pq.write_table(table, f)
    summary = run_caption_job(job(f"s3://{s3_bucket}/in/part.parquet", f"s3://{s3_bucket}/out", tiny_model,
                                  input={"format": "parquet", "storage_options": options},
                                  output={"storage_options": options}))

    frame = read_output(f"s3://{s3_bucket}/out", options).set_index("key")
    assert_each_key_once(frame.reset_index(), ["a", "b", "c"])
    assert frame["caption"].notna().tolist() == [True, True, False]
    assert frame.loc["c", "error"].startswith("missing_file: ") and frame.loc["c", "url"] == "u3"
    assert (summary.images_ok, summary.images_failed, summary.exit_code) == (2, 1, 0)


def test_image_folder_on_s3(tiny_model, s3_server, s3_bucket):
    options = s3_server.storage_options
    write_scenes(f"s3://{s3_bucket}/in", count=5, seed=2, format="images", storage_options=options)
    summary = run_caption_job(job(f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", tiny_model,
                                  input={"format": "images", "images_per_shard": 2, "storage_options": options},
                                  output={"storage_options": options}))
    assert (summary.shards_done, summary.images_ok) == (3, 5)
    assert_each_key_once(read_output(f"s3://{s3_bucket}/out", options), [f"{i:09d}.jpg" for i in range(5)])


def test_odd_images_are_captioned_and_bad_ones_become_error_rows(tmp_path, tiny_model):
    zoo = image_zoo()
    members = [(f"{name}.{ext}", data) for name, (ext, data, _) in zoo.items()]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "zoo.tar").write_bytes(tar_bytes(members))
    summary = run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model))

    frame = read_output(str(tmp_path / "out")).set_index("key")
    assert_each_key_once(frame.reset_index(), [f"zoo/{name}" for name in zoo])
    for name, (_, _, expected) in zoo.items():
        row = frame.loc[f"zoo/{name}"]
        if isinstance(expected, tuple):
            assert pd.isna(row["error"]), (name, row["error"])
            assert isinstance(row["caption"], str), name
            assert (row["width"], row["height"]) == expected, name
        else:
            assert row["error"].startswith(f"{expected}: "), (name, row["error"])
            assert pd.isna(row["caption"]), name
    failed = sum(1 for _, _, e in zoo.values() if isinstance(e, str))
    assert (summary.images_failed, summary.images_ok) == (failed, len(zoo) - failed)
    assert summary.errors == {"empty": 1, "truncated": 1, "not_an_image": 1, "unsupported_format": 1,
                              "decompression_bomb": 1}
    assert summary.exit_code == 0  # bad images are error rows, not failed sources


def test_broken_shards_are_failed_sources_and_the_rest_goes_on(tmp_path, tiny_model):
    folder = tmp_path / "in"
    write_scene_shards(folder, shards=2, per_shard=4)
    whole = (folder / "00001.tar").read_bytes()
    (folder / "00002.tar").write_bytes(whole[: len(whole) // 2 + 100])  # cut inside a member
    (folder / "00003.tar").write_bytes(b"this is not a tar file" * 40)
    (folder / "00004.tar").write_bytes(tar_bytes([("a.jpg", scene_jpeg(1)), ("b.json", b"{}"), ("README", b"hi")]))
    summary = run_caption_job(job(str(folder), str(tmp_path / "out"), tiny_model))

    assert summary.shards_done == summary.shards_total == 5  # damaged shards are done: as failed sources
    failed = {f["shard"].rsplit("/", 1)[-1]: f["error"] for f in summary.failed_sources}
    assert set(failed) == {"00002.tar", "00003.tar"}
    assert all(e.startswith("shard_unreadable: ") for e in failed.values())
    assert summary.exit_code == 3
    assert summary.images_this_run == summary.images_ok + summary.images_failed  # a failed source is no image
    frame = read_output(str(tmp_path / "out")).set_index("key")
    assert frame.loc["00002/__shard__", "error"].startswith("shard_unreadable: ")
    assert frame.loc["00004/b", "error"].startswith("missing_image: ")  # metadata with no image
    assert pd.isna(frame.loc["00004/a", "error"])
    assert sum(k.startswith("00000/") or k.startswith("00001/") for k in frame.index) == 8
    assert frame.loc[[k for k in frame.index if k.startswith("00002/") and "__" not in k], "error"].isna().all()


def test_a_finished_job_does_nothing_on_rerun(tmp_path, tiny_model):
    write_scene_shards(tmp_path / "in", shards=2, per_shard=3)
    spec = job(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model)
    run_caption_job(spec)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")}

    again = run_caption_job(spec)
    assert (again.shards_this_run, again.images_this_run, again.shards_done, again.exit_code) == (0, 0, 2, 0)
    assert "nothing to do" in again.notes[0]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")} == before


def test_rerun_with_other_generation_settings_is_refused_unless_the_output_is_new(tmp_path, tiny_model):
    write_scene_shards(tmp_path / "in", shards=1, per_shard=3)
    run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model))

    with pytest.raises(JobMismatchError, match=r"generation\.num_beams: 1 -> 3.*new output\.path"):
        run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model, generation={"num_beams": 3}))
    fresh = run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "out2"), tiny_model, generation={"num_beams": 3}))
    assert fresh.images_ok == 3


def test_a_run_that_gives_way_leaves_the_job_record_and_plan_alone(tmp_path, tiny_model):
    write_scene_shards(tmp_path / "in", shards=1, per_shard=2)
    out = tmp_path / "out"
    # A driver that registered first but whose record `check` did not see (one of this process:
    # `check` takes it for a finished run's, `claim` does not), as if written just after the check.
    JobProgress(Folder(str(out))).write_run({**new_run_record("first", False), "registered_at": 0})

    with pytest.raises(ConcurrentRunError, match="being written by run first"):
        run_caption_job(job(str(tmp_path / "in"), str(out), tiny_model, generation={"num_beams": 3}))
    assert not (out / JOB_FILE).exists() and not (out / PLAN_FILE).exists()  # the first run's to write


def test_retry_failed_replaces_error_rows_only(tmp_path, tiny_model):
    folder = tmp_path / "in"
    folder.mkdir()
    good = [(f"{i:03d}.jpg", scene_jpeg(i)) for i in range(4)]
    bad = ("004.jpg", scene_jpeg(4)[:200])
    (folder / "s.tar").write_bytes(tar_bytes(good + [bad]))
    spec = job(str(folder), str(tmp_path / "out"), tiny_model)
    first = run_caption_job(spec)
    assert (first.images_ok, first.images_failed) == (4, 1)
    captions = read_output(str(tmp_path / "out")).set_index("key")["caption"]

    (folder / "s.tar").write_bytes(tar_bytes(good + [("004.jpg", scene_jpeg(4))]))  # the source is fixed
    retried = run_caption_job(spec, retry_failed=True)

    assert (retried.images_ok, retried.images_failed, retried.images_this_run) == (5, 0, 1)
    frame = read_output(str(tmp_path / "out"))
    assert_each_key_once(frame, [f"s/{i:03d}" for i in range(5)])
    assert frame["error"].isna().all()
    assert frame.set_index("key")["caption"].drop("s/004").equals(captions.drop("s/004"))
    assert len(list((tmp_path / "out").glob("*.parquet"))) == 1  # replaced in place, not added
    assert job_status(str(tmp_path / "out")).images_failed == 0
    nothing = run_caption_job(spec, retry_failed=True)
    assert nothing.images_this_run == 0 and "no failed rows" in nothing.notes[0]


def test_retry_failed_redoes_the_failed_row_of_a_key_that_is_there_twice(tmp_path, tiny_model):
    folder = tmp_path / "in"
    folder.mkdir()
    images = [scene_jpeg(0), scene_jpeg(1), scene_jpeg(2)[:200]]  # the second "x" is cut short
    pq.write_table(pa.table({"id": ["x", "y", "x"], "image": images}), folder / "p.parquet")  # ids unchecked
    spec = job(str(folder), str(tmp_path / "out"), tiny_model, input={"format": "parquet"})
    first = run_caption_job(spec)
    assert (first.images_ok, first.images_failed, first.images_this_run) == (2, 1, 3)

    images[2] = scene_jpeg(2)  # the source is fixed
    pq.write_table(pa.table({"id": ["x", "y", "x"], "image": images}), folder / "p.parquet")
    retried = run_caption_job(spec, retry_failed=True)

    assert (retried.images_ok, retried.images_failed, retried.images_this_run) == (3, 0, 1)
    frame = read_output(str(tmp_path / "out"))
    assert list(frame["key"]) == ["x", "y", "x"] and frame["error"].isna().all()
    assert frame["width"].tolist() == [48, 48, 48]


def test_sampled_captions_are_reproducible_and_listed_best_first(tmp_path, tiny_model):
    write_scene_shards(tmp_path / "in", shards=2, per_shard=5)
    sampling = {"do_sample": True, "num_return_sequences": 3, "seed": 11, "max_new_tokens": 6}
    run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "a"), tiny_model, generation=sampling,
                        compute={"batch_size": 3}))
    run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "b"), tiny_model, generation=sampling,
                        compute={"batch_size": 7}))

    a = read_output(str(tmp_path / "a")).set_index("key").sort_index()
    b = read_output(str(tmp_path / "b")).set_index("key").sort_index()
    assert a["captions"].map(list).equals(b["captions"].map(list))  # other batches, same samples
    for _, row in a.iterrows():
        assert len(row["captions"]) == len(row["scores"]) == 3
        assert list(row["scores"]) == sorted(row["scores"], reverse=True)
        assert row["caption"] == row["captions"][0] and row["score"] == row["scores"][0]


def test_output_loads_in_pandas_pyarrow_duckdb_and_datasets(tmp_path, tiny_model):
    write_scene_shards(tmp_path / "in", shards=3, per_shard=2)
    run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model))
    out = str(tmp_path / "out")
    (tmp_path / "out" / ".gitcap" / "attempts").mkdir(exist_ok=True)
    (tmp_path / "out" / ".gitcap" / "attempts" / "x-part.parquet.tmp").write_bytes(b"half a file")  # ignored

    assert len(pd.read_parquet(out)) == 6
    assert pq.read_table(out).num_rows == 6
    duckdb = pytest.importorskip("duckdb")
    assert duckdb.sql(f"select count(distinct key) from read_parquet('{out}/*.parquet')").fetchall() == [(6,)]
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_dir=out, split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(loaded["key"]) == sorted(pd.read_parquet(out)["key"])


def test_prompted_generation_keeps_only_the_answer(tmp_path, tiny_model):
    write_scene_shards(tmp_path / "in", shards=1, per_shard=2)
    summary = run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model,
                                  generation={"prompt": "a picture of", "max_new_tokens": 5}))
    assert summary.images_ok == 2
    captions = read_output(str(tmp_path / "out"))["caption"]
    assert not any(c.startswith("a picture of") for c in captions)


def test_status_reads_progress_from_storage_alone(tmp_path, tiny_model):
    write_scene_shards(tmp_path / "in", shards=4, per_shard=2)
    run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model))
    status = job_status(str(tmp_path / "out"))
    assert (status.shards_done, status.shards_total, status.images_ok, status.images_failed) == (4, 4, 8, 0)
    assert status.complete and status.last_run["state"] == "finished"
    assert "4/4 done" in status.format()
    assert json.loads(json.dumps(status.to_dict(), default=str))["data_files"] == 4
    assert os.path.exists(tmp_path / "out" / ".gitcap" / "complete.json")
