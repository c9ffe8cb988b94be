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


# --- entry point -----------------------------------------------------------------------------

SUBCOMMANDS = [add_scenes_parser]


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
