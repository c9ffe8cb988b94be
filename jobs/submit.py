"""Captioning jobs on a running Ray cluster, through the Ray Jobs API: submit, logs, stop.

A submitted job carries all it needs: gitcap's three packages travel as `py_modules` (the cluster
needs Ray, torch and gitcap's dependencies, not gitcap), and the resolved spec (`--set` applied) as
`job.yaml` in the job's working dir. Its driver is `gitcap run job.yaml`, which joins the cluster
through the `RAY_ADDRESS` that Ray gives it and resumes from the output folder, so resubmitting a
job resumes it.

The driver asks for no resources, which makes Ray run it on the head node: every driver of a job
then runs on one host, where the run lease (`pipeline.progress.JobProgress.active_run`) tells a
killed driver by its PID. From another machine a lease can only be judged by its age, so
`release_ended_run` asks the cluster whether the lease holder's Ray job has ended.

Token authentication (Ray 2.60) follows Ray's own rules: with `RAY_AUTH_MODE=token` the client
sends the token from `RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`, or
`~/.ray/auth_token`.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipeline.job import CaptionJob, JobConfigError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SPEC_FILE = "job.yaml"
ENTRYPOINT = f"python -m jobs.cli run {SPEC_FILE} --no-progress"


class ClusterError(OSError):
    """The cluster cannot be reached, refuses us, or has no such job: one line for the user.
    An OSError, like storage errors: what the environment refuses (exit status 1)."""


def cluster_address(address: str | None = None) -> str:
    """`address`, else `$RAY_ADDRESS`, else the dashboard on this machine."""
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def connect(address: str | None = None) -> JobSubmissionClient:
    """A Jobs API client for the cluster at `address` (see `cluster_address`)."""
    from ray.job_submission import JobSubmissionClient

    address = cluster_address(address)
    with _explained(address), _without_address_variables():
        return JobSubmissionClient(address)


def check_cluster_paths(job: CaptionJob) -> None:
    """Refuse relative local paths: the driver on the cluster would resolve them against the job's
    working dir there, not against the folder they were typed in."""
    paths = {"input.path": job.input.path, "output.path": job.output.path, "model.path": job.model.path}
    for name, value in paths.items():
        for path in value if isinstance(value, list) else [value]:
            if path and "://" not in path and not os.path.isabs(path):
                raise JobConfigError(
                    name, f"{path!r} is a relative local path, which the cluster cannot see: use a URL "
                    "(s3://, gs://, ...) or an absolute path on a filesystem that every node mounts"
                )


def submit_job(client: JobSubmissionClient, job: CaptionJob) -> str:
    """Submit `job` (already preflighted) and return its submission id."""
    import gitmodel
    import jobs
    import pipeline

    # Readable and unique: which job, when, and a few random digits for two submissions in a second.
    submitted_at = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    submission_id = f"gitcap-{job.fingerprint()[:8]}-{submitted_at}-{uuid.uuid4().hex[:4]}"
    with tempfile.TemporaryDirectory(prefix="gitcap-submit-") as spec_dir:
        Path(spec_dir, SPEC_FILE).write_text(yaml.safe_dump(job.to_dict(), sort_keys=False))
        runtime_env = {
            "working_dir": spec_dir,  # uploaded by submit_job, before the folder goes
            "py_modules": [os.path.dirname(package.__file__) for package in (gitmodel, pipeline, jobs)],
        }
        with _explained(client.get_address()):
            return client.submit_job(
                entrypoint=ENTRYPOINT,
                runtime_env=runtime_env,
                submission_id=submission_id,
                entrypoint_num_cpus=0,  # no resources: the driver runs on the head node (see above)
                # Shown by `ray job list` and the dashboard; the output lets `release_ended_run` find the job.
                metadata={"gitcap_output": str(job.output.path), "gitcap_fingerprint": job.fingerprint()},
            )


def release_ended_run(client: JobSubmissionClient, job: CaptionJob) -> str | None:
    """If the run holding `job`'s output lease is the driver of a Ray job of this cluster that has
    ended, mark its record stopped (the lease is free) and return the run's id; else None.

    A driver killed outright (SIGKILL after `stop_job`'s grace period, the OOM killer) leaves its run
    recorded as running. Another host would wait `STALE_RUN_S` for that record to age; the cluster
    knows now. The match is the driver's PID and a start time before the run's, on a job for the
    same output."""
    from pipeline.progress import JobProgress
    from pipeline.storage import Folder

    progress = JobProgress(Folder(job.output.path, job.output.storage_options))
    run = progress.active_run()
    if run is None:
        return None
    with _explained(client.get_address()):
        candidates = client.list_jobs()
    for details in candidates:
        driver = details.driver_info
        if (
            details.status.is_terminal()
            and (details.metadata or {}).get("gitcap_output") == str(job.output.path)
            and driver is not None and driver.pid == str(run["pid"])
            and (details.start_time or 0) / 1000 <= run["started_at"]
        ):
            ended = f"stopped: its driver, Ray job {details.submission_id}, {details.status}"
            progress.write_run({**run, "state": ended})
            return run["run"]
    return None


def job_details(client: JobSubmissionClient, submission_id: str) -> JobDetails:
    with _explained(client.get_address(), submission_id):
        return client.get_job_info(submission_id)


def job_logs(client: JobSubmissionClient, submission_id: str) -> str:
    """The driver's output so far."""
    with _explained(client.get_address(), submission_id):
        return client.get_job_logs(submission_id)


def follow_logs(client: JobSubmissionClient, submission_id: str, write: Callable[[str], None]) -> JobDetails:
    """Pass the driver's output to `write` as it comes, until the job ends; its final details."""
    job_details(client, submission_id)  # an unknown id fails here, in one line

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)

    with _explained(client.get_address(), submission_id):
        asyncio.run(tail())
    return wait_for_end(client, submission_id, timeout_s=30)


