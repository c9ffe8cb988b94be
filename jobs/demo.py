"""`gitcap demo`: synthetic scenes captioned through the whole pipeline, beside their true captions.

Scenes (seed `DEMO_SEED`, which training does not use) are written as WebDataset shards to a local
folder, captioned by the bundled model on a local Ray exactly as `gitcap run` would, and read back
from the Parquet output: the true caption is the scenes' `.txt` member, passed through as `txt`.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

DEMO_SEED = 20240607


@dataclass
class DemoResult:
    images: int
    exact: int
    images_per_s: float | None
    startup_s: float | None
    samples: list[tuple[str, str, str]]  # (key, caption, truth)

    @property
    def accuracy(self) -> float:
        return self.exact / self.images if self.images else 0.0


def demo_job(out: str, count: int, model_path: str | None, batch_size: int, workers: int):
    from pipeline.job import CaptionJob
    from pipeline.scenes import write_scenes

    shard_size = max(1, min(256, count // 8 or 1))
    _remove_demo_shards(Path(out, "scenes"))
    write_scenes(f"{out}/scenes", count, DEMO_SEED, format="webdataset", shard_size=shard_size)
    shutil.rmtree(f"{out}/captions", ignore_errors=True)  # the demo measures a fresh run each time
    return CaptionJob.from_dict({
        "input": {"path": f"{out}/scenes", "format": "webdataset"},
        "model": {"path": model_path},
        "output": {"path": f"{out}/captions"},
        "compute": {"batch_size": batch_size, "workers": workers},
    })


def _remove_demo_shards(folder: Path) -> None:
    """The shards an earlier demo wrote (`write_scenes` names them 00000.tar, ...): a smaller
    --count writes fewer, and the input is the whole folder, so the old ones would be captioned too.
    Nothing else in the folder is touched."""
    for shard in folder.glob("[0-9][0-9][0-9][0-9][0-9].tar"):
        shard.unlink()


def demo_result(summary, output: str, show: int = 8) -> DemoResult:
    import pyarrow.parquet as pq

    table = pq.read_table(output, columns=["key", "caption", "txt"]).to_pylist()
    table.sort(key=lambda row: row["key"])
    exact = sum(row["caption"] == row["txt"] for row in table)
    picked = random.Random(0).sample(table, min(show, len(table)))
    samples = [(row["key"], row["caption"] or "", row["txt"] or "") for row in sorted(picked, key=lambda r: r["key"])]
    return DemoResult(len(table), exact, summary.images_per_s, summary.startup_s, samples)


def format_demo(result: DemoResult) -> str:
    width = max((len(caption) for _, caption, _ in result.samples), default=10)
    lines = [f"{'key':<16} {'caption':<{width}}   truth"]
    for key, caption, truth in result.samples:
        mark = "=" if caption == truth else " "
        lines.append(f"{key:<16} {caption:<{width}} {mark} {truth}")
    lines.append(f"exact match: {result.exact}/{result.images} = {100 * result.accuracy:.1f}%")
    if result.images_per_s:
        lines.append(f"speed: {result.images_per_s:.1f} images/s (after {result.startup_s:.1f} s start-up)")
    return "\n".join(lines)
