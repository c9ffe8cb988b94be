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
import logging
import os
import socket
import threading
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
STALE_RUN_S = 300  # seen from another host, a "running" run record older than this belongs to a killed run
HEARTBEAT_S = 30  # a running run rewrites its record this often, whatever it is doing
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray sets it for a job's driver
GAVE_WAY = "gave way"  # the state of a run that found another one writing: it did nothing

_log = logging.getLogger(__name__)


class JobMismatchError(ValueError):
    """The output folder holds progress of a job with other decisive settings."""


class NoJobError(FileNotFoundError):
    """The folder holds no gitcap progress."""


class ConcurrentRunError(ValueError):
    """Another run is writing to the same output: two would caption the same shards twice."""


class LeaseLostError(RuntimeError):
    """This run could not renew its record for so long that another run may have taken the output."""


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
        """The stored job record; `ConcurrentRunError` if another run is still writing here (a Ray
        job's driver waits for a run on another host to end first, see `_wait_for_other_host`);
        `JobMismatchError` if data committed here was made with other decisive settings. Writes nothing."""
        active = self._wait_for_other_host(self.active_run())
        if active is not None:
            raise self._busy(active)
        return self._check_settings(job)

    def _check_settings(self, job: CaptionJob) -> dict[str, Any] | None:
        """The stored job record, or `JobMismatchError` if committed data has another fingerprint.
        The data files' own fingerprints decide: job.json is replaced whenever nothing is committed,
        and an older gitcap let a run that then gave way rewrite it, so it may not match the data."""
        record = self.job_record()
        files = self.sink.data_files()
        made = {m.get("fingerprint") for name, m in self.commits().items() if name in files} - {None}
        if files and not made and record is not None:
            made = {record["fingerprint"]}  # data files whose manifests are not written yet
        if made and made != {job.fingerprint()}:
            if record is not None and record["fingerprint"] in made:
                changes = "; ".join(_differences(record.get("settings", {}), job.decisive_settings()))
            else:
                changes = f"committed with fingerprint {', '.join(sorted(made))}, this job's is {job.fingerprint()}"
            raise JobMismatchError(
                f"{self.folder.uri('')} holds output of a job with other settings ({changes or 'fingerprint differs'}). "
                "Resuming would mix captions made two ways: rerun with the original settings, "
                "or set a new output.path for the new settings."
            )
        return record

    def start(self, job: CaptionJob, list_plan: Callable[[], list[Shard]], model_id: str) -> tuple[dict, list[Shard]]:
        """The job record and shard list: the stored ones when the same job ran here before (a
        resume), else new ones, written here. Call as the folder's writer (after `claim`): a run
        that gives way must leave the job's files as they are. Refuses a job with other decisive
        settings once data is committed (checked again: a run may have committed since `check`)."""
        record = self._check_settings(job)
        if record is not None and record["fingerprint"] == job.fingerprint():
            shards = [Shard(s["uri"], s["format"], tuple(s.get("files", ()))) for s in self._read_plan()]
            return record, shards
        shards = list_plan()  # nothing here, or nothing committed with other settings: theirs are replaced
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
        renewed its record (every `HEARTBEAT_S`, see `RunLease`) less than `STALE_RUN_S` ago."""
        return _active(self.runs())

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
                self.write_run({**run, "state": f"{GAVE_WAY} to run {other['run']}"})
                raise self._busy(other)

    def _wait_for_other_host(self, active: dict[str, Any] | None) -> dict[str, Any] | None:
        """The live run once a Ray job's driver has waited for a run on another host to end.

        When a Ray cluster loses its head, KubeRay submits the job again on a new cluster within
        seconds, while the lost driver's record is still fresh: failing at once would use up the
        retry. A record whose driver died goes stale within `STALE_RUN_S`, so waiting that long
        (and a little more) tells a dead run from a live one. `gitcap run` at a terminal still
        fails at once: its user can wait, or look."""
        if active is None or RAY_JOB_ENV not in os.environ or active["host"] == socket.gethostname():
            return active
        _log.warning(
            "gitcap: %s is held by run %s on host %s (last update %.0f s ago); this Ray job waits up to "
            "%.0f s for it to finish or go stale", self.folder.uri(""), active["run"], active["host"],
            time.time() - active["updated_at"], STALE_RUN_S + 2 * HEARTBEAT_S,
        )
        deadline = time.time() + STALE_RUN_S + 2 * HEARTBEAT_S
        while active is not None and time.time() < deadline:
            time.sleep(min(HEARTBEAT_S, max(0.0, deadline - time.time())))
            active = self.active_run()
        return active

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


class RunLease:
    """A run's record, which is its lease on the output folder (see `JobProgress.active_run`), kept
    fresh by a daemon thread every `HEARTBEAT_S`, whatever the run is doing.

    Renewing it only when results arrived let loading or compiling the model, GPU nodes scaling
    up, a long stall or reconciling a large output pass `STALE_RUN_S` in silence: another driver
    then took the output over and shards in flight were committed twice. If renewing keeps failing
    (the output's storage is down), each failure is logged, and once the record may look stale
    elsewhere the lease is lost for good: `check`, called before every commit, stops the run."""

    def __init__(self, progress: JobProgress, record: dict[str, Any]):
        self.progress, self.record = progress, record
        self._lock = threading.Lock()  # the record is written by this thread and the run's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed_at = time.time()
        self._lost: str | None = None

    @property
    def run_id(self) -> str:
        return self.record["run"]

    def start(self) -> None:
        """Start renewing; call once the record is registered (`JobProgress.claim`)."""
        self._renewed_at = self.record["updated_at"]
        self._thread = threading.Thread(target=self._renew_until_stopped, name=f"gitcap-lease-{self.run_id}",
                                        daemon=True)
        self._thread.start()

    def update(self, **values: Any) -> None:
        """Change the record and write it, which renews the lease too."""
        with self._lock:
            self.record.update(values)
            self._write()

    def check(self) -> None:
        """Raise `LeaseLostError` unless this run still holds the folder: call before committing."""
        with self._lock:
            self._check_held()

    def end(self, **values: Any) -> None:
        """Stop renewing, then write the record's last state (`state` other than running)."""
        self._stop.set()
        with self._lock:  # a renewal in progress finishes first; none follows this write
            self.record.update(values)
            self._write()
        if self._thread is not None:
            self._thread.join()

    def _write(self) -> None:
        self.progress.write_run(self.record)
        self._renewed_at = self.record["updated_at"]

    def _check_held(self) -> None:
        # A margin of two renewals: the commit this check allows must land before others see a
        # stale record, and a lease once lost stays lost (another run may hold the folder now).
        silent = time.time() - self._renewed_at
        if self._lost is None and silent > STALE_RUN_S - 2 * HEARTBEAT_S:
            self._lost = (f"run {self.run_id} could not renew its record in {self.progress.folder.uri('')} for "
                          f"{silent:.0f} s, so another run may have taken the output over: stopping before "
                          "committing anything more. Rerun to resume.")
        if self._lost is not None:
            raise LeaseLostError(self._lost)

    def _renew_until_stopped(self) -> None:
        failures = 0
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._check_held()
                    self._write()
                failures = 0
            except LeaseLostError as err:
                _log.error("gitcap: %s", err)
                return
            except Exception as err:  # noqa: BLE001  (never die silently: the lease would age unnoticed)
                failures += 1
                _log.warning(
                    "gitcap: could not renew run %s's record (%d failures in a row, last renewed %.0f s ago; "
                    "the run stops committing after %.0f s): %s: %s", self.run_id, failures,
                    time.time() - self._renewed_at, STALE_RUN_S - 2 * HEARTBEAT_S, type(err).__name__, err,
                )


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


def _active(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((run for run in reversed(runs) if _alive(run)), None)


def _alive(run: dict[str, Any], this_process_too: bool = False) -> bool:
    if run["state"] != "running":
        return False
    if run["host"] == socket.gethostname():
        # The process answers for itself: a live run may fail to renew its record for a while (slow
        # storage), and a run whose process is gone never renews it again.
        return _process_alive(run["pid"], run["started_at"], this_process_too)
    return time.time() - run["updated_at"] <= STALE_RUN_S


def _process_alive(pid: int, run_started_at: float, this_process_too: bool = False) -> bool:
    if pid == os.getpid() and not this_process_too:
        return False  # this process is starting a new run: its old record is from a run it finished
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A process started after the run did is not the run's: its PID was reused after the run died.
    # Slack for the boot time's whole seconds and small clock adjustments.
    born = _process_started_at(pid)
    return born is None or born <= run_started_at + 10


def _process_started_at(pid: int) -> float | None:
    """When a process started (Unix time), from /proc; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


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
                state = f"stopped or stalled (a running job renews this every {HEARTBEAT_S} s)"
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
    # The live run if any: a run that gave way did nothing, and would hide its speed and ETA.
    last = _active(runs) or next((r for r in reversed(runs) if not r["state"].startswith(GAVE_WAY)), None)
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
