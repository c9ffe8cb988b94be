"""Captioning jobs on a running Ray cluster, through the Ray Jobs API: submit, logs, stop.

A submitted job carries all it needs: gitcap's three packages travel as `py_modules` (the cluster
needs Ray, torch and gitcap's dependencies, not gitcap); the resolved spec (`--set` applied) as
`job.yaml` in the job's working dir; this machine's storage endpoints and region (`FORWARDED_ENV`)
as its environment. Its driver is `gitcap run job.yaml`, which joins the cluster
through the `RAY_ADDRESS` that Ray gives it and resumes from the output folder, so resubmitting a
job resumes it. Secrets in the spec are refused unless the user allows them (`inline_credentials`).

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
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from jobs.cli import STOPPED
from pipeline.job import CaptionJob, JobConfigError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SPEC_FILE = "job.yaml"
ENTRYPOINT = f"python -m jobs.cli run {SPEC_FILE} --no-progress"

# Settings that say where the data is, never who may read it: preflight used them here, so the
# driver and workers must use them there. botocore reads the AWS ones (an S3-compatible store's
# endpoint, the region), huggingface_hub HF_ENDPOINT (a hub mirror, for hf:// models). Not
# AWS_PROFILE: it names a section of this machine's files.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "HF_ENDPOINT")

# storage_options names that hold a secret: s3fs's key, secret and token (and botocore's
# aws_access_key_id, ... in client_kwargs), gcsfs's token, adlfs's account_key, sas_token,
# connection_string and client_secret, any private key and any password.
SECRET_WORDS = ("secret", "password", "token", "credential", "access_key", "account_key", "private_key",
                "connection_string")
# gcsfs's `token` may name a way to find credentials instead of holding them.
TOKEN_MODES = ("anon", "google_default", "cache", "cloud", "browser")


class ClusterError(OSError):
    """The cluster cannot be reached, refuses us, or has no such job: one line for the user.
    An OSError, like storage errors: what the environment refuses (exit status 1)."""


def cluster_address(address: str | None = None) -> str:
    """`address`, else `$RAY_ADDRESS`, else the dashboard on this machine.

    Ray's client takes a bare HOST:PORT for the cluster's own (GCS) address and asks it where the
    dashboard is: given the dashboard's HOST:PORT, that waits ~35 s and fails with an RpcError.
    `--address` is documented as the dashboard's, so a bare one typed there gets the scheme the
    dashboard speaks. A bare `$RAY_ADDRESS` keeps Ray's meaning (Ray and KubeRay set it to the GCS
    address, HEAD:6379), as does "auto"."""
    if address:
        return address if "://" in address or address == "auto" else f"http://{address}"
    return os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def connect(address: str | None = None) -> JobSubmissionClient:
    """A Jobs API client for the cluster at `address` (see `cluster_address`)."""
    from ray.job_submission import JobSubmissionClient

    address = cluster_address(address)
    with _explained(address), _without_address_variables():
        return JobSubmissionClient(address)


def check_cluster_paths(job: CaptionJob) -> None:
    """Refuse relative local paths: the driver on the cluster would resolve them against the job's
    working dir there, not against the folder they were typed in. A model's hub id (org/name, not
    a folder here) reads the same everywhere."""
    from gitmodel.hub import _as_url

    paths = {"input.path": job.input.path, "output.path": job.output.path, "model.path": job.model.path}
    for name, value in paths.items():
        for path in value if isinstance(value, list) else [value]:
            if name == "model.path" and path and _as_url(path).startswith("hf://"):
                continue
            if path and "://" not in path and not os.path.isabs(path):
                raise JobConfigError(
                    name, f"{path!r} is a relative local path, which the cluster cannot see: use a URL "
                    "(s3://, gs://, ...) or an absolute path on a filesystem that every node mounts"
                )


def inline_credentials(job: CaptionJob) -> list[str]:
    """The spec's fields that hold a secret, e.g. `input.storage_options.secret`: `submit_job` would
    send them in plain text, in the uploaded job.yaml, which the cluster keeps in its object store
    and unpacks on the nodes its driver and workers run on."""
    options = {"input": job.input.storage_options, "output": job.output.storage_options,
               "model": job.model.storage_options}
    return [field for section, values in options.items()
            for field in _secret_fields(values, f"{section}.storage_options")]


def _secret_fields(values: dict, prefix: str) -> Iterator[str]:
    for name, value in values.items():
        field = f"{prefix}.{name}"
        if value and _is_secret(str(name).lower(), value):
            yield field  # a dict too: gcsfs's token may be the service account's JSON
        elif isinstance(value, dict):
            yield from _secret_fields(value, field)


def _is_secret(name: str, value: object) -> bool:
    if name == "token" and value in TOKEN_MODES:
        return False
    return name == "key" or any(word in name for word in SECRET_WORDS)  # s3fs's `key`: the access key id


def forwarded_env() -> dict[str, str]:
    """This machine's values of `FORWARDED_ENV`, for the job's runtime env."""
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def submit_job(client: JobSubmissionClient, job: CaptionJob, env_vars: dict[str, str]) -> str:
    """Submit `job` (already preflighted), with `env_vars` set for its driver and workers, and
    return its submission id."""
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
            "env_vars": env_vars,
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
    """As the driver exited: 0 succeeded, 143 stopped (Ray records no exit status for a job it
    stopped), else the driver's own status (3: some sources failed), or 1."""
    status = str(details.status)
    if status == "SUCCEEDED":
        return 0
    return STOPPED if status == "STOPPED" else (details.driver_exit_code or 1)


def describe_end(details: JobDetails) -> str:
    """How the job ended, in one line. Ray's message for a failed job goes on with up to 20,000
    characters of the driver's last output, which the user has usually just read: its exit status
    says enough; a job that failed before its driver ran (its runtime env, say) has the first line."""
    if details.driver_exit_code is not None:
        return f"{details.status}, its driver exited with status {details.driver_exit_code}"
    reason = (details.message or "").strip().split("\n", 1)[0]
    return f"{details.status}: {reason}" if reason else str(details.status)


@contextmanager
def _explained(address: str, submission_id: str | None = None) -> Iterator[None]:
    """Ray's errors for the usual mistakes, as one line that says what to do."""
    import requests
    from ray.exceptions import AuthenticationError, RpcError

    try:
        yield
    except (ConnectionError, requests.exceptions.ConnectionError, RpcError):
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
    except (RuntimeError, requests.exceptions.HTTPError) as err:  # Ray's and requests' words for an HTTP error
        status = _http_status(err)
        if submission_id is not None and status == 404:
            raise ClusterError(
                f"the cluster at {address} has no job {submission_id} (`ray job list --address {address}` lists them)"
            ) from None
        # Ray's message goes on with the whole response, a page of HTML for some errors.
        reason = str(err).strip().split("\n", 1)[0][:200]
        retry = "; a dashboard that is starting answers so: try again in a minute" if status == 503 else ""
        raise ClusterError(f"the cluster at {address} refused the request: {reason}{retry}") from None


def _http_status(err: Exception) -> int | None:
    response = getattr(err, "response", None)  # requests' HTTPError has it; Ray's RuntimeError only says it
    if response is not None:
        return response.status_code
    said = re.search(r"status code (\d{3})", str(err))
    return int(said.group(1)) if said else None


@contextmanager
def _without_address_variables() -> Iterator[None]:
    """Ray's client prefers `$RAY_API_SERVER_ADDRESS` and `$RAY_ADDRESS` to the address it is given;
    gitcap's `--address` must win, so they are hidden while the client is made."""
    saved = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
