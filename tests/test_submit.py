"""`gitcap submit`, `logs` and `stop` before and around a cluster: the address they reach, one line
for each way a cluster can fail to answer, and the exit status and line a finished job leaves. The
runs on a real cluster are in test_cluster.py; here the Jobs API's far end is a real HTTP server
that answers as a starting dashboard does, or nothing at all."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from ray.job_submission import JobDetails, JobStatus, JobType

from jobs.cli import main
from jobs.submit import cluster_address, describe_end, exit_status

RAY_LOG_TAIL = "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dashboard(version_status: int, jobs_status: int) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering Ray's version check and every jobs request with these
    statuses and a page of HTML; its HOST:PORT."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            status = version_status if self.path == "/api/version" else jobs_status
            body = json.dumps({"ray_version": "2.60.0", "version": "4", "session_name": "s"}).encode() \
                if status == 200 else b"<html>\n<body>Service Unavailable</body>\n</html>\n" * 50
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def details(status: JobStatus, message: str = "", driver_exit_code: int | None = None) -> JobDetails:
    return JobDetails(type=JobType.SUBMISSION, submission_id="gitcap-x", entrypoint="gitcap run job.yaml",
                      status=status, message=message, driver_exit_code=driver_exit_code)


# --- the address ------------------------------------------------------------------------------


def test_the_address_is_the_dashboard_so_a_bare_host_and_port_gets_http(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address("head:8265") == "http://head:8265"
    assert cluster_address("https://head:8265") == "https://head:8265"
    assert cluster_address(None) == "http://127.0.0.1:8265"
    assert cluster_address("auto") == "auto"  # Ray's: the cluster `ray start` left on this machine
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert cluster_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")  # as Ray and KubeRay set it: the GCS, Ray's meaning
    assert cluster_address(None) == "head:6379"


@pytest.mark.parametrize("command", [["logs", "gitcap-x"], ["stop", "gitcap-x"]])
def test_a_bare_host_and_port_with_nothing_there_fails_at_once_in_one_line(command, capsys):
    address = f"127.0.0.1:{unused_port()}"
    started = time.monotonic()
    assert main([*command, "--address", address]) == 1
    assert time.monotonic() - started < 15  # not Ray's ~35 s wait for a GCS at that address
    error = capsys.readouterr().err
    assert error.startswith(f"gitcap {command[0]}: error: no Ray cluster answers at http://{address}: check --address")
    assert error.count("\n") == 1


@pytest.mark.parametrize(("version_status", "jobs_status"), [(503, 503), (200, 503)])
def test_a_dashboard_that_is_starting_is_one_line_that_says_to_retry(version_status, jobs_status, capsys):
    with dashboard(version_status, jobs_status) as address:
        assert main(["logs", "gitcap-x", "--address", address]) == 1
    error = capsys.readouterr().err
    assert f"the cluster at http://{address} refused the request: " in error and "503" in error
    assert "try again in a minute" in error and error.count("\n") == 1  # none of the page of HTML


def test_an_unknown_job_is_still_named_as_such(capsys):
    with dashboard(200, 404) as address:
        assert main(["logs", "gitcap-nosuchjob", "--address", address]) == 1
    assert f"the cluster at http://{address} has no job gitcap-nosuchjob" in capsys.readouterr().err


# --- how a job ended --------------------------------------------------------------------------


def test_exit_status_is_the_drivers_and_143_for_a_stopped_job():
    assert exit_status(details(JobStatus.SUCCEEDED, driver_exit_code=0)) == 0
    assert exit_status(details(JobStatus.FAILED, RAY_LOG_TAIL, driver_exit_code=3)) == 3
    assert exit_status(details(JobStatus.FAILED, "runtime env setup failed")) == 1
    assert exit_status(details(JobStatus.STOPPED, "Job was intentionally stopped.")) == 143  # Ray records no code


def test_a_failed_jobs_end_is_one_line_without_rays_copy_of_its_output():
    failed = details(JobStatus.FAILED, RAY_LOG_TAIL + "the driver's output\n" * 1000, driver_exit_code=1)
    assert describe_end(failed) == "FAILED, its driver exited with status 1"
    unstarted = details(JobStatus.FAILED, "Failed to set up the runtime env: no such package\nTraceback...\n")
    assert describe_end(unstarted) == "FAILED: Failed to set up the runtime env: no such package"
    assert describe_end(details(JobStatus.STOPPED, "Job was intentionally stopped.")) == \
        "STOPPED: Job was intentionally stopped."


# --- what a submission sends ------------------------------------------------------------------


def job_with(tmp_path, **sections) -> str:
    import yaml

    values = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, **sections}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_credentials_in_the_spec_are_refused_before_any_cluster_is_asked(tmp_path, capsys):
    options = {"key": "AKIA-EXAMPLE", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://minio:9000"}}
    spec = job_with(tmp_path, input={"path": "s3://bucket/in", "storage_options": options})
    # No cluster listens at this address: the spec is refused before gitcap tries to reach it.
    assert main(["submit", spec, "--address", f"127.0.0.1:{unused_port()}"]) == 2
    error = capsys.readouterr().err
    assert "input.storage_options.key: a secret, which submit would send to the cluster in plain text" in error
    assert "so would input.storage_options.secret" in error and "--allow-inline-credentials" in error
    assert "endpoint_url" not in error and "s3cr3t" not in error


@pytest.mark.parametrize(
    ("options", "secrets"),
    [({"anon": True, "client_kwargs": {"endpoint_url": "http://minio:9000", "region_name": "eu-west-1"}}, []),
     ({"token": "anon", "project": "p"}, []),  # gcsfs: how to find credentials, not one
     ({"token": {"client_email": "x", "private_key": "y"}}, ["token"]),  # gcsfs: a service account's JSON
     ({"client_kwargs": {"private_key": "y"}}, ["client_kwargs.private_key"]),
     ({"client_kwargs": {"aws_secret_access_key": "x", "aws_session_token": "y"}},
      ["client_kwargs.aws_secret_access_key", "client_kwargs.aws_session_token"]),
     ({"account_name": "a", "account_key": "k", "sas_token": "t", "connection_string": "c", "password": "p"},
      ["account_key", "sas_token", "connection_string", "password"]),
     ({"key": None, "secret": ""}, [])],  # unset
)
def test_inline_credentials_are_the_secret_storage_options(tmp_path, options, secrets):
    from jobs.spec import load_spec
    from jobs.submit import inline_credentials

    job = load_spec(job_with(tmp_path, model={"path": "/models/git", "storage_options": options}))
    assert sorted(inline_credentials(job)) == sorted(f"model.storage_options.{name}" for name in secrets)


def test_storage_settings_of_this_machine_go_with_the_job_and_secrets_do_not(monkeypatch):
    from jobs.submit import forwarded_env

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_PROFILE", "laptop")
    assert forwarded_env() == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}


def test_a_hub_model_id_is_a_path_every_node_sees_and_a_relative_folder_is_not(tmp_path, monkeypatch):
    from jobs.spec import load_spec
    from jobs.submit import check_cluster_paths
    from pipeline.job import JobConfigError

    monkeypatch.chdir(tmp_path)
    spec = job_with(tmp_path, model={"path": "microsoft/git-base-coco"})
    check_cluster_paths(load_spec(spec))
    (tmp_path / "models" / "mine").mkdir(parents=True)  # org/name that is a folder here is that folder
    with pytest.raises(JobConfigError, match="'models/mine' is a relative local path"):
        check_cluster_paths(load_spec(spec, ["model.path=models/mine"]))
