"""The `gitcap` command line.

Each subcommand is two small functions: `add_<name>_parser(subparsers)` declares its arguments and
sets `run=<name>_command`, which does the work and returns the exit status. To add a subcommand,
write both and list the first in `SUBCOMMANDS`. Work modules are imported inside the commands, so
`gitcap --help` stays fast and one command's heavy dependencies never slow down another.
"""

from __future__ import annotations

import argparse
import sys

USAGE_ERROR = 2  # argparse's own exit status for bad arguments; ours match it


def parse_size(text: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT`, e.g. `96x96`, as (width, height)."""
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 96x96, got {text!r}")
    return int(width), int(height)


# --- gitcap scenes ---------------------------------------------------------------------------


def add_scenes_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "scenes",
        help="write synthetic captioning scenes (images with their true captions)",
        description="Write scenes 0..COUNT-1 of SEED to OUT, a local folder or any fsspec URL.",
    )
    parser.add_argument("out", metavar="OUT", help="output folder or URL, e.g. s3://bucket/scenes")
    parser.add_argument("--count", type=int, required=True, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0, help="scene seed (default: 0)")
    parser.add_argument("--format", choices=["webdataset", "parquet", "images"], default="webdataset")
    parser.add_argument("--shard-size", type=int, default=1000, help="scenes per tar/parquet file")
    parser.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg")
    parser.add_argument("--size", type=parse_size, default=(96, 96), help="WIDTHxHEIGHT (default: 96x96)")
    parser.add_argument(
        "--max-size",
        type=parse_size,
        default=None,
        help="WIDTHxHEIGHT; draw each scene's size between --size and this",
    )
    parser.set_defaults(run=scenes_command)


def scenes_command(args: argparse.Namespace) -> int:
    from pipeline.scenes import write_scenes

    files = write_scenes(
        args.out,
        count=args.count,
        seed=args.seed,
        format=args.format,
        shard_size=args.shard_size,
        image_format=args.image_format,
        size=args.size,
        max_size=args.max_size,
    )
    print(f"wrote {args.count} scenes (seed {args.seed}) in {len(files)} {args.format} files to {args.out}")
    return 0


# --- gitcap run ------------------------------------------------------------------------------


def add_run_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run or resume a captioning job",
        description="Run the job in JOB.yaml, or resume it: committed shards are skipped, so after a crash "
        "the same command finishes the job with every image exactly once. Exit status: 0 done, "
        "2 invalid spec or settings, 3 some sources failed.",
    )
    parser.add_argument("spec", metavar="JOB.yaml", help="the job spec")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec value (YAML), e.g. --set generation.num_beams=3; repeatable")
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: a local Ray for this run)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--retry-failed", action="store_true", help="caption again only the rows that failed")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    import json

    from jobs.console import ProgressLine, format_summary, ray_session
    from jobs.spec import load_spec, preflight
    from pipeline.runner import run_caption_job

    job = load_spec(args.spec, args.overrides)
    preflight(job)  # before any cluster starts or model loads
    progress = ProgressLine(enabled=not args.no_progress)
    with ray_session(args.address, args.num_cpus):
        try:
            summary = run_caption_job(job, retry_failed=args.retry_failed, progress_callback=progress)
        finally:
            progress.close()
    print(json.dumps(summary.to_dict(), indent=1) if args.json else format_summary(summary))
    return summary.exit_code


# --- gitcap status ---------------------------------------------------------------------------


def add_status_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show a job's progress, read from its output folder (no cluster needed)",
        description="Shards done/total, images ok/failed, throughput and ETA of the job writing to OUTPUT.",
    )
    parser.add_argument("output", metavar="OUTPUT", help="the job's output.path, or its JOB.yaml")
    parser.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                        help="fsspec options for OUTPUT, e.g. '{\"anon\": true}' (default: from JOB.yaml, or none)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.set_defaults(run=status_command)


def status_command(args: argparse.Namespace) -> int:
    import json

    from pipeline.progress import NoJobError, job_status

    output, options = args.output, args.storage_options
    if output.endswith((".yaml", ".yml")):
        from jobs.spec import load_spec

        job = load_spec(output)
        output, options = job.output.path, options or job.output.storage_options
    try:
        status = job_status(output, options)
    except NoJobError as err:
        print(f"gitcap status: {err}", file=sys.stderr)
        return 1
    print(json.dumps(status.to_dict(), indent=1, default=str) if args.json else status.format())
    return 0


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


# --- gitcap demo -----------------------------------------------------------------------------


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="caption synthetic scenes with the bundled model and compare with the truth",
        description="Write synthetic scenes to OUT/scenes, caption them through the pipeline on a local Ray "
        "into OUT/captions, and show captions beside the true ones, accuracy and images/s.",
    )
    parser.add_argument("--count", type=int, default=512, help="number of scenes (default: 512)")
    parser.add_argument("--out", default="gitcap-demo", help="working folder (default: ./gitcap-demo)")
    parser.add_argument("--model", default=None, help="model folder or URL (default: the bundled model)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.set_defaults(run=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    from jobs.console import ProgressLine, ray_session
    from jobs.demo import demo_job, demo_result, format_demo
    from jobs.spec import preflight
    from pipeline.runner import run_caption_job

    if args.count < 1:
        raise ValueError(f"--count must be at least 1, got {args.count}")
    job = demo_job(args.out, args.count, args.model, args.batch_size, args.workers)
    preflight(job)  # says so, naming model.path, when this install has no bundled model
    print(f"captioning {args.count} synthetic scenes from {args.out}/scenes into {args.out}/captions")
    progress = ProgressLine()
    with ray_session(num_cpus=args.num_cpus):
        try:
            summary = run_caption_job(job, progress_callback=progress)
        finally:
            progress.close()
    print(format_demo(demo_result(summary, job.output.path)))
    return summary.exit_code


# --- entry point -----------------------------------------------------------------------------

SUBCOMMANDS = [add_scenes_parser, add_run_parser, add_status_parser, add_demo_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gitcap", description="Distributed batch image captioning with GIT.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse has already printed the usage error, or the help
        return int(stop.code or 0)
    try:
        return args.run(args)
    except ValueError as err:  # invalid settings that argparse cannot see, e.g. a size out of range
        print(f"gitcap {args.command}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as err:  # the output location cannot be written; a message is enough
        print(f"gitcap {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
