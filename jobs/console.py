"""What `gitcap run` and `gitcap demo` share: a Ray session, a live progress line, the summary."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pipeline.cluster import ClusterCapacity, cluster_capacity, describe_compute, resolve_compute
from pipeline.job import CaptionJob
from pipeline.progress import RAY_JOB_ENV, describe_failures
from pipeline.runner import ProgressUpdate, RunSummary


def run_address(address: str | None) -> str | None:
    """The Ray cluster `gitcap run` joins: `address` (--address), else `$RAY_ADDRESS`, else None:
    a private local Ray.

    `$RAY_ADDRESS` serves two Ray tools: `ray job` (and `gitcap submit`, `logs`, `stop`) read it as the
    dashboard, http://HEAD:8265, and `ray.init` as the cluster itself, HEAD:6379 or ray://HEAD:10001.
    Ray sets the second kind for a job's driver, which joins its cluster through it. A dashboard URL
    there was set for the first kind of command, as gitcap's README says to; `ray.init` cannot join
    through it (Ray refuses it: "Invalid Ray address"), and `gitcap run` with no cluster named runs
    on a private Ray, so that is what it does, saying so: a user who meant the cluster learns it at
    once. A dashboard URL given as --address names the cluster on purpose: refused, pointing to
    `gitcap submit`."""
    if address:
        if _is_dashboard_url(address):
            raise ValueError(
                f"--address {address} is a dashboard (the Jobs API): `gitcap run` joins a cluster by its own "
                "address, HEAD:6379 or ray://HEAD:10001; to run the job on that cluster from here, "
                f"`gitcap submit JOB.yaml --address {address}`"
            )
        return address
    from_environment = os.environ.get("RAY_ADDRESS") or None
    if from_environment and _is_dashboard_url(from_environment):
        print(f"gitcap run: $RAY_ADDRESS ({from_environment}) is a dashboard, for `gitcap submit`: running on a "
              "local Ray (--address HEAD:6379 joins a cluster)", file=sys.stderr)
        return None
    return from_environment


def _is_dashboard_url(address: str) -> bool:
    return address.lower().startswith(("http://", "https://"))


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[ClusterCapacity]:
    """Connect to the cluster at `address` (see `run_address`), or with none start a private local
    Ray for this process only; yield what the cluster has."""
    import ray
    import ray.data

    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    if address:
        import gitmodel
        import pipeline

        # The cluster may not have gitcap installed: ship the two packages its workers import,
        # unless this driver is a job whose runtime env ships them already (`gitcap submit`'s):
        # Ray refuses to merge two `py_modules`.
        shipped = None if _job_ships_py_modules() else {"py_modules": [pipeline, gitmodel]}
        ray.init(address=address, runtime_env=shipped, logging_level="WARNING")
    else:
        # A private Ray for this process: its notice that token authentication is on says nothing
        # the user must act on.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(
            address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level="WARNING"
        )
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # start/finish notices; errors still show
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours is one line; Ray's are one per operator
    context.print_on_execution_start = False
    try:
        yield cluster_capacity(fixed=not address)  # no node joins a private Ray
    finally:
        ray.shutdown()


def resolve_job_compute(job: CaptionJob, capacity: ClusterCapacity) -> CaptionJob:
    """`job` with its "auto" compute decided for this cluster, said on stderr (stdout may be JSON)."""
    job = replace(job, compute=resolve_compute(job.compute, capacity))
    print(describe_compute(job.compute, capacity), file=sys.stderr)
    return job


def _job_ships_py_modules() -> bool:
    config = json.loads(os.environ.get(RAY_JOB_ENV, "{}"))
    return bool((config.get("runtime_env") or {}).get("py_modules"))


class RunStopped(KeyboardInterrupt):
    """SIGTERM arrived (`gitcap stop` and Ray's `stop_job` send it first). An interrupt, as on
    Ctrl-C: no `except Exception` on the way mistakes it for a failure to handle, and Ray's blocking
    calls pass it on (as a plain KeyboardInterrupt; they would swallow other exceptions raised by a
    signal handler)."""


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into `RunStopped` in the main thread, so the run ends as on Ctrl-C: its record
    says it stopped, committed work stays. Enter after `ray.init`, which sets a handler of its own."""

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise RunStopped("stopped by SIGTERM (gitcap stop, or the cluster shutting down)")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ProgressLine:
    """A tqdm bar over shards with images, failures and speed: the `progress_callback` of a run."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def __call__(self, update: ProgressUpdate) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=update.shards_total, unit="shard", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5, disable=None)  # None: only on a terminal
        self.bar.n = update.shards_done
        speed = f"{update.images_per_s:.1f}" if update.images_per_s else "-"
        self.bar.set_postfix_str(f"{update.images} images, {update.failed} failed, {speed} img/s", refresh=False)
        self.bar.update(0)  # redraws at most every mininterval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_summary(summary: RunSummary) -> str:
    lines = [
        f"{summary.shards_done}/{summary.shards_total} shards committed "
        f"({summary.shards_this_run} this run) to {summary.output}",
        f"images: {summary.images_ok} ok, {summary.images_failed} failed in the output; "
        f"{summary.images_this_run} processed this run",
    ]
    if summary.images_per_s:
        lines.append(
            f"speed: {summary.images_per_s:.1f} images/s after {summary.startup_s:.1f} s start-up; "
            f"{summary.elapsed_s:.1f} s in all"
        )
    lines += describe_failures(summary.errors, summary.failed_sources, "errors: ", "failed source: ")
    lines += summary.notes
    if summary.exit_code:
        what = "some sources failed" if summary.failed_sources else "the job is not complete"
        lines.append(f"exit status {summary.exit_code}: {what}")
    return "\n".join(lines)
