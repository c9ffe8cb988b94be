"""`compute` resolved against the cluster: one captioning worker per GPU by default, and settings
that a cluster of known size can never place refused up front instead of waiting forever."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main
from pipeline import JobConfigError
from pipeline.cluster import ClusterCapacity, describe_compute, resolve_compute
from pipeline.job import ComputeConfig
from tests.pipeline_fixtures import job, tiny_model, write_scene_shards  # noqa: F401  (fixtures)


def resolved(capacity: ClusterCapacity, **settings) -> ComputeConfig:
    return resolve_compute(ComputeConfig(**settings), capacity)


def test_auto_gives_one_worker_per_gpu_and_one_cpu_worker_without_gpus():
    eight_gpus = ClusterCapacity(cpus=64, gpus=8, fixed=True)
    c = resolved(eight_gpus)
    assert (c.workers, c.gpus_per_worker, c.images_per_batch) == (8, 1, 256)
    assert resolved(eight_gpus, gpus_per_worker=0.5).workers == 16  # two models share each GPU
    assert resolved(eight_gpus, gpus_per_worker=2).workers == 4
    assert resolved(eight_gpus, workers=3).workers == 3  # an explicit value wins
    cpu = resolved(ClusterCapacity(cpus=16, gpus=0, fixed=True))
    assert (cpu.workers, cpu.gpus_per_worker, cpu.images_per_batch) == (1, 0, 32)
    assert resolved(ClusterCapacity(cpus=16, gpus=4, fixed=True), gpus_per_worker=0).workers == 1  # told: CPU


def test_auto_workers_leave_cpus_for_reading_images():
    # Each GPU worker also reserves cpus_per_worker CPUs; the read tasks need some too, or the
    # pool would take every CPU and wait for rows that nothing can read.
    c = resolved(ClusterCapacity(cpus=4, gpus=8, fixed=True))
    assert (c.workers, c.gpus_per_worker) == (3, 1)
    assert resolved(ClusterCapacity(cpus=16, gpus=8, fixed=True), cpus_per_worker=4).workers == 3


@pytest.mark.parametrize(
    ("capacity", "settings", "field", "message"),
    [
        (ClusterCapacity(2, 0, True), {"workers": 3}, "compute.workers", "need 3.5 CPUs; the cluster has 2"),
        (ClusterCapacity(2, 0, True), {"workers": 2}, "compute.workers", "need 2.5 CPUs"),
        (ClusterCapacity(2, 0, True), {"cpus_per_worker": 4}, "compute.cpus_per_worker", "need 4.5 CPUs"),
        (ClusterCapacity(8, 0, True), {"gpus_per_worker": 1}, "compute.gpus_per_worker", "the cluster has 0"),
        (ClusterCapacity(32, 2, True), {"workers": 4, "gpus_per_worker": 1}, "compute.workers", "need 4 GPUs"),
    ],
)
def test_settings_a_fixed_cluster_cannot_place_are_refused_naming_the_field(capacity, settings, field, message):
    with pytest.raises(JobConfigError) as info:
        resolved(capacity, **settings)
    assert info.value.field == field and message in str(info.value) and "wait forever" in str(info.value)


def test_a_cluster_that_may_grow_keeps_explicit_settings_and_waits_for_nodes():
    # An autoscaler that does not publish its limits: GPU nodes may join once the pool asks.
    growing = ClusterCapacity(cpus=4, gpus=0, fixed=False)
    c = resolved(growing, workers=4, gpus_per_worker=1)
    assert (c.workers, c.gpus_per_worker) == (4, 1)
    assert "more nodes may join" in describe_compute(c, growing)


def test_run_refuses_more_workers_than_the_local_ray_has_cpus_instead_of_hanging(tmp_path, tiny_model, capsys):
    write_scene_shards(tmp_path / "in", shards=1, per_shard=2)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")},
                                    "model": {"path": tiny_model}}))
    assert main(["run", str(spec), "--num-cpus", "2", "--no-progress", "--set", "compute.workers=3"]) == 2
    err = capsys.readouterr().err
    assert "compute.workers: 3 workers x 1 CPUs, plus 0.5 CPU for reading images, need 3.5 CPUs" in err

    assert main(["run", str(spec), "--num-cpus", "2", "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    assert "1 captioning worker, on CPU, batches of 32 (cluster: 2 CPUs and 0 GPUs)" in captured.err
    assert json.loads(captured.out)["compute"]["workers"] == 1


def test_a_cluster_with_gpus_gets_one_captioning_worker_per_gpu(tmp_path, tiny_model):
    """Ray is told this machine has 2 GPUs: auto asks for two actors of one GPU each (each falls back to the
    CPU, as torch sees no CUDA device here) and every image is captioned once."""
    import ray

    from pipeline.runner import run_caption_job

    write_scene_shards(tmp_path / "in", shards=4, per_shard=3)
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        summary = run_caption_job(job(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model,
                                      compute={"batch_size": 4, "shards_per_wave": 1}))
    finally:
        ray.shutdown()
    assert {k: summary.compute[k] for k in ("workers", "gpus_per_worker", "batch_size")} == {
        "workers": 2, "gpus_per_worker": 1, "batch_size": 4}
    keys = pq.read_table(tmp_path / "out", columns=["key"])["key"].to_pylist()
    assert len(keys) == len(set(keys)) == 12
