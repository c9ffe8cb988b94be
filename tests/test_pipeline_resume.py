"""Kill `gitcap run` with SIGKILL at several points and run it again: the output ends with every
image exactly once, readers never see a duplicate in between, and a rerun redoes only the shards
that were not committed.

Each run is a real `python -m jobs.cli run` in its own session, on its own local Ray; after a kill
the Ray processes it started (they keep its session id) are ended by PID before the next run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.progress import COMMITS, PROGRESS
from tests.pipeline_fixtures import (  # noqa: F401  (fixtures)
    assert_each_key_once,
    process_session_members,
    read_output,
    tiny_model,
    write_scene_shards,
)

REPO = Path(__file__).resolve().parent.parent
SHARDS, PER_SHARD = 10, 6
ALL_KEYS = [f"{n:05d}/{i:06d}" for n in range(SHARDS) for i in range(n * PER_SHARD, (n + 1) * PER_SHARD)]


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("resume")
    write_scene_shards(root / "in", SHARDS, PER_SHARD)
    spec = {
        "input": {"path": str(root / "in")},
        "model": {"path": tiny_model},
        "output": {"path": str(root / "out")},
        "compute": {"batch_size": 4, "shards_per_wave": 1},
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start_run(spec: Path, failpoint: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "GITCAP_FAILPOINT"}
    if failpoint:
        env["GITCAP_FAILPOINT"] = failpoint
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "run", str(spec), "--num-cpus", "2", "--no-progress", "--json"],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(run: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    """Wait for the run, then end whatever Ray processes it left (a killed driver leaves some)."""
    try:
        out, err = run.communicate(timeout=timeout)
    finally:
        for pid in process_session_members(run.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return run.returncode, out, err


def committed(out: Path) -> dict[str, dict]:
    """{data file: the shards its footer names}, from the data files themselves."""
    from pipeline.sink import ParquetSink
    from pipeline.storage import Folder

    sink = ParquetSink(Folder(str(out)))
    return {name: sink.read_info(name) for name in sink.data_files()}


def shards_in(files: dict[str, dict]) -> list[str]:
    return [shard for info in files.values() for shard in info["shards"]]


def test_killed_runs_resume_to_every_image_exactly_once(spec_file):
    out = Path(yaml.safe_load(spec_file.read_text())["output"]["path"])

    # 1. Killed after the first wave is captioned, before any data file is written.
    code, _, log = finish(start_run(spec_file, "before-data:1"))
    assert code == -signal.SIGKILL, log
    assert committed(out) == {} and (out / PROGRESS / "job.json").exists()
    assert read_output(str(out)).empty

    # 2. Killed just after the 2nd data file landed, before its manifest: it is committed anyway.
    code, _, log = finish(start_run(spec_file, "after-data:2"))
    assert code == -signal.SIGKILL, log
    files = committed(out)
    assert len(files) == 2 and len(set(shards_in(files))) == 2
    assert len(list((out / COMMITS).glob("*.json"))) == 1  # the 2nd manifest was never written
    assert_each_key_once(read_output(str(out)), [k for k in ALL_KEYS if _shard_of(k) in _stems(files)])

    # 3. Killed from outside, at no chosen point, as soon as this run has committed something.
    run = start_run(spec_file)
    deadline = time.time() + 120
    while len(list(out.glob("*.parquet"))) <= 2 and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    finish(run)
    before_last = committed(out)
    shards = shards_in(before_last)
    assert len(shards) == len(set(shards)), "a shard was committed twice"
    assert_each_key_once(read_output(str(out)), [k for k in ALL_KEYS if _shard_of(k) in _stems(before_last)])

    # 4. Killed after the last commit, before the run is recorded as finished.
    code, _, log = finish(start_run(spec_file, "before-finish"))
    assert code == -signal.SIGKILL, log
    files = committed(out)
    assert_each_key_once(read_output(str(out)), ALL_KEYS)
    # Bounded redo: the run re-read no committed shard; it captioned only the shards left.
    new = {name: info for name, info in files.items() if name not in before_last}
    assert sorted(shards_in(new)) == sorted(set(shards_in(files)) - set(shards_in(before_last)))
    assert not (out / PROGRESS / "complete.json").exists()

    # 5. The finished job: a rerun does nothing, and says the job is complete.
    code, printed, log = finish(start_run(spec_file))
    assert code == 0, log
    summary = json.loads(printed)
    assert (summary["shards_this_run"], summary["images_this_run"], summary["complete"]) == (0, 0, True)
    assert (summary["images_ok"], summary["shards_done"]) == (SHARDS * PER_SHARD, SHARDS)
    assert len(list((out / COMMITS).glob("*.json"))) == len(files)  # the missing manifest was rebuilt
    assert not list(out.glob(f"{PROGRESS}/attempts/*"))  # no staging leftovers


def _shard_of(key: str) -> str:
    return key.split("/", 1)[0]


def _stems(files: dict[str, dict]) -> set[str]:
    return {Path(shard).name.removesuffix(".tar") for shard in shards_in(files)}
