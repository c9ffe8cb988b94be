"""The dataset card: a `README.md` that says what a finished job's output holds.

It is a Hugging Face dataset card whose YAML header names the data files of each config (default:
every row; `filtered`: the filtered view), so `datasets.load_dataset(OUTPUT/__dataset__)` and
`load_dataset(OUTPUT/__dataset__, "filtered")` load them; below the header: the counts (ok, failed,
flagged, filtered), the score distribution, a sample of captions and the settings that made them.

The card is built from small per-file statistics (`file_stats`, kept beside each data file's
views by pipeline.views), never by reading the data again, so a job of any size gets its card at
once. It holds no timestamps: the same output always gives the same card.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.job import CaptionJob

SAMPLES_PER_FILE = 3
SAMPLES_SHOWN = 10
SCORE_BIN = 0.5  # histogram bin width, in mean token log-prob
SCORE_FLOOR = -10.0  # scores below fall in one bin: such captions are noise, however low
BAR_WIDTH = 40


def file_stats(table: pa.Table) -> dict[str, Any]:
    """What the card needs from one data file: flag counts, a score histogram, a few captions."""
    ok = table.filter(pc.is_null(table["error"]))
    flags = ok["flags"].to_pylist()
    scores = [s for s in ok["score"].to_pylist() if s is not None and not math.isnan(s)]
    sample = ok.slice(0, SAMPLES_PER_FILE)
    each_caption = []
    if "captions_flags" in ok.column_names:
        each_caption = [codes for row in ok["captions_flags"].to_pylist() for codes in row]
    return {
        "captions": len(each_caption),
        "captions_flagged": sum(1 for codes in each_caption if codes),
        "flagged": sum(1 for codes in flags if codes),
        "flags": dict(Counter(code for codes in flags for code in codes)),
        "scores": len(scores),
        "score_sum": sum(scores),
        "score_min": min(scores, default=None),
        "score_max": max(scores, default=None),
        "score_bins": dict(Counter(str(_score_bin(s)) for s in scores)),
        "samples": [
            {"key": k, "caption": c, "score": s, "flags": f}
            for k, c, s, f in zip(*(sample[n].to_pylist() for n in ("key", "caption", "score", "flags")))
        ],
    }


def _score_bin(score: float) -> float:
    """The lower edge of the score's bin; the lowest bin for -inf or NaN (a model in fp16 that
    overflowed), which would stop the card rather than land anywhere."""
    if not math.isfinite(score):
        return SCORE_FLOOR
    return max(SCORE_FLOOR, math.floor(score / SCORE_BIN) * SCORE_BIN)


def render_card(job: CaptionJob, manifests: dict[str, dict], records: dict[str, dict]) -> str:
    """The card's text, from the data files' manifests (pipeline.progress) and their view records."""
    stats = [records[name]["stats"] for name in sorted(records)]
    ok = sum(m["ok"] for m in manifests.values())
    failed = sum(m["failed"] for m in manifests.values())
    failed_sources = sum(len(m.get("failed_sources", [])) for m in manifests.values())
    flags: Counter = Counter()
    errors: Counter = Counter()
    for s in stats:
        flags.update(s["flags"])
    for m in manifests.values():
        errors.update(m.get("errors", {}))
    output = job.output
    counts = [("images", ok + failed), ("ok", ok), ("failed", failed), ("failed sources (shards)", failed_sources),
              ("flagged (ok rows with any flag)", sum(s["flagged"] for s in stats))]
    if output.filter is not None:
        kept = sum(records[name]["kept"] for name in records)
        counts += [("kept by the filter (filtered/)", kept), ("dropped by the filter", ok - kept)]
    captions = sum(s.get("captions", 0) for s in stats)
    if captions:
        counts += [("captions in `captions` (all of the ok rows)", captions),
                   ("of which flagged", sum(s["captions_flagged"] for s in stats))]
        if output.filter is not None:
            kept_captions = sum(records[name].get("kept_captions", 0) for name in records)
            counts.append(("of which kept by the filter", kept_captions))
    if output.webdataset:
        counts.append((f"WebDataset samples (webdataset/, {len(records)} tars)", ok))
    settings = {**job.decisive_settings(), "views": {
        "filter": None if output.filter is None else {"drop_flags": output.filter.drop_flags},
        "webdataset": output.webdataset,
    }}
    lines = _header(output.filter is not None) + [
        "# Captions made by gitcap",
        "",
        f"Captions of `{job.input.path}` ({job.input.format}) by {job.model.path or 'the bundled model'}. "
        "Every row is in the Parquet files of the folder above this one (read it with pandas, pyarrow, "
        "DuckDB or `datasets`); what this folder holds is derived from them.",
        "",
        "## Counts",
        "",
        "| | rows |",
        "|---|---:|",
        *(f"| {label} | {value} |" for label, value in counts),
        "",
        "Flags: " + (", ".join(f"{code} {n}" for code, n in sorted(flags.items())) or "none") + ".",
        "Errors: " + (", ".join(f"{reason} {n}" for reason, n in sorted(errors.items())) or "none") + ".",
        "",
        "## Score distribution",
        "",
        *_score_section(stats),
        "",
        "## Sample captions",
        "",
        *_sample_lines(stats),
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(settings, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


def _header(filtered: bool) -> list[str]:
    """The Hugging Face YAML header: one config per view, paths relative to this card's folder."""
    lines = ["---", "configs:", "- config_name: default", '  data_files: "../*.parquet"', "  default: true"]
    if filtered:
        lines += ["- config_name: filtered", '  data_files: "filtered/*.parquet"']
    return lines + ["---", ""]


def _score_section(stats: list[dict]) -> list[str]:
    count = sum(s["scores"] for s in stats)
    if not count:
        return ["No scored captions."]
    bins: Counter = Counter()
    for s in stats:
        bins.update({float(edge): n for edge, n in s["score_bins"].items()})
    low = min(s["score_min"] for s in stats if s["scores"])
    high = max(s["score_max"] for s in stats if s["scores"])
    mean = sum(s["score_sum"] for s in stats) / count
    peak = max(bins.values())
    lines = [f"Mean token log-probability of the best caption, over {count} captions: "
             f"min {low:.3f}, mean {mean:.3f}, max {high:.3f}.", "", "```"]
    edge = max(bins)
    while edge >= min(bins):  # every bin from the highest to the lowest, empty ones too
        label = f"< {SCORE_FLOOR + SCORE_BIN:g}" if edge == SCORE_FLOOR else f"[{edge:g}, {edge + SCORE_BIN:g})"
        n = bins.get(edge, 0)
        lines.append(f"{label:>14} {'#' * math.ceil(BAR_WIDTH * n / peak):<{BAR_WIDTH}} {n}")
        edge -= SCORE_BIN
    return lines + ["```"]


def _sample_lines(stats: list[dict]) -> list[str]:
    samples = [sample for s in stats for sample in s["samples"]][:SAMPLES_SHOWN]
    if not samples:
        return ["No captions."]
    return [
        f"- `{s['key']}` ({s['score']:.3f}{', ' + ', '.join(s['flags']) if s['flags'] else ''}): "
        f"{s['caption'] or '(empty)'}"
        for s in samples
    ]
