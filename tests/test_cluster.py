"""A real two-node Ray cluster on this machine with token authentication, driven as a user drives
one: `gitcap submit`, `gitcap logs`, `gitcap stop`, `gitcap status`. The cluster's processes get no
PYTHONPATH and run outside the repository, so jobs run on what `gitcap submit` ships (the shipped
`py_modules` come before site-packages, which may hold an older gitcap: the stop test's record
check would fail on one).

The head has 3 CPUs and the second node 1: two captioning actors (1 CPU each) spread one per node,
and when the second node dies, the head still fits both actors and a read task (0.5 CPU), so Ray
can restart the lost actor there. One cluster serves the module; the test that kills the second
node runs last.

The dashboard, which every command talks to, listens on 127.0.0.1 only. Ray gives the nodes of a
multi-node cluster the host's own address (it rewrites 127.0.0.1: `services.resolve_ip_for_localhost`),
so the nodes talk to each other through this machine's own interface; nothing leaves the machine.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from tests.pipeline_fixtures import (  # noqa: F401  (fixtures)
    assert_each_key_once,
    process_session_members,
    read_output,
    tiny_model,
    write_scene_shards,
)

HEAD_CPUS = 3
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 120


@dataclass
class Cluster:
    address: str  # the dashboard: what `--address` takes
    head: subprocess.Popen
    second: subprocess.Popen  # `ray start` of the second node, leader of its own session

    def captioning_actors_on_second_node(self) -> list[int]:
        return [pid for pid in process_session_members(self.second.pid) if b"MapWorker" in _cmdline(pid)]


@pytest.fixture(scope="module")
def cluster():
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="gitcap-ray-")  # short: Ray's socket paths live under it
    env = {name: value for name, value in os.environ.items() if name not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_DATA_PARQUET_FOOTER_NUM_ACTORS="1",
               RAY_USAGE_STATS_ENABLED="0",
               # A lost node is declared dead after ~3 s instead of ~15 s: the drill waits less.
               RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    gcs_port, dashboard_port, client_port, head_agent_port, second_agent_port = _free_ports(5)
    common = [f"--temp-dir={temp_dir}", "--block", "--disable-usage-stats"]
    nodes = []
    try:
        with pytest.MonkeyPatch.context() as patch:
            # This process is the user's shell: it holds the cluster's token the way a user would.
            patch.setenv("RAY_AUTH_MODE", "token")
            patch.setenv("RAY_AUTH_TOKEN", token)
            patch.delenv("RAY_ADDRESS", raising=False)
            _reload_ray_auth_settings()
            try:
                nodes.append(_ray_start(env, temp_dir, "head", [
                    "--head", f"--port={gcs_port}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
                    f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={head_agent_port}",
                    f"--num-cpus={HEAD_CPUS}", *common]))
                address = f"http://127.0.0.1:{dashboard_port}"
                _wait_for(lambda: _answers(address), "the head's Jobs API", nodes)
                nodes.append(_ray_start(env, temp_dir, "second", [
                    f"--address=127.0.0.1:{gcs_port}", "--num-cpus=1", '--resources={"second": 1}',
                    f"--dashboard-agent-listen-port={second_agent_port}", *common]))
                _wait_for(lambda: _alive_nodes(address) == 2, "the second node to join", nodes)
                yield Cluster(address, *nodes)
            finally:
                for node in reversed(nodes):
                    _end_session(node)
                shutil.rmtree(temp_dir, ignore_errors=True)
    finally:
        _reload_ray_auth_settings()  # this process's own settings again


def spec(tmp_path: Path, **sections) -> str:
    values = {"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}, **sections}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def submit(cluster: Cluster, capsys, job_spec: str, *args: str) -> tuple[int, str, str]:
    """`gitcap submit`: its exit status, the submission id, what it printed."""
    status = main(["submit", job_spec, "--address", cluster.address, *args])
    printed = capsys.readouterr().out
    match = re.search(r"submitted (gitcap-[0-9a-f]{8}-\d{8}T\d{6}Z-[0-9a-f]{4}) to ", printed)
    assert match, f"no submission id in: {printed!r}"
    return status, match.group(1), printed


def job_status_of(cluster: Cluster, submission_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    from jobs.submit import connect, wait_for_end

    details = wait_for_end(connect(cluster.address), submission_id, timeout_s)
    if not details.status.is_terminal():
        pytest.fail(f"{submission_id} still {details.status} after {timeout_s} s")
    return str(details.status)


def first_commit(output: Path, submission_id: str) -> None:
    _wait_for(lambda: bool(glob.glob(str(output / "*.parquet"))), f"a first commit of {submission_id}", [],
              timeout_s=JOB_TIMEOUT_S)


def expected_keys(shards: int, per_shard: int) -> list[str]:
    """The output's keys for `write_scene_shards(shards, per_shard)`: shard stem / sample key."""
    return [f"{n:05d}/{i:06d}" for n in range(shards) for i in range(n * per_shard, (n + 1) * per_shard)]


