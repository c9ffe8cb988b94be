"""Pipeline efficiency, redo after a kill, and memory as the input grows.

Efficiency = end-to-end images/s of `run_caption_job` (steady state: from the first captioned
batch to the last; Ray start-up and the actors' model loading are reported on their own) ÷
model-only images/s: the same `Captioner.caption` (normalise + generate + decode text) on crops
decoded beforehand, same model, batch size and machine. Both sides try each thread setting
(`--baseline-threads`, `--pipeline-cpus-per-worker`) and the fastest of each counts: on a
2-core machine shared with other work, one torch thread often beats two. Inputs are synthetic
scenes (JPEG, 96x96) in WebDataset shards.

Redo: a run is SIGKILLed right after its Nth commit (half of its waves); the rerun must caption
exactly the images that were not committed, and no committed image again.

Memory: peak proportional set size (PSS: shared pages split between the processes that map them)
summed over this process and every process it started (the Ray cluster), for N and 10 N images.

  python bench/bench_pipeline.py                      # the bundled model, 2,000 images; 2k vs 20k memory
  python bench/bench_pipeline.py --model PATH --images 1000 --memory-scales 1000 10000
  python bench/bench_pipeline.py --model git-base --gpus-per-worker 1 --batch-size 256 --images 8192 \
      --shard-size 512 --rounds 2 --skip memory redo      # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.job import CaptionJob  # noqa: E402
from pipeline.scenes import write_scenes  # noqa: E402

SEED = 20240607  # scenes no model was trained on
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_path_or_stand_in(path: str | None, work: str) -> tuple[str, str]:
    """The model to measure: as given, or "git-base" (random weights of git-base's shape, 224-pixel
    images; a tiny vocabulary file, since the words do not matter here), else the bundled one, else
    an untrained model of the bundled model's shape (random weights: it always generates
    max_new_tokens tokens)."""
    if path == "git-base":
        folder = os.path.join(work, "git-base-shape")
        _save_in_child(folder, (
            "import sys, torch, transformers\n"
            "from tests.tiny_processor import save_tiny_processor\n"
            "torch.manual_seed(0)\n"
            "transformers.GitForCausalLM(transformers.GitConfig()).save_pretrained(sys.argv[1])\n"
            "save_tiny_processor(sys.argv[1], image_size=224)\n"
        ))
        return folder, "random weights of git-base's shape"
    if path:
        return path, path
    from pipeline.captioner import resolve_model

    try:
        return resolve_model(None)[0], "bundled"
    except FileNotFoundError:
        folder = os.path.join(work, "stand-in")
        _save_in_child(folder, (
            "import sys, torch\n"
            "from gitmodel import GitForCausalLM\nfrom jobs.finetune import BundledRecipe\n"
            "from tests.tiny_processor import save_tiny_processor\n"
            "torch.manual_seed(0)\nrecipe = BundledRecipe()\nconfig = recipe.config()\n"
            "config.vocab_size = recipe.vocab_size\n"  # as trained: its own small WordPiece vocabulary
            "GitForCausalLM(config).save_pretrained(sys.argv[1])\n"
            "save_tiny_processor(sys.argv[1], image_size=recipe.image_size)\n"
        ))
        return folder, "untrained stand-in of the bundled model's shape (bundled model not built yet)"


def _save_in_child(folder: str, script: str) -> None:
    """Run `script`, which saves a model folder at sys.argv[1], in a child process: importing
    transformers (which writes the processor files) slows gitmodel's CPU generation in the same
    process several times over."""
    subprocess.run([sys.executable, "-c", script, folder], check=True, cwd=REPO, capture_output=True)


def caption_job(inputs: str, output: str, model: str, args) -> CaptionJob:
    return CaptionJob.from_dict({
        "input": {"path": inputs},
        "model": {"path": model},
        "output": {"path": output},
        "generation": {"max_new_tokens": args.max_new_tokens},
        "compute": {"batch_size": args.batch_size, "cpus_per_worker": args.cpus_per_worker,
                    "gpus_per_worker": args.gpus_per_worker},
    })


def model_only(model: str, inputs: str, args, threads: int) -> float:
    """Images/s of the captioner alone on crops decoded beforehand (best of `--repeats` passes)."""
    from gitmodel.image_processing import GitImageProcessor
    from pipeline.captioner import Captioner, CaptionerConfig
    from pipeline.decode import decode_image
    from pipeline.listing import list_shards
    from pipeline.sources import read_shard

    processor = GitImageProcessor.from_pretrained(model)
    keys, crops = [], []
    for shard in list_shards(inputs, "webdataset"):
        for record in read_shard(shard):
            keys.append(record.key)
            crops.append(processor.to_uint8(decode_image(record.data).image))
    crops = np.stack(crops)
    captioner = Captioner(CaptionerConfig(
        model_path=model, generate_kwargs={"max_new_tokens": args.max_new_tokens},
        threads=threads,
    ))
    captioner.caption(crops[: args.batch_size], keys[: args.batch_size])  # warm-up
    best = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        for i in range(0, len(keys), args.batch_size):
            captioner.caption(crops[i : i + args.batch_size], keys[i : i + args.batch_size])
        best = max(best, len(keys) / (time.perf_counter() - start))
    return best


class PeakMemory:
    """Samples the summed PSS of this process and all its descendants every `interval` seconds."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, sum(_pss(pid) for pid in _descendants(os.getpid())))


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_redo(inputs: str, work: str, model: str, args) -> dict:
    """SIGKILL a run after its Nth commit (in a child process), rerun, and count what was redone."""
    from pipeline.sink import ParquetSink
    from pipeline.storage import Folder

    output = os.path.join(work, "redo-out")
    spec = json.dumps(caption_job(inputs, output, model, args).to_dict())
    child = (
        "import json, sys, ray\n"
        "from pipeline.job import CaptionJob\nfrom pipeline.runner import run_caption_job\n"
        f"ray.init(address='local', num_cpus={args.num_cpus}, include_dashboard=False, logging_level='ERROR')\n"
        f"job = CaptionJob.from_dict(json.loads({spec!r}))\n"
        "run_caption_job(job, progress_callback=lambda u: print(u.images, flush=True))\n"
    )
    from pipeline.runner import _wave_size

    shards = -(-args.images // args.shard_size)
    waves = -(-shards // _wave_size(caption_job(inputs, output, model, args), shards))
    kill_after = args.kill_after_commits or max(1, waves // 2)
    env = dict(os.environ, GITCAP_FAILPOINT=f"after-commit:{kill_after}")
    run = subprocess.Popen([sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           text=True, cwd=REPO, start_new_session=True)
    printed, _ = run.communicate()
    _end_session(run.pid)
    received = int(printed.split()[-1]) if printed.split() else 0
    sink = ParquetSink(Folder(output))
    committed = sum(sink.read_info(name)["rows"] for name in sink.data_files())
    import ray

    from pipeline.runner import run_caption_job

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR")
    start = time.perf_counter()
    summary = run_caption_job(caption_job(inputs, output, model, args))
    rerun_s = time.perf_counter() - start
    ray.shutdown()
    return {
        "killed_after_commit": kill_after, "of_waves": waves, "killed_rc": run.returncode,
        # Rows the killed driver had received (reported after each result block, so up to a block
        # short) and committed: the rerun must caption exactly the images not committed.
        "received_before_kill": received, "committed_before_kill": committed,
        "rerun_images": summary.images_this_run, "expected_rerun_images": args.images - committed,
        "rerun_s": rerun_s, "complete": summary.complete,
    }


def _end_session(session: int) -> None:
    """End, by PID, the Ray processes a killed child left behind: they keep its session id."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[3]) == session:
            os.kill(int(entry), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model folder, or git-base for random weights of its shape (default: the bundled model)")
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="1 to caption on GPUs")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    parser.add_argument("--pipeline-cpus-per-worker", type=float, nargs="+",
                        default=sorted({1.0, max(1.0, (os.cpu_count() or 1) - 0.5)}),
                        help="Ray CPUs of the captioning actor to try (torch threads: rounded up); the fastest counts")
    parser.add_argument("--baseline-threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                        help="torch threads to try for the model-only baseline; the fastest is the baseline")
    parser.add_argument("--repeats", type=int, default=1, help="model-only passes per round (the best counts)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-scales", type=int, nargs="*", default=None, help="default: --images and 10x")
    parser.add_argument("--kill-after-commits", type=int, default=None, help="default: half of the waves")
    parser.add_argument("--skip", nargs="*", default=[], choices=["memory", "redo"])
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    work = tempfile.mkdtemp(prefix="gitcap-bench-")
    model, model_name = model_path_or_stand_in(args.model, work)
    inputs = os.path.join(work, "scenes")
    write_scenes(inputs, args.images, SEED, shard_size=args.shard_size)
    args.cpus_per_worker = args.pipeline_cpus_per_worker[0]
    results: dict = {"model": model_name, "images": args.images, "batch_size": args.batch_size,
                     "max_new_tokens": args.max_new_tokens, "cpus": os.cpu_count(),
                     "machine": platform.platform(),
                     "torch_threads": torch.get_num_threads()}

    import statistics

    import ray

    from pipeline.runner import run_caption_job

    start = time.perf_counter()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR")
    results["ray_start_s"] = time.perf_counter() - start
    # Rounds of model-only then pipeline, so that both sides of each ratio see the same machine
    # (other work on a shared machine comes and goes); the median ratio is the efficiency.
    results["rounds"] = []
    for round_number in range(args.rounds):
        measured = {"model_only": {}, "pipeline": {}}
        for threads in args.baseline_threads:
            measured["model_only"][threads] = model_only(model, inputs, args, threads)
        for cpus in args.pipeline_cpus_per_worker:
            args.cpus_per_worker = cpus
            output = os.path.join(work, f"out-{round_number}-{cpus}")
            summary = run_caption_job(caption_job(inputs, output, model, args))
            measured["pipeline"][cpus] = summary.images_per_s
            measured["pipeline_startup_s"] = summary.startup_s
        measured["efficiency"] = max(measured["pipeline"].values()) / max(measured["model_only"].values())
        results["rounds"].append(measured)
        print(f"round {round_number}: model only {measured['model_only']} images/s, pipeline "
              f"{measured['pipeline']} images/s, efficiency {measured['efficiency']:.2f}", flush=True)
    results["efficiency"] = statistics.median(r["efficiency"] for r in results["rounds"])
    results["model_only_images_per_s"] = statistics.median(max(r["model_only"].values()) for r in results["rounds"])
    results["pipeline_images_per_s"] = statistics.median(max(r["pipeline"].values()) for r in results["rounds"])
    pipeline_best = {c: statistics.median(r["pipeline"][c] for r in results["rounds"]) for c in args.pipeline_cpus_per_worker}
    args.cpus_per_worker = results["cpus_per_worker"] = max(pipeline_best, key=pipeline_best.get)
    print(f"efficiency {results['efficiency']:.2f} (median of {args.rounds} rounds)", flush=True)

    if "memory" not in args.skip:
        results["peak_memory"] = {}
        for count in args.memory_scales or [args.images, 10 * args.images]:
            folder = os.path.join(work, f"scenes-{count}")
            write_scenes(folder, count, SEED, shard_size=args.shard_size)
            with PeakMemory() as memory:
                run = run_caption_job(caption_job(folder, os.path.join(work, f"out-{count}"), model, args))
            results["peak_memory"][count] = {"pss_mib": memory.peak / 2**20, "images_per_s": run.images_per_s}
            print(f"{count} images: peak {memory.peak / 2**20:.0f} MiB PSS, {run.images_per_s:.1f} images/s", flush=True)
    ray.shutdown()

    if "redo" not in args.skip:
        results["redo"] = measure_redo(inputs, work, model, args)
        print(f"redo: {results['redo']}", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