def stop_job(client: JobSubmissionClient, submission_id: str, timeout_s: float = 60) -> JobDetails:
    """Ask Ray to stop the job (SIGTERM to the driver, SIGKILL after a grace period) and wait
    until it has ended; its final details."""
    with _explained(client.get_address(), submission_id):
        client.stop_job(submission_id)
    return wait_for_end(client, submission_id, timeout_s)


def wait_for_end(client: JobSubmissionClient, submission_id: str, timeout_s: float) -> JobDetails:
    """The job's details once it has ended, or as they are after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        details = job_details(client, submission_id)
        if details.status.is_terminal() or time.monotonic() > deadline:
            return details
        time.sleep(0.5)


def exit_status(details: JobDetails) -> int:
    """As the driver exited: 0 succeeded, else its own status (3: some sources failed), or 1."""
    return 0 if str(details.status) == "SUCCEEDED" else (details.driver_exit_code or 1)


@contextmanager
def _explained(address: str, submission_id: str | None = None) -> Iterator[None]:
    """Ray's errors for the usual mistakes, as one line that says what to do."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except (ConnectionError, requests.exceptions.ConnectionError):
        raise ClusterError(
            f"no Ray cluster answers at {address}: check --address (or $RAY_ADDRESS), which must be the "
            "head node's dashboard, port 8265 unless the cluster set --dashboard-port"
        ) from None
    except AuthenticationError as err:
        if "required" in str(err).split("\n", 1)[0].lower():
            raise ClusterError(
                f"the cluster at {address} requires its token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                "(or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token); `ray get-auth-token` on the head prints it"
            ) from None
        raise ClusterError(
            f"the cluster at {address} rejected the token (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
            "~/.ray/auth_token): use the one `ray get-auth-token` prints on the head"
        ) from None
    except RuntimeError as err:
        if submission_id is not None and "status code 404" in str(err):
            raise ClusterError(
                f"the cluster at {address} has no job {submission_id} (`ray job list --address {address}` lists them)"
            ) from None
        raise


@contextmanager
def _without_address_variables() -> Iterator[None]:
    """Ray's client prefers `$RAY_API_SERVER_ADDRESS` and `$RAY_ADDRESS` to the address it is given;
    gitcap's `--address` must win, so they are hidden while the client is made."""
    saved = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