def test_a_submitted_job_runs_the_bundled_model_and_reports_through_logs_and_status(cluster, tmp_path, capsys):
    write_scene_shards(tmp_path / "in", shards=3, per_shard=8)
    job = spec(tmp_path, compute={"batch_size": 8, "shards_per_wave": 1})  # no model.path: the bundled one

    status, submission_id, printed = submit(cluster, capsys, job, "--follow")
    assert status == 0, printed
    assert "3/3 shards committed (3 this run)" in printed  # the driver's summary, followed live
    assert job_status_of(cluster, submission_id) == "SUCCEEDED"

    frame = read_output(str(tmp_path / "out"))
    assert_each_key_once(frame, expected_keys(3, 8))
    assert frame["error"].isna().all() and (frame["caption"].str.len() > 0).all()

    assert main(["logs", submission_id, "--address", cluster.address]) == 0
    assert "images: 24 ok, 0 failed" in capsys.readouterr().out
    assert main(["status", str(tmp_path / "out")]) == 0
    assert "3/3 done (100.0%), complete" in capsys.readouterr().out


def test_unknown_ids_missing_clusters_and_wrong_tokens_fail_in_one_line(cluster, capsys, monkeypatch):
    assert main(["logs", "gitcap-nosuchjob", "--address", cluster.address]) == 1
    assert f"the cluster at {cluster.address} has no job gitcap-nosuchjob" in capsys.readouterr().err

    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{unused.getsockname()[1]}"
        assert main(["stop", "gitcap-x", "--address", nowhere]) == 1
    error = capsys.readouterr().err
    assert f"no Ray cluster answers at {nowhere}: check --address" in error and "8265" in error

    try:
        monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
        _reload_ray_auth_settings()
        assert main(["logs", "gitcap-x", "--address", cluster.address]) == 1
        assert f"the cluster at {cluster.address} rejected the token" in capsys.readouterr().err

        monkeypatch.delenv("RAY_AUTH_MODE")
        _reload_ray_auth_settings()
        assert main(["logs", "gitcap-x", "--address", cluster.address]) == 1
        assert "requires its token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        _reload_ray_auth_settings()


def test_a_stopped_job_resubmitted_resumes_without_redoing_committed_shards(cluster, tmp_path, tiny_model, capsys):
    from pipeline.progress import JobProgress, job_status
    from pipeline.storage import Folder

    write_scene_shards(tmp_path / "in", shards=10, per_shard=8)
    job = spec(tmp_path, model={"path": tiny_model}, compute={"batch_size": 2, "shards_per_wave": 1})
    output = tmp_path / "out"

    status, first_id, _ = submit(cluster, capsys, job)
    assert status == 0
    first_commit(output, first_id)
    assert main(["stop", first_id, "--address", cluster.address]) == 0
    assert f"{first_id}: STOPPED" in capsys.readouterr().out
    assert main(["logs", first_id, "--follow", "--address", cluster.address]) == 143  # as `gitcap run` exits

    progress = JobProgress(Folder(str(output)))
    (stopped,) = progress.runs()
    assert "stopped by SIGTERM" in stopped["state"]  # the driver ended its run itself, before any SIGKILL
    done_before = job_status(str(output)).shards_done
    assert 0 < done_before < 10, "the job ended before it could be stopped: make it longer"

    # A driver killed outright leaves its run recorded as running; seen from another host than the
    # head's, only the cluster can say that the driver is gone.
    progress.write_run({**stopped, "state": "running", "host": "the-head-node"})
    status, second_id, printed = submit(cluster, capsys, job, "--follow")
    assert status == 0, printed
    assert f"run {stopped['run']} holds no lease any more" in printed
    assert f"10/10 shards committed ({10 - done_before} this run)" in printed
    assert job_status_of(cluster, second_id) == "SUCCEEDED"
    assert_each_key_once(read_output(str(output)), expected_keys(10, 8))
    assert f"Ray job {first_id}, STOPPED" in progress.runs()[0]["state"]


