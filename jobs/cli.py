"""The `gitcap` command line.

Each subcommand is two small functions: `add_<name>_parser(subparsers)` declares its arguments and
sets `run=<name>_command`, which does the work and returns the exit status. To add a subcommand,
write both and list the first in `SUBCOMMANDS`. Work modules are imported inside the commands, so
`gitcap --help` stays fast and one command's heavy dependencies never slow down another.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.job import CaptionJob

USAGE_ERROR = 2  # argparse's own exit status for bad arguments; ours match it
STOPPED = 128 + 15  # stopped by SIGTERM: what a shell reports for a process that SIGTERM ended


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
        "2 invalid spec or settings, 3 some sources failed, 143 stopped by SIGTERM.",
    )
    parser.add_argument("spec", metavar="JOB.yaml", help="the job spec")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec value (YAML), e.g. --set generation.num_beams=3; repeatable")
    parser.add_argument("--address", default=None,
                        help="an existing Ray cluster, HEAD:6379 or ray://HEAD:10001 (default: $RAY_ADDRESS unless it "
                        "is a dashboard URL, else a local Ray for this run)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--retry-failed", action="store_true", help="caption again only the rows that failed")
    parser.add_argument("--no-progress", action="store_true", help="no live progress line")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    import json

    from jobs.console import (ProgressLine, RunStopped, format_summary, ray_session, resolve_job_compute, run_address,
                              stop_on_sigterm)
    from jobs.spec import load_spec, preflight
    from pipeline.runner import run_caption_job

    job = load_spec(args.spec, args.overrides)
    address = run_address(args.address)
    preflight(job)  # before any cluster starts or model loads
    progress = ProgressLine(enabled=not args.no_progress)
    with ray_session(address, args.num_cpus) as capacity, stop_on_sigterm():
        job = resolve_job_compute(job, capacity)
        try:
            summary = run_caption_job(job, retry_failed=args.retry_failed, progress_callback=progress)
        except RunStopped as stop:
            print(f"gitcap run: {stop}; what was committed stays, rerun to resume", file=sys.stderr)
            return STOPPED
        except (ValueError, OSError):
            raise  # settings and storage: main() reports them
        except Exception as err:  # noqa: BLE001  (the cluster's errors: a model that will not load, ...)
            from pipeline.runner import root_cause

            print(f"gitcap run: failed: {root_cause(err)}; what was committed stays, rerun to resume", file=sys.stderr)
            return 1
        finally:
            progress.close()
    print(json.dumps(summary.to_dict(), indent=1) if args.json else format_summary(summary))
    return summary.exit_code


# --- gitcap submit, logs, stop: jobs on a running Ray cluster ---------------------------------

ADDRESS_HELP = ("the head node's dashboard, e.g. http://HEAD:8265 (HEAD:8265 means the same; default: $RAY_ADDRESS, "
                "else http://127.0.0.1:8265)")


def add_submit_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="submit a captioning job to a Ray cluster (the cluster needs no gitcap installed)",
        description="Check JOB.yaml here (spec, input, output, model), then submit `gitcap run` of it to the "
        "cluster through the Ray Jobs API, with gitcap and the spec shipped along, and print the submission "
        "id. Submitting the same job again resumes it. This machine's storage endpoints and region (AWS_ENDPOINT_URL, "
        "AWS_ENDPOINT_URL_S3, AWS_REGION, AWS_DEFAULT_REGION, HF_ENDPOINT) go with the job; credentials do not. "
        "With token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH).",
    )
    parser.add_argument("spec", metavar="JOB.yaml", help="the job spec")
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec value (YAML), e.g. --set compute.workers=4; repeatable")
    parser.add_argument("--follow", action="store_true",
                        help="print the job's output until it ends; exit with the job's exit status")
    parser.add_argument("--allow-inline-credentials", action="store_true",
                        help="send secrets written in the spec's storage_options (key, secret, token, ...) to the "
                        "cluster, in plain text in the uploaded job.yaml; without it such a spec is refused")
    parser.set_defaults(run=submit_command)


def submit_command(args: argparse.Namespace) -> int:
    from jobs.spec import load_spec, preflight
    from jobs.submit import (check_cluster_paths, connect, follow_logs, forwarded_env, release_ended_run,
                             submit_job)
    from pipeline.progress import ConcurrentRunError

    job = load_spec(args.spec, args.overrides)
    check_cluster_paths(job)
    _check_inline_credentials(job, args.allow_inline_credentials)
    client = connect(args.address)
    try:
        preflight(job)  # bad specs and storage fail here, before anything is submitted
    except ConcurrentRunError:
        released = release_ended_run(client, job)
        if released is None:
            raise  # a run that is alive holds the output
        print(f"run {released} holds no lease any more: its driver on the cluster has ended")
        preflight(job)
    env_vars = forwarded_env()
    submission_id = submit_job(client, job, env_vars)
    print(f"submitted {submission_id} to {client.get_address()}")
    if env_vars:
        print("with this machine's storage settings: " + ", ".join(f"{k}={v}" for k, v in env_vars.items()))
    if not args.follow:
        print(f"follow: gitcap logs {submission_id} --follow; stop: gitcap stop {submission_id}; "
              f"progress: gitcap status {job.output.path}")
        return 0
    return _report_end(args, follow_logs(client, submission_id, _write_through))


def _check_inline_credentials(job: CaptionJob, allowed: bool) -> None:
    """Refuse secrets in the spec, unless allowed: submit would send them in plain text."""
    from jobs.submit import inline_credentials
    from pipeline.job import JobConfigError

    fields = inline_credentials(job)
    if fields and allowed:
        print(f"gitcap submit: warning: {', '.join(fields)} go to the cluster in plain text, in the uploaded "
              "job.yaml (--allow-inline-credentials)", file=sys.stderr)
    elif fields:
        others = f"; so would {', '.join(fields[1:])}" if fields[1:] else ""
        raise JobConfigError(
            fields[0], f"a secret, which submit would send to the cluster in plain text, in the job.yaml it uploads "
            f"and the cluster keeps{others}. Give the cluster its own credentials (an IAM role or instance profile, "
            "workload identity, a Kubernetes secret as environment variables of its pods), or pass "
            "--allow-inline-credentials"
        )


def add_logs_parser(subparsers) -> None:
    parser = subparsers.add_parser("logs", help="print a submitted job's output",
                                   description="Print the output of the driver of submitted job ID.")
    parser.add_argument("submission_id", metavar="ID", help="the id `gitcap submit` printed")
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    parser.add_argument("--follow", action="store_true",
                        help="keep printing until the job ends; exit with the job's exit status")
    parser.set_defaults(run=logs_command)


def logs_command(args: argparse.Namespace) -> int:
    from jobs.submit import connect, follow_logs, job_logs

    client = connect(args.address)
    if args.follow:
        return _report_end(args, follow_logs(client, args.submission_id, _write_through))
    print(job_logs(client, args.submission_id), end="")
    return 0


def add_stop_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "stop",
        help="stop a submitted job; what it committed stays (submit it again to resume)",
        description="Stop submitted job ID (its driver gets SIGTERM, then SIGKILL after a few seconds), wait "
        "until it has ended and print its final status.",
    )
    parser.add_argument("submission_id", metavar="ID", help="the id `gitcap submit` printed")
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    parser.set_defaults(run=stop_command)


def stop_command(args: argparse.Namespace) -> int:
    from jobs.submit import connect, describe_end, stop_job

    details = stop_job(connect(args.address), args.submission_id)
    print(f"{args.submission_id}: {describe_end(details)}")
    return 0 if details.status.is_terminal() else 1


def _report_end(args: argparse.Namespace, details) -> int:
    from jobs.submit import describe_end, exit_status

    status = exit_status(details)
    if status:
        print(f"gitcap {args.command}: job {details.submission_id} {describe_end(details)}", file=sys.stderr)
    return status


def _write_through(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


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
    except Exception as err:  # noqa: BLE001  (each storage raises its own: endpoint, credentials, ...)
        from pipeline.storage import storage_error_cause

        print(f"gitcap status: cannot read {output}: {storage_error_cause(err)}", file=sys.stderr)
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
    parser.add_argument("--workers", type=int, default=None, help="captioning workers (default: one per GPU, else 1)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.set_defaults(run=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    from jobs.console import ProgressLine, ray_session, resolve_job_compute
    from jobs.demo import demo_job, demo_result, format_demo
    from jobs.spec import preflight
    from pipeline.job import JobConfigError
    from pipeline.runner import run_caption_job

    if args.count < 1:
        raise ValueError(f"--count must be at least 1, got {args.count}")
    job = demo_job(args.out, args.count, args.model, args.batch_size, args.workers)
    try:
        preflight(job)
    except JobConfigError as err:
        if err.field != "model.path" or args.model:
            raise
        print("gitcap demo: this install has no bundled model yet: make it with "
              "`gitcap train-bundled --out gitmodel/bundled`, or pass --model PATH", file=sys.stderr)
        return USAGE_ERROR
    print(f"captioning {args.count} synthetic scenes from {args.out}/scenes into {args.out}/captions")
    progress = ProgressLine()
    with ray_session(num_cpus=args.num_cpus) as capacity:  # always private, whatever $RAY_ADDRESS names
        job = resolve_job_compute(job, capacity)
        try:
            summary = run_caption_job(job, progress_callback=progress)
        finally:
            progress.close()
    print(format_demo(demo_result(summary, job.output.path)))
    return summary.exit_code


# --- gitcap finetune -------------------------------------------------------------------------


def add_finetune_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune GIT on image-caption pairs (or train a fresh model from a config)",
        description=(
            "Train GIT on image-caption pairs read like a captioning job's input: WebDataset shards "
            "(caption in KEY.txt), Parquet (a caption or text column) or image folders (KEY.txt beside "
            "KEY.jpg). Writes checkpoint-STEP folders to OUT while training, resumes from the last one, "
            "and leaves the final model in OUT in the Hugging Face layout."
        ),
    )
    parser.add_argument("input", metavar="INPUT", nargs="+", help="training data: shards, folders, globs or URLs")
    parser.add_argument("--out", required=True, help="output folder (or URL) for checkpoints and the final model")
    parser.add_argument("--format", choices=["webdataset", "parquet", "images"], default="webdataset")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--model", help="checkpoint to start from (default: the bundled model)")
    start.add_argument("--config", help="config.json of a fresh model to train from scratch")
    parser.add_argument("--processor", help="processor (tokenizer + image processor) folder; default: the model's")
    parser.add_argument("--vocab-size", type=int, default=1000, help="WordPiece vocabulary for a fresh tokenizer")
    parser.add_argument("--eval-input", nargs="+", help="held-out data (default: a hashed share of INPUT)")
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="share of INPUT held out (default 0.05)")
    parser.add_argument("--max-eval", type=int, default=500, help="at most this many held-out pairs")
    parser.add_argument("--caption-field", help="WebDataset member / Parquet column / sidecar extension")
    parser.add_argument("--image-column", help="Parquet image column (default: found by type)")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--eval-every", type=int, default=500, help="steps between evaluations (0: at the end only)")
    parser.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (0: at the end only)")
    parser.add_argument("--keep-checkpoints", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true", help="start over even if OUT holds checkpoints")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.set_defaults(run=finetune_command)


def finetune_command(args: argparse.Namespace) -> int:
    from gitmodel.training import TrainingArguments
    from jobs.finetune import finetune

    _set_threads(args.threads)
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
        warmup_steps=args.warmup_steps, lr_schedule=args.schedule, weight_decay=args.weight_decay,
        eval_every=args.eval_every, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        seed=args.seed, resume=not args.no_resume,
    )
    metrics = finetune(
        args.input, training, format=args.format, eval_input=args.eval_input, eval_fraction=args.eval_fraction,
        max_eval=args.max_eval, model=args.model, config=args.config, processor=args.processor,
        vocab_size=args.vocab_size, caption_field=args.caption_field, image_column=args.image_column,
    )
    summary = {k: v for k, v in metrics.items() if k != "mistakes"}
    print(f"wrote the model to {args.out}: {summary}")
    return 0


# --- gitcap train-bundled --------------------------------------------------------------------


def add_train_bundled_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-bundled",
        help="train the bundled tiny scene captioner from scratch (the one command that made it)",
        description=(
            "Write synthetic scenes, train a WordPiece tokenizer and a fresh tiny GIT on them with the "
            "fine-tuning code, test it on unseen scenes and write it, with its model card, to OUT."
        ),
    )
    parser.add_argument("--out", required=True, help="folder for the model, e.g. gitmodel/bundled")
    parser.add_argument("--work-dir", help="scenes and checkpoints (default: a new temporary folder); rerun to resume")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.set_defaults(run=train_bundled_command)


def train_bundled_command(args: argparse.Namespace) -> int:
    from jobs.finetune import train_bundled

    _set_threads(args.threads)
    result = train_bundled(args.out, args.work_dir)
    print(
        f"wrote the bundled model to {args.out} in {result['seconds'] / 60:.1f} min: "
        f"test exact match {result['test']['exact_match']:.1%}"
    )
    return 0


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# --- entry point -----------------------------------------------------------------------------

SUBCOMMANDS = [
    add_scenes_parser,
    add_run_parser,
    add_submit_parser,
    add_logs_parser,
    add_stop_parser,
    add_status_parser,
    add_demo_parser,
    add_finetune_parser,
    add_train_bundled_parser,
]


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
