"""The captioning workers' Prometheus metrics, scraped from Ray's metrics endpoint as Prometheus would."""

from __future__ import annotations

import re
import socket
import time
import urllib.request

import pytest

from pipeline import run_caption_job
from tests.pipeline_fixtures import image_zoo, job, tar_bytes, tiny_model, write_scene_shards  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_port():
    import ray

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             _metrics_export_port=port)
    yield port
    ray.shutdown()


def scrape(port: int) -> dict[str, float]:
    """{series with its labels: value} of every gitcap_* sample on the node's endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(ray_gitcap_\w+|gitcap_\w+)(\{[^}]*\})? (\S+)$", line)
        if match:
            name, labels, value = match.groups()
            samples[name + (labels or "")] = samples.get(name + (labels or ""), 0.0) + float(value)
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    return sum(
        value for series, value in samples.items()
        if series.split("{")[0].removeprefix("ray_") == name
        and all(f'{k}="{v}"' in series for k, v in labels.items())
    )


def test_workers_export_images_tokens_errors_and_batch_latency(tmp_path, tiny_model, metrics_port):
    write_scene_shards(tmp_path / "in", shards=2, per_shard=5)
    zoo = image_zoo()
    (tmp_path / "in" / "00002.tar").write_bytes(tar_bytes([("bad.jpg", zoo["truncated"][1]), ("empty.png", b"")]))
    summary = run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model))
    assert (summary.images_ok, summary.images_failed) == (10, 2)

    deadline = time.time() + 40  # the agent exports every few seconds
    while True:
        samples = scrape(metrics_port)
        if total(samples, "gitcap_images_total", status="failed") >= 2 or time.time() > deadline:
            break
        time.sleep(1)
    assert total(samples, "gitcap_images_total", status="ok") == 10
    assert total(samples, "gitcap_images_total", status="failed") == 2
    assert total(samples, "gitcap_errors_total") == 2
    assert total(samples, "gitcap_tokens_total") >= 10  # at least one token per caption
    # One observation per captioned batch (at most 8 rows a batch, so at least two batches). Ray
    # exports histogram sums from bucket midpoints, so only the counts are exact.
    batches = total(samples, "gitcap_batch_seconds_count")
    assert batches >= 2 and total(samples, "gitcap_batch_images_count") == batches
