"""What the Ray cluster can give a job, and the job's `compute` settings resolved against it.

`compute.gpus_per_worker` and `compute.workers` default to "auto" (null in a spec): one GPU per
captioning worker and one worker per GPU when the cluster has GPUs, else one CPU worker. The
resolution happens on the driver, connected to the cluster, so a spec written on a laptop runs
on all the GPUs of whatever cluster it is submitted to.

Ray Data waits for every actor of a fixed-size pool before the first batch, and a pool that takes
every CPU leaves none for the read tasks that feed it: either way a job that asks for more than
the cluster has would wait forever, without a word. Where the cluster's limits are known (a Ray
this process started, or an autoscaler that states its maximum), such settings are refused up
front, naming the field; elsewhere more nodes may still join, and the run waits for them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pipeline.job import ComputeConfig, JobConfigError
from pipeline.stages import PREPROCESS_CPUS


@dataclass(frozen=True)
class ClusterCapacity:
    cpus: float
    gpus: float
    fixed: bool  # True: these are the most the cluster will ever have; False: nodes may still join

    def describe(self) -> str:
        what = f"{_amount(self.cpus)} CPUs and {_amount(self.gpus)} GPUs"
        return what if self.fixed else f"{what} (now; more nodes may join)"


def cluster_capacity(fixed: bool = False) -> ClusterCapacity:
    """The resources of the cluster this process is connected to (`ray.init` first): what it has
    now, or what its autoscaler can grow it to where that says more. `fixed`: the caller knows no
    node will join (a Ray it started for itself)."""
    import ray

    now = ray.cluster_resources()
    cpus, gpus = now.get("CPU", 0.0), now.get("GPU", 0.0)
    most = _autoscaler_maximum()
    if most is None:
        return ClusterCapacity(cpus, gpus, fixed)
    return ClusterCapacity(max(cpus, most.get("CPU", 0.0)), max(gpus, most.get("GPU", 0.0)), fixed=True)


def _autoscaler_maximum() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may provide, where it publishes its node
    types (autoscaler v2, as KubeRay runs it); None where it does not say. Ray Data reads the same
    private state to size its own autoscaling, so a Ray upgrade that moves it only loses the check."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001  (a private API: unknown is a fine answer)
        return None


def resolve_compute(compute: ComputeConfig, capacity: ClusterCapacity) -> ComputeConfig:
    """`compute` with `gpus_per_worker` and `workers` decided (where "auto") and checked against
    `capacity`. Explicit values are kept; settings the cluster can never place are a JobConfigError."""
    per_worker = compute.gpus_per_worker
    if per_worker is None:
        per_worker = 1.0 if capacity.gpus >= 1 else 0.0
    workers = compute.workers
    if workers is None:
        by_gpus = math.floor(capacity.gpus / per_worker + 1e-9) if per_worker else 1
        by_cpus = math.floor((capacity.cpus - PREPROCESS_CPUS) / compute.cpus_per_worker + 1e-9)
        workers = max(1, min(by_gpus, by_cpus))
    resolved = dataclasses.replace(compute, gpus_per_worker=per_worker, workers=workers)
    if capacity.fixed:
        _check_fits(resolved, capacity)
    return resolved


def _check_fits(compute: ComputeConfig, capacity: ClusterCapacity) -> None:
    gpus = compute.workers * compute.gpus_per_worker
    if gpus > capacity.gpus + 1e-9:
        field = "compute.workers" if compute.gpus_per_worker <= capacity.gpus else "compute.gpus_per_worker"
        raise JobConfigError(
            field,
            f"{compute.workers} workers x {_amount(compute.gpus_per_worker)} GPUs need {_amount(gpus)} GPUs; "
            f"the cluster has {_amount(capacity.gpus)}, so the job would wait forever",
        )
    cpus = compute.workers * compute.cpus_per_worker + PREPROCESS_CPUS
    if cpus > capacity.cpus + 1e-9:
        field = "compute.workers" if compute.cpus_per_worker + PREPROCESS_CPUS <= capacity.cpus else "compute.cpus_per_worker"
        raise JobConfigError(
            field,
            f"{compute.workers} workers x {_amount(compute.cpus_per_worker)} CPUs, plus {PREPROCESS_CPUS} CPU for "
            f"reading images, need {_amount(cpus)} CPUs; the cluster has {_amount(capacity.cpus)}, "
            "so the job would wait forever",
        )


def describe_compute(compute: ComputeConfig, capacity: ClusterCapacity) -> str:
    """One line for the start of a run: `4 captioning workers, 1 GPU each, batches of 256 (cluster: ...)`."""
    device = f"{_amount(compute.gpus_per_worker)} GPU each" if compute.gpus_per_worker else "on CPU"
    noun = "worker" if compute.workers == 1 else "workers"
    return (
        f"{compute.workers} captioning {noun}, {device}, batches of {compute.images_per_batch} "
        f"(cluster: {capacity.describe()})"
    )


def _amount(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