def test_a_failed_job_ends_its_followed_output_with_one_line(cluster, tmp_path, tiny_model, capsys):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")  # passes preflight, fails in the actor
    write_scene_shards(tmp_path / "in", shards=1, per_shard=2)

    status = main(["submit", spec(tmp_path, model={"path": str(broken)}), "--address", cluster.address, "--follow"])
    captured = capsys.readouterr()
    assert status == 1
    assert "gitcap run: failed: gitmodel.checkpoint.CheckpointError" in captured.out  # the driver's, followed
    assert re.search(r"gitcap submit: job gitcap-\S+ FAILED, its driver exited with status 1\n$", captured.err)
    assert "last available logs" not in captured.err and "CheckpointError" not in captured.err  # not twice


def test_a_submitted_job_reaches_s3_through_this_machines_aws_endpoint_url(
    cluster, s3_server, s3_bucket, tmp_path, tiny_model, capsys, monkeypatch
):
    from pipeline.scenes import write_scenes

    # An S3-compatible store, named the standard way on this machine only: the cluster's nodes have
    # credentials of their own, and no endpoint.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    write_scenes(f"s3://{s3_bucket}/in", count=8, seed=0, shard_size=4)
    job = spec(tmp_path, input={"path": f"s3://{s3_bucket}/in"}, output={"path": f"s3://{s3_bucket}/out"},
               model={"path": tiny_model}, compute={"batch_size": 4})

    status, _, printed = submit(cluster, capsys, job, "--follow")
    assert status == 0, printed
    assert f"with this machine's storage settings: AWS_ENDPOINT_URL={s3_server.endpoint}" in printed
    assert "2/2 shards committed (2 this run)" in printed


def test_the_job_completes_exactly_once_when_a_node_running_a_captioner_dies(cluster, tmp_path, tiny_model, capsys):
    write_scene_shards(tmp_path / "in", shards=12, per_shard=8)
    job = spec(tmp_path, model={"path": tiny_model}, compute={"batch_size": 2, "shards_per_wave": 1, "workers": 2})
    output = tmp_path / "out"

    status, submission_id, _ = submit(cluster, capsys, job)
    assert status == 0
    first_commit(output, submission_id)
    assert cluster.captioning_actors_on_second_node(), "no captioning actor on the second node to lose"
    _end_session(cluster.second)  # every process of the node at once, as in a power cut
    assert len(glob.glob(str(output / "*.parquet"))) < 12, "the job ended before the node died: make it longer"

    assert job_status_of(cluster, submission_id) == "SUCCEEDED", _logs(cluster, submission_id, capsys)
    assert_each_key_once(read_output(str(output)), expected_keys(12, 8))
    assert main(["status", str(output)]) == 0
    assert "12/12 done (100.0%), complete" in capsys.readouterr().out


# --- the cluster's processes ------------------------------------------------------------------


def _ray_start(env: dict, temp_dir: str, name: str, args: list[str]) -> subprocess.Popen:
    log = open(Path(temp_dir) / f"ray-start-{name}.log", "wb")  # noqa: SIM115  (the process holds it)
    return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", *args], env=env, cwd=temp_dir,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _end_session(node: subprocess.Popen) -> None:
    """End a node started by `_ray_start`: every process in its session (`ray start`, the raylet,
    the agents, the workers), by PID, at once: nothing of a throwaway cluster needs a clean stop."""
    for pid in process_session_members(node.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.wait(timeout=10)


def _wait_for(condition, what: str, nodes: list[subprocess.Popen], timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for node in nodes:
            if node.poll() is not None:
                pytest.fail(f"`ray start` exited with {node.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {timeout_s} s")
        time.sleep(0.25)


def _answers(address: str) -> bool:
    from jobs.submit import ClusterError, connect

    try:
        connect(address)
    except ClusterError:
        return False
    return True


def _alive_nodes(address: str) -> int:
    from ray.util.state import list_nodes

    return len(list_nodes(address=address, filters=[("state", "=", "ALIVE")]))


def _reload_ray_auth_settings() -> None:
    """Ray reads RAY_AUTH_MODE and the token once per process; a user's shell starts a fresh process
    for each command, this test changes them in one."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _logs(cluster: Cluster, submission_id: str, capsys) -> str:
    main(["logs", submission_id, "--address", cluster.address])
    return capsys.readouterr().out[-3000:]


def test_relative_local_paths_are_refused_before_any_cluster_is_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"input": {"path": "shards/"}, "output": {"path": "/shared/out"}}))
    # No cluster listens at this address: the spec is refused before gitcap tries to reach it.
    assert main(["submit", "job.yaml", "--address", "http://127.0.0.1:9"]) == 2
    assert "input.path: 'shards/' is a relative local path" in capsys.readouterr().err
