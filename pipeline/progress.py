"""Progress beside the output, in the same storage: what the job is, what is done, how fast.

    OUTPUT/part-*.parquet          committed data (see pipeline.sink): the truth
    OUTPUT/.gitcap/job.json        the job's decisive settings and fingerprint, shard count
    OUTPUT/.gitcap/shards.json.gz  the shard list, fixed when the job first ran
    OUTPUT/.gitcap/commits/*.json  one manifest per data file: its shards and counts (an index)
    OUTPUT/.gitcap/runs/*.json     one record per run: start, last update, throughput
    OUTPUT/.gitcap/summary.json    the last run's summary: counts, per-stage timings, throughput
    OUTPUT/.gitcap/complete.json   written once every shard is committed
    OUTPUT/.gitcap/attempts/       local files being written, renamed into place when whole

The folder is hidden (a leading dot) because that is the one name every reader skips: pyarrow
and pandas skip `.` and `_`, Hugging Face `datasets` only `.`; a Spark-style `_SUCCESS` would be
read by `datasets` as a data file.

Every file here is written whole or not at all (`storage.Folder.publish`). Manifests are an index
of the data files, written right after each one lands; `reconcile` rebuilds any that a crash left
missing or stale from the data files' footers, so a manifest can never disagree with the data.
`job_status` reads only these files: `gitcap status` needs no cluster.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.job import CaptionJob
from pipeline.sink import ParquetSink
from pipeline.sources import Shard
from pipeline.storage import Folder

PROGRESS = ".gitcap"
JOB_FILE = f"{PROGRESS}/job.json"
PLAN_FILE = f"{PROGRESS}/shards.json.gz"
COMMITS = f"{PROGRESS}/commits"
RUNS = f"{PROGRESS}/runs"
SUCCESS_FILE = f"{PROGRESS}/complete.json"
SUMMARY_FILE = f"{PROGRESS}/summary.json"  # the last run's summary: counts, stage timings, speed
STALE_RUN_S = 300  # a "running" run record older than this probably belongs to a killed run
HEARTBEAT_S = 30  # a running run rewrites its record at least this often


class JobMismatchError(ValueError):
    """The output folder holds progress of a job with other decisive settings."""


class NoJobError(FileNotFoundError):
    """The folder holds no gitcap progress."""


class ConcurrentRunError(ValueError):
    """Another run is writing to the same output: two would caption the same shards twice."""


def commit_name(data_file: str) -> str:
    return f"{COMMITS}/{data_file.rsplit('.', 1)[0]}.json"


class JobProgress:
    """Reads and writes the `.gitcap/` files of one output folder."""

    def __init__(self, folder: Folder):
        self.folder = folder
        self.sink = ParquetSink(folder)

    # -------------------------------------------------------------- the job

    def job_record(self) -> dict[str, Any] | None:
        try:
            return self.folder.read_json(JOB_FILE)
        except FileNotFoundError:
            return None

    def check(self, job: CaptionJob) -> dict[str, Any] | None:
        """The stored job record; `JobMismatchError` if it has other decisive settings than `job`
        and data is committed (a resume would mix captions made two ways); `ConcurrentRunError`
        if another run is still writing here."""
        active = self.active_run()
        if active is not None:
            raise self._busy(active)
        record = self.job_record()
        if record is not None and record["fingerprint"] != job.fingerprint() and self.sink.data_files():
            changes = "; ".join(_differences(record.get("settings", {}), job.decisive_settings()))
            raise JobMismatchError(
                f"{self.folder.uri('')} holds output of a job with other settings ({changes or 'fingerprint differs'}). "
                "Resuming would mix captions made two ways: rerun with the original settings, "
                "or set a new output.path for the new settings."
            )
        return record

    def start(self, job: CaptionJob, list_plan: Callable[[], list[Shard]], model_id: str) -> tuple[dict, list[Shard]]:
        """The job record and shard list: the stored ones when the same job ran here before (a
        resume), else new ones. Refuses a job with other decisive settings once data is committed."""
        record = self.check(job)
        if record is not None and record["fingerprint"] != job.fingerprint():
            record = None  # nothing committed yet: the new settings simply replace the old
        if record is not None:
            shards = [Shard(s["uri"], s["format"], tuple(s.get("files", ()))) for s in self._read_plan()]
            return record, shards
        shards = list_plan()
        plan = [{"uri": s.uri, "format": s.format, **({"files": list(s.files)} if s.files else {})} for s in shards]
        self.folder.write_bytes(PLAN_FILE, gzip.compress(json.dumps(plan).encode()))
        record = {
            "fingerprint": job.fingerprint(),
            "settings": job.decisive_settings(),
            "model": model_id,
            "output": self.folder.uri(""),
            "shards": len(shards),
            "created_at": time.time(),
        }
        self.folder.write_json(JOB_FILE, record)  # written last: its presence means the plan is there
        return record, shards

    def _read_plan(self) -> list[dict]:
        return json.loads(gzip.decompress(self.folder.read_bytes(PLAN_FILE)))

    # -------------------------------------------------------------- commits

    def commits(self) -> dict[str, dict[str, Any]]:
        """{data file name: manifest} as stored (see `reconcile` for the checked version)."""
        names = list(self.folder.list(COMMITS, suffix=".json"))
        manifests = {}
        for data in self.folder.read_many(names).values():
            manifest = json.loads(data)
            manifests[manifest["file"]] = manifest
        return manifests

    def write_commit(self, data_file: str, manifest: dict[str, Any]) -> None:
        self.folder.write_json(commit_name(data_file), {**manifest, "file": data_file})

    def reconcile(self, repair: bool = True) -> dict[str, dict[str, Any]]:
        """{data file: manifest} checked against the data files, which are the truth: a file that
        landed just before a crash gets its manifest from its footer; a manifest whose file is gone
        goes. With `repair`, the stored manifests are fixed too and local staging leftovers removed."""
        files = self.sink.data_files()
        manifests = self.commits()
        for name, size in files.items():
            if manifests.get(name, {}).get("size") != size:
                manifests[name] = {**self.sink.read_info(name), "size": size, "file": name}
                if repair:
                    self.write_commit(name, manifests[name])
        for name in set(manifests) - set(files):
            if repair:
                self.folder.delete(commit_name(name))
            del manifests[name]
        if repair:
            self.folder.clear_attempts()
        return manifests

    # -------------------------------------------------------------- runs

    def write_run(self, run: dict[str, Any]) -> None:
        """Record the run's state; stamps `updated_at` on the dict too (the heartbeat's clock)."""
        run["updated_at"] = time.time()
        self.folder.write_json(f"{RUNS}/{run['run']}.json", run)

    def runs(self) -> list[dict[str, Any]]:
        names = list(self.folder.list(RUNS, suffix=".json"))
        return sorted((json.loads(d) for d in self.folder.read_many(names).values()), key=lambda r: r["started_at"])

    def active_run(self) -> dict[str, Any] | None:
        """A run recorded as running that is alive: on this host its process exists; elsewhere it
        updated its record (at every commit, and every `HEARTBEAT_S`) less than `STALE_RUN_S` ago."""
        for run in reversed(self.runs()):
            if _alive(run):
                return run
        return None

    def claim(self, run: dict[str, Any]) -> None:
        """Register `run` as this folder's writer, or raise `ConcurrentRunError`.

        `check` alone leaves a window: two runs started together both find no live run. So each
        run writes its record first, then reads the others: of two live runs that see each other,
        the one registered later gives way. A run that read before the other wrote registered
        before it too, so the other sees it and gives way: never both go on."""
        run["registered_at"] = time.time()
        self.write_run(run)
        for other in self.runs():
            if other["run"] == run["run"] or not _alive(other, this_process_too=True):
                continue
            if (other.get("registered_at", other["started_at"]), other["run"]) < (run["registered_at"], run["run"]):
                self.write_run({**run, "state": f"gave way to run {other['run']}"})
                raise self._busy(other)

    def _busy(self, active: dict[str, Any]) -> ConcurrentRunError:
        return ConcurrentRunError(
            f"{self.folder.uri('')} is being written by run {active['run']} (host {active['host']}, "
            f"pid {active['pid']}, last update {time.time() - active['updated_at']:.0f} s ago). Wait for it to "
            f"finish; if it was killed on another machine, its record goes stale after {STALE_RUN_S} s."
        )

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.folder.write_json(SUMMARY_FILE, summary)

    def mark_complete(self, summary: dict[str, Any]) -> None:
        self.folder.write_json(SUCCESS_FILE, summary)


def new_run_record(run_id: str, retry_failed: bool) -> dict[str, Any]:
    return {
        "run": run_id,
        "state": "running",
        "retry_failed": retry_failed,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": time.time(),
        "startup_s": None,
        "shards_committed": 0,
        "images": 0,
        "images_per_s": None,
    }


def _alive(run: dict[str, Any], this_process_too: bool = False) -> bool:
    if run["state"] != "running" or time.time() - run["updated_at"] > STALE_RUN_S:
        return False
    return run["host"] != socket.gethostname() or _process_alive(run["pid"], this_process_too)


def _process_alive(pid: int, this_process_too: bool = False) -> bool:
    if pid == os.getpid() and not this_process_too:
        return False  # this process is starting a new run: its old record is from a run it finished
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    changes = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _differences(a, b, f"{prefix}{name}.")
        elif a != b:
            changes.append(f"{prefix}{name}: {a!r} -> {b!r}")
    return changes


# --- status, from storage alone ---------------------------------------------------------------


@dataclass
class JobStatus:
    output: str
    model: str
    fingerprint: str
    shards_total: int
    shards_done: int
    images_ok: int
    images_failed: int
    errors: dict[str, int]
    failed_sources: list[dict[str, str]]
    data_files: int
    complete: bool
    last_run: dict[str, Any] | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        pct = 100 * self.shards_done / self.shards_total if self.shards_total else 100.0
        lines = [
            f"output   {self.output}",
            f"model    {self.model}",
            f"shards   {self.shards_done}/{self.shards_total} done ({pct:.1f}%)"
            + (", complete" if self.complete else ""),
            f"images   {self.images_ok} ok, {self.images_failed} failed, in {self.data_files} data files",
        ]
        lines += describe_failures(self.errors, self.failed_sources, "errors   ", "failed   ")
        if self.last_run:
            run = self.last_run
            age = time.time() - run["updated_at"]
            speed = f", {self.images_per_s:.1f} images/s" if self.images_per_s else ""
            state = run["state"]
            if state == "running" and age > STALE_RUN_S:
                state = "stopped or stalled (a running job updates this at every commit)"
            lines.append(f"last run {run['run']}: {state}, updated {_duration(age)} ago{speed}")
        if self.eta_s is not None and not self.complete:
            lines.append(f"eta      {_duration(self.eta_s)} at that speed")
        return "\n".join(lines)


def job_status(output: str, storage_options: dict[str, Any] | None = None) -> JobStatus:
    """The job's progress, read from the output folder alone (no cluster, nothing written)."""
    progress = JobProgress(Folder(output, storage_options))
    record = progress.job_record()
    if record is None:
        raise NoJobError(f"{output}: no gitcap job here (no {JOB_FILE})")
    manifests = progress.reconcile(repair=False)
    done = {shard for m in manifests.values() for shard in m["shards"]}
    errors: Counter = Counter()
    for m in manifests.values():
        errors.update(m.get("errors", {}))
    runs = progress.runs()
    last = runs[-1] if runs else None
    speed = last.get("images_per_s") if last else None
    ok = sum(m["ok"] for m in manifests.values())
    eta = None
    if speed and done:
        per_shard = sum(m["rows"] for m in manifests.values()) / len(done)
        eta = (record["shards"] - len(done)) * per_shard / speed
    return JobStatus(
        output=record.get("output", output),
        model=record.get("model", ""),
        fingerprint=record["fingerprint"],
        shards_total=record["shards"],
        shards_done=len(done),
        images_ok=ok,
        images_failed=sum(m["failed"] for m in manifests.values()),
        errors=dict(errors),
        failed_sources=[f for m in manifests.values() for f in m.get("failed_sources", [])],
        data_files=len(manifests),
        complete=len(done) >= record["shards"],
        last_run=last,
        images_per_s=speed,
        eta_s=eta,
        settings=record.get("settings", {}),
    )


def describe_failures(errors: dict[str, int], failed_sources: list[dict[str, str]], errors_label: str,
                      source_label: str, limit: int = 10) -> list[str]:
    """Lines for error counts by reason and for the sources that failed (the first `limit`)."""
    lines = [errors_label + ", ".join(f"{k}: {v}" for k, v in sorted(errors.items()))] if errors else []
    lines += [f"{source_label}{f['shard']}: {f['error']}" for f in failed_sources[:limit]]
    if len(failed_sources) > limit:
        lines.append(f"{source_label}... and {len(failed_sources) - limit} more")
    return lines


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
