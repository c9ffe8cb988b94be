"""The driver's side of exactly-once, without Ray: the run lease (renewed whatever the run is
doing, lost when it cannot be renewed, awaited by a Ray job's driver), the order in which a run
starts and finishes, and what `gitcap status` shows."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.progress as progress_module
import pipeline.runner as runner_module
from pipeline.job import CaptionJob
from pipeline.progress import (
    JOB_FILE,
    RUNS,
    ConcurrentRunError,
    JobMismatchError,
    JobProgress,
    LeaseLostError,
    RunLease,
    job_status,
    new_run_record,
)
from pipeline.runner import CompletedShard, ShardAssembler, _OutputFormat, _retry_tasks, _RetryWriter, _Run, _WaveWriter
from pipeline.sources import Shard
from pipeline.storage import Folder

# --- helpers ----------------------------------------------------------------------------------


def caption_job(out, **generation) -> CaptionJob:
    return CaptionJob.from_dict({"input": {"path": "in/{0..3}.tar"}, "output": {"path": str(out)},
                                 "generation": generation})


RESULT_SCHEMA = pa.schema([
    ("shard", pa.string()), ("seq", pa.int64()), ("key", pa.string()), ("source", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("meta", pa.binary()), ("error", pa.string()),
    ("caption", pa.string()), ("score", pa.float32()), ("image", pa.binary()), ("caption_s", pa.float32()),
    ("marker", pa.string())])


def captioned(shard: str, seqs, errors=(), meta=None, keys=None, marker_rows=None) -> pa.Table:
    """Captioner output rows of `shard` at positions `seqs`, then its end marker if `marker_rows`
    is given; `errors`: the positions that failed, or {position: error}; `keys`: {position: key}."""
    errors = errors if isinstance(errors, dict) else {s: f"not_an_image: {s}" for s in errors}
    rows = [{"shard": shard, "seq": s, "key": (keys or {}).get(s, f"{shard}/{s}"), "source": shard, "width": 8,
             "height": 8, "meta": pickle.dumps(meta(s) if meta else {}),
             "error": errors.get(s), "caption": None if s in errors else "a red square",
             "score": None if s in errors else -0.5, "image": None, "caption_s": 0.0} for s in seqs]
    if marker_rows is not None:
        rows.append({"shard": shard, "seq": -1, "key": "", "source": shard,
                     "marker": f'{{"rows": {marker_rows}, "storage_error": null}}'})
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def completed(shard: str, seqs, **values) -> CompletedShard:
    return CompletedShard(shard, captioned(shard, seqs, **values).drop_columns(["caption_s", "marker"]))


def commit(progress: JobProgress, job: CaptionJob, run_id: str, *shards: CompletedShard) -> None:
    writer = _WaveWriter(progress, job, _OutputFormat(job, "m", {}), RunLease(progress, new_run_record(run_id, False)), len(shards), 60)
    for shard in shards:
        writer.add(shard)
    writer.flush()


@pytest.fixture
def fast_lease(monkeypatch):
    """Leases in seconds, not minutes: stale after 2 s, renewed every 0.1 s."""
    monkeypatch.setattr(progress_module, "STALE_RUN_S", 2.0)
    monkeypatch.setattr(progress_module, "HEARTBEAT_S", 0.1)


def seen_from_another_host(monkeypatch) -> None:
    """From here on, this process judges run records as a driver on another machine would."""
    monkeypatch.setattr(socket, "gethostname", lambda: "another-host")


# --- the lease --------------------------------------------------------------------------------


def test_a_run_keeps_its_lease_while_no_result_arrives(tmp_path, fast_lease, monkeypatch):
    job = caption_job(tmp_path)
    progress = JobProgress(Folder(str(tmp_path)))
    run = _Run(progress, time.time(), False)
    progress.claim(run.lease.record)
    run.lease.start()

    def loading_the_model():  # minutes without a result, here three times STALE_RUN_S
        time.sleep(3 * progress_module.STALE_RUN_S)
        yield from ()

    run.execute(loading_the_model(), _WaveWriter(progress, job, _OutputFormat(job, "m", {}), run.lease, 1, 60), 4, None)
    seen_from_another_host(monkeypatch)
    with pytest.raises(ConcurrentRunError, match=f"being written by run {run.id}"):
        JobProgress(Folder(str(tmp_path))).check(job)
    run.lease.end(state="finished")
    assert JobProgress(Folder(str(tmp_path))).check(job) is None


def test_on_this_host_a_live_process_holds_the_output_however_old_its_record(tmp_path, fast_lease):
    job = caption_job(tmp_path)
    progress = JobProgress(Folder(str(tmp_path)))
    driver = subprocess.Popen(["sleep", "60"])  # noqa: S607  (another driver's process)
    try:
        silent = time.time() - 100 * progress_module.STALE_RUN_S
        record = {**new_run_record("r1", False), "pid": driver.pid, "started_at": time.time()}
        progress.folder.write_json(f"{RUNS}/r1.json", {**record, "updated_at": silent})
        with pytest.raises(ConcurrentRunError, match="being written by run r1"):
            progress.check(job)
        # The same PID, but a process younger than the run: the run died and its PID was reused.
        progress.folder.write_json(f"{RUNS}/r1.json", {**record, "started_at": time.time() - 3600, "updated_at": silent})
        assert progress.check(job) is None
    finally:
        driver.kill()
        driver.wait()


def test_a_lease_that_cannot_be_renewed_is_lost_and_nothing_more_is_committed(tmp_path, fast_lease, caplog):
    job = caption_job(tmp_path)
    progress = JobProgress(Folder(str(tmp_path)))
    lease = RunLease(progress, new_run_record("r1", False))
    progress.claim(lease.record)
    lease.start()
    runs = tmp_path / RUNS
    runs.rename(tmp_path / "runs-elsewhere")
    runs.write_text("the output's storage refuses writes to the run records")
    deadline = time.time() + 5 * progress_module.STALE_RUN_S
    while time.time() < deadline:
        try:
            lease.check()
        except LeaseLostError:
            break
        time.sleep(0.05)
    with pytest.raises(LeaseLostError, match="could not renew its record"):
        lease.check()
    assert "could not renew run r1's record" in caplog.text  # each failure was said, not swallowed

    writer = _WaveWriter(progress, job, _OutputFormat(job, "m", {}), lease, 1, 60)
    writer.add(completed("s0", range(2)))
    with pytest.raises(LeaseLostError):
        writer.flush()
    assert not list(tmp_path.glob("*.parquet"))
    runs.unlink()
    (tmp_path / "runs-elsewhere").rename(runs)
    lease.end(state="failed: lease lost")  # lost for good, even with the storage back
    with pytest.raises(LeaseLostError):
        lease.check()


def test_a_ray_job_driver_waits_for_a_run_on_another_host_to_go_stale(tmp_path, fast_lease, monkeypatch, caplog):
    job = caption_job(tmp_path)
    progress = JobProgress(Folder(str(tmp_path)))
    killed = {**new_run_record("lost-head", False), "host": "the-lost-head"}
    progress.write_run(killed)  # its driver died just now, with the cluster's head

    with pytest.raises(ConcurrentRunError, match="run lost-head"):  # at a terminal: at once
        progress.check(job)
    monkeypatch.setenv(progress_module.RAY_JOB_ENV, "{}")  # KubeRay's retry: a new driver, a new cluster
    started = time.time()
    assert progress.check(job) is None
    assert time.time() - started >= progress_module.STALE_RUN_S - 0.5
    assert "held by run lost-head on host the-lost-head" in caplog.text

    # A run elsewhere that keeps renewing its record is alive: the wait ends, and the driver gives up.
    live = RunLease(progress, {**new_run_record("live", False), "host": "the-other-cluster"})
    progress.claim(live.record)
    live.start()
    try:
        started = time.time()
        with pytest.raises(ConcurrentRunError, match="run live"):
            progress.check(job)
        waited = time.time() - started
        assert progress_module.STALE_RUN_S <= waited < progress_module.STALE_RUN_S + 1
    finally:
        live.end(state="finished")


# --- starting and finishing -------------------------------------------------------------------


def test_committed_data_decides_the_settings_not_job_json(tmp_path):
    greedy, beams = caption_job(tmp_path), caption_job(tmp_path, num_beams=3)
    progress = JobProgress(Folder(str(tmp_path)))
    progress.start(greedy, lambda: [], "m")
    commit(progress, greedy, "r1", completed("s0", range(2)))
    # An older gitcap let a run that then gave way replace job.json with its own settings.
    progress.folder.write_json(JOB_FILE, {**progress.job_record(), "fingerprint": beams.fingerprint(),
                                          "settings": beams.decisive_settings()})

    with pytest.raises(JobMismatchError, match=f"committed with fingerprint {greedy.fingerprint()}"):
        progress.check(beams)
    assert progress.check(greedy) is not None
    progress.start(greedy, lambda: [], "m")
    assert progress.job_record()["fingerprint"] == greedy.fingerprint()  # repaired from the data


def test_a_run_holds_the_output_until_its_views_are_finished(tmp_path, monkeypatch):
    job = CaptionJob.from_dict({"input": {"path": "in/{0..1}.tar"}, "output": {"path": str(tmp_path), "filter": {}},
                                "compute": {"batch_size": 8}})
    progress = JobProgress(Folder(str(tmp_path)))
    progress.start(job, lambda: [], "m")
    run = _Run(progress, time.time(), False)
    progress.claim(run.lease.record)
    run.lease.start()
    writer = _WaveWriter(progress, job, _OutputFormat(job, "m", {}), run.lease, 1, 60)
    for shard in ("s0", "s1"):
        writer.add(completed(shard, range(2)))
        writer.flush()
    run.shards_total = 2
    states = []

    def finish_dataset(*args):  # the views: slow after a filter change (every data file is read)
        states.append({r["run"]: r["state"] for r in progress.runs()}[run.id])
        return real(*args)

    real = runner_module.finish_dataset
    monkeypatch.setattr(runner_module, "finish_dataset", finish_dataset)
    summary = run.finish(job, writer, True)

    assert states == ["running"]  # no other run could start and commit under the views being built
    assert summary.complete and (tmp_path / progress_module.SUCCESS_FILE).exists()
    assert {r["run"]: r["state"] for r in progress.runs()}[run.id] == "finished"


# --- gitcap status ----------------------------------------------------------------------------


def test_status_shows_the_live_run_not_one_that_gave_way(tmp_path):
    progress = JobProgress(Folder(str(tmp_path)))
    progress.start(caption_job(tmp_path), lambda: [], "m")
    driver = {**new_run_record("20260101T000000-aaaaaa", False), "pid": os.getppid()}  # a driver's process
    lease = RunLease(progress, driver)
    progress.claim(lease.record)
    lease.update(images_per_s=250.0, shards_committed=1)
    with pytest.raises(ConcurrentRunError):
        progress.claim(new_run_record("20260101T000001-bbbbbb", False))  # a second driver, a moment later

    status = job_status(str(tmp_path))
    assert status.last_run["run"] == "20260101T000000-aaaaaa" and status.images_per_s == 250.0
    assert "last run 20260101T000000-aaaaaa: running" in status.format()
    lease.end(state="stopped: KeyboardInterrupt")
    assert job_status(str(tmp_path)).last_run["run"] == "20260101T000000-aaaaaa"  # still not the one that gave way


# --- shards back together, and what a run counts ----------------------------------------------


def test_a_shard_delivered_again_after_it_completed_is_ignored():
    assembler = ShardAssembler()
    whole = captioned("s0", range(3), marker_rows=3)
    (done,) = assembler.add(whole)
    assert done.rows.num_rows == 3
    assert assembler.add(whole) == []  # Ray executed the task again: all of it once more
    assert assembler.add(captioned("s0", range(2))) == []  # or part of it
    assert not assembler.parts and not assembler.seen and not assembler.expected  # nothing kept


def test_a_run_counts_each_committed_image_once(tmp_path):
    job = CaptionJob.from_dict({"input": {"path": "in"}, "output": {"path": str(tmp_path)}, "compute": {"batch_size": 8}})
    progress = JobProgress(Folder(str(tmp_path)))
    progress.start(job, lambda: [], "m")
    run = _Run(progress, time.time(), False)
    progress.claim(run.lease.record)
    run.lease.start()
    run.shards_total = 3
    damaged = {2: "shard_unreadable: the tar stops at byte 5120"}  # the rest of s1: a failed source, no image
    blocks = [
        captioned("s0", range(3), errors={1}),
        captioned("s0", range(2)),  # delivered twice (a Ray retry)
        captioned("s0", [], marker_rows=3),
        captioned("s1", range(3), errors=damaged, keys={2: "s1/__shard__"}, marker_rows=3),
        pa.Table.from_pylist([{"shard": "s2", "seq": 0, "key": "s2/0", "source": "s2"},
                              {"shard": "s2", "seq": -1, "key": "", "source": "s2",
                               "marker": '{"rows": 1, "storage_error": "s2: storage failed"}'}], schema=RESULT_SCHEMA),
    ]
    shown = []
    writer = _WaveWriter(progress, job, _OutputFormat(job, "m", {}), run.lease, 1, 60)
    run.execute(iter(blocks), writer, 3, shown.append)
    summary = run.finish(job, writer, True)

    # s0's three images and s1's two: not the repeats, the failed source, or s2 (not committed).
    assert summary.images_this_run == summary.images_ok + summary.images_failed == 5
    assert [f["shard"] for f in summary.failed_sources] == ["s1", "s2"]
    assert (shown[-1].images, shown[-1].failed) == (6, 1)  # live: s2's image came in, once
    assert progress.runs()[0]["images"] == 5


def test_a_retry_redoes_the_failed_row_of_a_key_that_is_there_twice(tmp_path):
    job, shard = caption_job(tmp_path), Shard("p.parquet", "parquet")
    progress = JobProgress(Folder(str(tmp_path)))
    twice = {0: "x", 1: "y", 2: "x"}  # a Parquet key column is not checked for uniqueness
    commit(progress, job, "r1", completed(shard.uri, range(3), errors={2}, keys=twice))
    manifests = progress.reconcile()

    (task,), targets = _retry_tasks(progress, manifests, [shard])
    assert task.skip_keys == {"y"}  # x is read again: one of its rows failed
    writer = _RetryWriter(progress, job, _OutputFormat(job, "m", {}), RunLease(progress, new_run_record("r2", False)), targets, manifests,
                          [shard])
    writer.add(completed(shard.uri, [0, 2], keys=twice))  # both x rows came back, captioned
    writer.flush()

    rows = pq.read_table(tmp_path).select(["key", "error", "caption"]).to_pylist()
    assert rows == [{"key": k, "error": None, "caption": "a red square"} for k in ("x", "y", "x")]
    assert writer.images_committed == 1


def test_a_retry_keeps_the_old_files_column_types_or_makes_them_text(tmp_path):
    job, shard = caption_job(tmp_path), Shard("w.tar", "webdataset")
    progress = JobProgress(Folder(str(tmp_path)))
    commit(progress, job, "r1", completed(shard.uri, range(3), errors={1, 2}, meta=lambda s: {"pwatermark": 0.5}))
    manifests = progress.reconcile()
    retry = _RetryWriter(progress, job, _OutputFormat(job, "m", {}), RunLease(progress, new_run_record("r2", False)),
                         {shard.uri: next(iter(manifests))}, manifests, [shard])

    retry.add(completed(shard.uri, [1], meta=lambda s: {"pwatermark": None}))  # all null: typed text in this wave
    retry.flush()
    assert pq.read_table(tmp_path)["pwatermark"].to_pylist() == [0.5, None, 0.5]  # stays a number

    retry.add(completed(shard.uri, [2], meta=lambda s: {"pwatermark": "unknown"}))  # text that is no number
    retry.flush()
    assert pq.read_table(tmp_path)["pwatermark"].to_pylist() == ["0.5", None, "unknown"]
