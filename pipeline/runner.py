"""The whole data path, with exactly-once resume: `run_caption_job(job) -> RunSummary`.

    shard list ─▶ read + decode + crop (CPU tasks) ─▶ caption (actor pool) ─▶ driver ─▶ Parquet
                  pipeline.stages                     pipeline.captioner       waves    pipeline.sink

Ray Data streams shards through the two map stages (`from_items(shards)` → `map_batches` on CPU
tasks → `map_batches` on an `ActorPoolStrategy`, one model per actor, `num_gpus` when on GPUs),
with the read-ahead capped so that memory does not depend on the job's size. The driver iterates
the captioned rows, assembles them per shard (an end-marker row per shard says how many to
expect), and commits finished shards in *waves*: every `shards_per_wave` finished shards (or
every `commit_interval_s`), one Parquet file holding exactly those shards is published atomically
under a name no other attempt uses. That publication is the commit. A manifest (the index that
`gitcap status` reads) is written beside it in `.gitcap/`.

Why this protocol, and not Ray Data's `write_parquet` or its `CheckpointConfig`:
- `write_parquet` writes straight to final names, fresh per execution: a rerun after a crash
  appends a second copy, and a killed task can leave a partial file. No exactly-once.
- `CheckpointConfig` (beta in 2.60) deadlocks on 2-CPU clusters, fails with WebDataset input,
  re-reads every finished shard on resume, keeps every finished id in driver memory and, by
  default, reprocesses a finished job.
- A data file that holds whole shards and is published atomically (object stores: one upload
  completes or none; local: write under `.gitcap/attempts/`, then rename) is all-or-nothing, and
  its footer names its shards, so the committed set can always be rebuilt from the data alone.
  A kill at any instant leaves every shard either in exactly one published file or in none: the
  rerun skips the first kind without reading them and redoes the second. A manifest as the commit
  point would not do on S3: with no rename there, data files would sit where readers look before
  their manifest exists, and a crash would leave them there.
- So readers (pandas, pyarrow, DuckDB, Hugging Face `datasets`) can read the folder directly and
  only ever see committed rows: every `*.parquet` in it is committed, and all bookkeeping is in
  the hidden `.gitcap/`, the one name every one of those readers skips.
- Redo after a kill is bounded by what was in flight: shards being read or captioned, plus at
  most one wave of finished-but-uncommitted shards. Committed shards are never re-read.
- One writer at a time: a running run's record is its lease, renewed from a thread whatever the
  run is doing (see `progress.RunLease`); a run checks it before every commit.

Sampling reproduces across resumes (per-image seeds from (seed, key)), so a redone shard gets
the captions it would have had. `--retry-failed` re-reads only shards with error rows, captions
only their failed rows (found by their place in the shard: keys need not be unique), and
republishes each affected file whole under its own name (one atomic replace), so its error rows
are replaced, never duplicated.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gitmodel.image_processing import GitImageProcessor
from pipeline.captioner import Captioner, CaptionerConfig, resolve_model
from pipeline.cluster import cluster_capacity, resolve_compute
from pipeline.job import CaptionJob
from pipeline.listing import list_shards
from pipeline.progress import SUCCESS_FILE, JobProgress, RunLease, new_run_record
from pipeline.sink import file_summary, json_text, output_table
from pipeline.sources import Shard, is_shard_failure, parquet_schema, valid_utf8
from pipeline.stages import PREPROCESS_CPUS, PreprocessConfig, ShardTask, read_and_preprocess
from pipeline.storage import Folder
from pipeline.views import finish_dataset, publish_views

COMMIT_INTERVAL_S = 60.0
READ_AHEAD_BATCHES = 32  # decoded batches in the object store per captioning actor, at most about
OBJECT_STORE_FLOOR = 256 << 20  # a wave is committed at least this often, full or not
STORAGE_FAILURE_STREAK = 16  # shards in a row whose storage failed (each after retries): storage is down
FAILPOINT_ENV = "GITCAP_FAILPOINT"  # tests: "NAME[:N]" SIGKILLs this process at the Nth NAME


@dataclass
class ProgressUpdate:
    """What a live display needs, sent after every batch of results."""

    shards_total: int
    shards_done: int  # committed, this run and before
    shards_todo: int  # this run's work
    images: int  # images received this run, ok or failed (each once, failed sources not counted)
    failed: int
    elapsed_s: float
    images_per_s: float | None


@dataclass
class RunSummary:
    output: str
    run_id: str
    shards_total: int
    shards_done: int  # committed, in all runs
    shards_this_run: int  # committed by this run
    images_ok: int  # the whole output
    images_failed: int
    images_this_run: int  # images this run committed, ok or failed (each once)
    errors: dict[str, int]  # reason code -> rows, whole output
    failed_sources: list[dict[str, str]]  # shards that could not be read (whole output, and this run)
    elapsed_s: float
    startup_s: float | None  # from the start of the run to the first captioned batch
    images_per_s: float | None  # images committed this run, per second after start-up
    retried: bool = False
    fingerprint: str = ""  # of the job's decisive settings (see CaptionJob.fingerprint)
    # Busy seconds per stage this run, summed over workers: reading shards from storage, decoding
    # and cropping images (CPU tasks), captioning (actors). Divide images by one for a stage's speed.
    stage_seconds: dict[str, float] = field(default_factory=dict)
    compute: dict[str, Any] = field(default_factory=dict)  # the settings this run had, "auto" resolved
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.shards_done >= self.shards_total

    @property
    def exit_code(self) -> int:
        """0: every shard committed and read; 3: some sources failed or are not done."""
        return 0 if self.complete and not self.failed_sources else 3

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete, "exit_code": self.exit_code}


def run_caption_job(
    job: CaptionJob,
    *,
    retry_failed: bool = False,
    progress_callback: Callable[[ProgressUpdate], None] | None = None,
    commit_interval_s: float = COMMIT_INTERVAL_S,
) -> RunSummary:
    """Run or resume `job` on the Ray cluster this process is connected to (`ray.init` first).
    Its "auto" compute settings are resolved against that cluster (`pipeline.cluster`) unless the
    caller has done so."""
    started = time.time()
    job = replace(job, compute=resolve_compute(job.compute, cluster_capacity()))
    model_path, model_id = resolve_model(job.model.path)
    progress = JobProgress(Folder(job.output.path, job.output.storage_options))
    inp = job.input
    run = _Run(progress, started, retry_failed)
    progress.check(job)  # a live run or other settings: refused before anything is written
    progress.claim(run.lease.record)  # from here on, this run is the folder's one writer
    run.lease.start()
    try:
        # Only now the job record and plan: a run that gave way in `claim` must not have replaced them.
        _, shards = progress.start(
            job, lambda: list_shards(inp.path, inp.format, inp.storage_options, inp.images_per_shard), model_id
        )
        run.shards_total = len(shards)
        manifests = progress.reconcile()  # the committed shards, rebuilt from the data files if need be
        run.done_before = _committed_shards(manifests)
        output = _OutputFormat(job, model_id, _source_types(job, shards, run.done_before))
        if retry_failed:
            tasks, targets = _retry_tasks(progress, manifests, shards)
            writer: _Writer = _RetryWriter(progress, job, output, run.lease, targets, manifests, shards)
        else:
            tasks = [ShardTask(s) for s in shards if s.uri not in run.done_before]
            writer = _WaveWriter(progress, job, output, run.lease, _wave_size(job, len(tasks)), commit_interval_s)
        if tasks:
            run.execute(_captioned_blocks(job, tasks, model_path, model_id), writer, len(tasks), progress_callback)
        _failpoint("before-finish")
        return run.finish(job, writer, bool(tasks))
    except BaseException as err:
        # What is committed stays committed; the record says why this run stopped, and frees the folder.
        how = "stopped" if isinstance(err, KeyboardInterrupt) else "failed"  # Ctrl-C, or SIGTERM (gitcap stop)
        run.lease.end(state=f"{how}: {root_cause(err)}")
        raise


class StorageUnavailableError(RuntimeError):
    """Shard after shard cannot be read: the input's storage is down, not one shard damaged."""


class _Run:
    """One run's loop on the driver: results in, shards assembled, waves committed, its record kept."""

    def __init__(self, progress: JobProgress, started: float, retry_failed: bool):
        self.progress, self.started, self.retry_failed = progress, started, retry_failed
        self.shards_total = 0  # known once the plan is read
        self.done_before: set[str] = set()  # shards committed before this run
        self.id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started)) + "-" + uuid.uuid4().hex[:6]
        self.lease = RunLease(progress, new_run_record(self.id, retry_failed))
        self.received: Counter = Counter()  # "images", "failed": image rows received (the live display)
        self.startup_images = 0  # received with the first result, before the speed's clock starts
        self.stage_seconds: dict[str, float] = {"read": 0.0, "decode": 0.0, "caption": 0.0}
        self.first_result: float | None = None
        self.storage_failed: dict[str, str] = {}
        self.storage_streak = 0  # shards in a row whose storage failed

    def execute(self, blocks: Iterator[pa.Table], writer: _Writer, shards_todo: int,
                progress_callback: Callable[[ProgressUpdate], None] | None) -> None:
        assembler = ShardAssembler()
        for block in blocks:
            self._count(block, assembler.take(block))
            for shard in assembler.complete():
                if shard.storage_error:  # not committed: the next run retries it
                    self.storage_failed[shard.uri] = shard.storage_error
                    self.storage_streak += 1
                    if self.storage_streak >= STORAGE_FAILURE_STREAK:
                        # Expired credentials or a storage outage: the rest of the job would only
                        # fail the same way, shard after shard, each after its retries.
                        raise StorageUnavailableError(
                            f"the storage of {self.storage_streak} shards in a row failed, each after retries "
                            f"(last: {shard.storage_error}): stopping until it works again"
                        )
                    continue
                self.storage_streak = 0
                writer.add(shard)
                if writer.due():
                    writer.flush()
                    self._save(writer)
            if progress_callback:
                progress_callback(ProgressUpdate(
                    shards_total=self.shards_total, shards_done=len(self.done_before) + writer.shards_committed,
                    shards_todo=shards_todo, images=self.received["images"], failed=self.received["failed"],
                    elapsed_s=time.time() - self.started, images_per_s=self.speed(self.received["images"]),
                ))
        writer.flush()

    def _count(self, block: pa.Table, new_rows: pa.Table) -> None:
        self.received.update(image_counts(new_rows))  # each image once, however often Ray delivered it
        if self.first_result is None:
            self.first_result, self.startup_images = time.time(), self.received["images"]
        self.stage_seconds["caption"] += float(pc.sum(block["caption_s"]).as_py() or 0)
        for marker in block["marker"].drop_null().to_pylist():
            marker = json.loads(marker)
            self.stage_seconds["read"] += marker.get("read_s", 0.0)
            self.stage_seconds["decode"] += marker.get("decode_s", 0.0)

    def _save(self, writer: _Writer) -> None:
        self.lease.update(**self._record_values(writer))

    def _record_values(self, writer: _Writer) -> dict[str, Any]:
        return dict(shards_committed=writer.shards_committed, images=writer.images_committed,
                    startup_s=self.startup(), images_per_s=self.speed(writer.images_committed))

    def speed(self, images: int) -> float | None:
        """Images/s since the first result arrived: start-up (Ray, model loading) is not in it."""
        elapsed = time.time() - self.first_result if self.first_result else 0
        return (images - self.startup_images) / elapsed if elapsed > 0.5 else None

    def startup(self) -> float | None:
        return self.first_result - self.started if self.first_result else None

    def finish(self, job: CaptionJob, writer: _Writer, worked: bool) -> RunSummary:
        manifests = self.progress.reconcile(repair=False)
        errors: Counter = Counter()
        for m in manifests.values():
            errors.update(m.get("errors", {}))
        summary = RunSummary(
            output=job.output.path,
            run_id=self.id,
            shards_total=self.shards_total,
            shards_done=len(_committed_shards(manifests)),
            shards_this_run=writer.shards_committed,
            images_ok=sum(m["ok"] for m in manifests.values()),
            images_failed=sum(m["failed"] for m in manifests.values()),
            images_this_run=writer.images_committed,
            errors=dict(errors),
            failed_sources=[f for m in manifests.values() for f in m.get("failed_sources", [])],
            elapsed_s=time.time() - self.started,
            startup_s=self.startup(),
            images_per_s=self.speed(writer.images_committed),
            retried=self.retry_failed,
            fingerprint=job.fingerprint(),
            stage_seconds={stage: round(seconds, 3) for stage, seconds in self.stage_seconds.items()},
            compute={**asdict(job.compute), "batch_size": job.compute.images_per_batch},
        )
        for uri, error in self.storage_failed.items():
            summary.failed_sources.append({"shard": uri, "error": f"storage_failed: {error} (not committed: rerun to retry)"})
        if not worked:
            summary.notes.append("no failed rows to retry" if self.retry_failed else "nothing to do: every shard is committed")
        else:
            self.progress.write_summary({**summary.to_dict(), "settings": job.decisive_settings()})
        self.lease.check()  # views are written from `manifests`: only while no other run can commit
        finish_dataset(self.progress.folder, job, manifests, summary.complete)  # views repaired, card
        if summary.complete and not self.progress.folder.exists(SUCCESS_FILE):
            self.progress.mark_complete({k: v for k, v in summary.to_dict().items() if k != "notes"})
        # Last: the claim on the folder ends. Finishing the views can take long (every data file is
        # read after a filter change); a run that started meanwhile would commit files the views
        # above do not know of.
        self.lease.end(**self._record_values(writer), state="finished", finished_at=time.time())
        return summary


def _committed_shards(manifests: dict[str, dict]) -> set[str]:
    return {shard for manifest in manifests.values() for shard in manifest["shards"]}


# --- the Ray Data part ------------------------------------------------------------------------


def _captioned_blocks(job: CaptionJob, tasks: list[ShardTask], model_path: str, model_id: str) -> Iterator[pa.Table]:
    """Stream the tasks through read+preprocess and the captioning actors; yield result blocks."""
    import ray.data

    compute = job.compute
    processor = GitImageProcessor.from_pretrained(model_path, storage_options=job.model.storage_options)
    height, width = processor.fixed_output_size()
    preprocess = PreprocessConfig(
        processor=processor.to_dict(),
        storage_options=job.input.storage_options,
        image_column=job.input.image_column,
        include_image=job.output.include_image,
        rows_per_batch=compute.images_per_batch,
    )
    captioner = CaptionerConfig(
        # The bundled model is found by each actor in the gitcap it runs (on a cluster, the copy
        # shipped with the job to its node), not at the path this driver sees.
        model_path=job.model.path,
        model_id=model_id,
        storage_options=job.model.storage_options,
        dtype=job.model.dtype,
        compile=job.model.compile,
        generate_kwargs=job.generation.generate_kwargs(),
        prompt=job.generation.prompt,
        seed=job.generation.seed,
        threads=None if compute.gpus_per_worker else math.ceil(compute.cpus_per_worker),
        images_per_batch=compute.images_per_batch,
    )
    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size, context.execution_options.resource_limits
    batch_bytes = compute.images_per_batch * height * width * 3
    # A block is about one captioning batch of crops: small blocks keep shards streaming.
    context.target_max_block_size = max(1 << 20, int(batch_bytes * 1.25))
    # Decoding outruns captioning: without a cap, Ray Data would read ahead until its object store
    # budget (a share of the machine's memory) is full, so memory would grow with the job. A few
    # dozen batches per captioning actor keep it fed and make memory independent of the job's size.
    limits = context.execution_options.resource_limits
    context.execution_options.resource_limits = limits.copy(
        object_store_memory=max(OBJECT_STORE_FLOOR, READ_AHEAD_BATCHES * batch_bytes * compute.workers)
    )
    try:
        items = [{"task": task.to_json()} for task in tasks]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        read_compute = (
            ray.data.TaskPoolStrategy(size=compute.preprocess_workers) if compute.preprocess_workers else None
        )
        # Half a CPU per read task: a shard is part decoding, part waiting on storage. Resources
        # unlike the captioner's also keep Ray Data from fusing this stage into the actors, where
        # decoding would stall the model instead of running beside it.
        ds = ds.map_batches(
            read_and_preprocess, batch_size=1, fn_kwargs={"config": preprocess}, compute=read_compute,
            num_cpus=PREPROCESS_CPUS,
        )
        ds = ds.map_batches(
            Captioner,
            fn_constructor_kwargs={"config": captioner},
            batch_size=compute.images_per_batch,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=compute.workers),
            num_cpus=compute.cpus_per_worker,
            num_gpus=compute.gpus_per_worker or None,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)
    finally:
        context.target_max_block_size, context.execution_options.resource_limits = saved


# --- shards back together on the driver -------------------------------------------------------


@dataclass
class CompletedShard:
    uri: str
    rows: pa.Table  # captioned rows of the shard, end marker removed
    storage_error: str | None = None


class ShardAssembler:
    """Collects result rows per shard; a shard is complete once its end marker and as many distinct
    `seq` numbers as the marker announced have arrived (duplicates from Ray retries are dropped).
    A shard is handed out once: Ray may execute a task again and deliver a completed shard's rows
    a second time, which would commit it twice (or, in part, sit here forever)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[pa.Table]] = defaultdict(list)
        self.seen: dict[str, set[int]] = defaultdict(set)
        self.expected: dict[str, int] = {}
        self.storage_errors: dict[str, str | None] = {}
        self.completed: set[str] = set()  # URIs only: cheap for any job
        self.schema: pa.Schema | None = None

    def add(self, block: pa.Table) -> list[CompletedShard]:
        """Take a block of rows in; returns the shards it completes."""
        self.take(block)
        return self.complete()

    def take(self, block: pa.Table) -> pa.Table:
        """Keep the block's new rows; returns them (repeated rows, end markers and rows of shards
        already handed out are not new)."""
        self.schema = self.schema or block.schema
        take: dict[str, list[int]] = defaultdict(list)
        markers = block["marker"].to_pylist()
        for i, (shard, seq) in enumerate(zip(block["shard"].to_pylist(), block["seq"].to_pylist())):
            if shard in self.completed:
                continue
            if seq < 0:
                marker = json.loads(markers[i])
                self.expected[shard] = marker["rows"]
                self.storage_errors[shard] = marker["storage_error"]
            elif seq not in self.seen[shard]:
                self.seen[shard].add(seq)
                take[shard].append(i)
        for shard, rows in take.items():
            self.parts[shard].append(block.take(pa.array(rows, pa.int64())))
        return pa.concat_tables([self.parts[s][-1] for s in take]) if take else block.schema.empty_table()

    def complete(self) -> list[CompletedShard]:
        """The shards whose rows have all come, handed out once."""
        return [self._pop(s) for s in sorted(s for s, rows in self.expected.items() if len(self.seen[s]) == rows)]

    def _pop(self, shard: str) -> CompletedShard:
        parts = self.parts.pop(shard, [])
        rows = pa.concat_tables(parts) if parts else self.schema.empty_table()
        del self.seen[shard], self.expected[shard]
        self.completed.add(shard)
        return CompletedShard(shard, rows.drop_columns(["marker"]), self.storage_errors.pop(shard))


def image_counts(rows: pa.Table) -> Counter:
    """{"images", "failed"} among result rows: not the end markers, nor the row that reports a
    damaged shard (a failed source, not an image: counted apart in the output too)."""
    images = [e for seq, e in zip(rows["seq"].to_pylist(), rows["error"].to_pylist())
              if seq >= 0 and not is_shard_failure(e)]
    return Counter(images=len(images), failed=sum(e is not None for e in images))


# --- committing -------------------------------------------------------------------------------


class _Writer:
    shards_committed = 0
    images_committed = 0  # image rows this run committed: the output's own count (ok + failed)

    def add(self, shard: CompletedShard) -> None: ...
    def due(self) -> bool: ...
    def flush(self) -> None: ...


class _WaveWriter(_Writer):
    """Commits finished shards, a wave at a time, each wave as one new data file."""

    def __init__(self, progress: JobProgress, job: CaptionJob, output: _OutputFormat, lease: RunLease,
                 wave_size: int, interval_s: float):
        self.progress, self.job, self.output, self.lease = progress, job, output, lease
        self.wave_size, self.interval_s = wave_size, interval_s
        self.ready: list[CompletedShard] = []
        self.last_commit = time.time()
        self.waves = 0

    def add(self, shard: CompletedShard) -> None:
        self.ready.append(shard)

    def due(self) -> bool:
        return len(self.ready) >= self.wave_size or (
            bool(self.ready) and time.time() - self.last_commit >= self.interval_s
        )

    def flush(self) -> None:
        if not self.ready:
            return
        wave, self.ready = self.ready, []
        table = self.output.table([s.rows for s in wave])
        info = {**file_summary(table, [s.uri for s in wave]), "run": self.lease.run_id,
                "fingerprint": self.job.fingerprint(), "committed_at": time.time()}
        name = f"part-{self.lease.run_id}-{self.waves:05d}.parquet"
        self.waves += 1
        _failpoint("before-data")
        self.lease.check()
        size = self.progress.sink.write(name, table, info)  # the commit
        _failpoint("after-data")
        self.progress.write_commit(name, {**info, "size": size})
        _failpoint("after-commit")
        publish_views(self.progress.folder, self.job.output, name, table, {**info, "size": size})
        self.shards_committed += len(wave)
        self.images_committed += info["ok"] + info["failed"]
        self.last_commit = time.time()


class _RetryWriter(_Writer):
    """--retry-failed: each retried shard's new rows replace its error rows, in the data file that
    holds the shard, which is republished whole under its own name. Rows are matched by their
    place in the shard (`seq`), never by key: keys need not be unique (a Parquet source's key
    column is not checked), and a key with a good row and a failed one is read again whole."""

    def __init__(self, progress: JobProgress, job: CaptionJob, output: _OutputFormat, lease: RunLease,
                 targets: dict[str, str], manifests: dict[str, dict], shards: list[Shard]):
        self.progress, self.job, self.output, self.lease = progress, job, output, lease
        self.targets, self.manifests = targets, manifests
        self.by_uri = {s.uri: s for s in shards}
        self.ready: dict[str, list[CompletedShard]] = defaultdict(list)

    def add(self, shard: CompletedShard) -> None:
        self.ready[self.targets[shard.uri]].append(shard)

    def due(self) -> bool:
        return False  # one rewrite per file, at the end

    def flush(self) -> None:
        sink = self.progress.sink
        for name, shards in self.ready.items():
            old = sink.read(name)
            places = _row_places(self.manifests[name]["shards"], old["source"].to_pylist(), self.by_uri)
            good = {place for place, error in zip(places, old["error"].to_pylist()) if error is None}
            rows = [_not_at(s.rows, good) for s in shards]  # a good row read again for its key's sake goes
            redone = {place for r in rows for place in zip(r["shard"].to_pylist(), r["seq"].to_pylist())}
            keep = [place not in redone for place in places]
            table = _merged(old.filter(pa.array(keep, pa.bool_())), self.output.table(rows))
            # Back in (shard, seq) order, as every data file is: a later retry finds rows by their place.
            order = [place for place, kept in zip(places, keep) if kept] + sorted(redone)
            table = table.take(sorted(range(len(order)), key=order.__getitem__)).replace_schema_metadata(None)
            info = {**file_summary(table, self.manifests[name]["shards"]), "run": self.lease.run_id,
                    "fingerprint": self.job.fingerprint(), "committed_at": time.time()}
            self.lease.check()
            size = sink.write(name, table, info)  # replaces the old file in one step
            self.progress.write_commit(name, {**info, "size": size})
            publish_views(self.progress.folder, self.job.output, name, table, {**info, "size": size})
            self.shards_committed += len(shards)
            self.images_committed += sum(image_counts(r)["images"] for r in rows)
        self.ready.clear()


def _retry_tasks(
    progress: JobProgress, manifests: dict[str, dict], shards: list[Shard]
) -> tuple[list[ShardTask], dict[str, str]]:
    """Tasks for every committed shard with error rows, and the data file holding each of those
    shards. A task skips the keys of the shard's good rows but not a key that has a failed row
    too: those records are read again, and `_RetryWriter` keeps only the rows that failed."""
    by_uri = {s.uri: s for s in shards}
    tasks, targets = [], {}
    for name, manifest in sorted(manifests.items()):
        if not manifest.get("sources_with_errors"):
            continue
        table = progress.sink.read(name, columns=["key", "source", "error"])
        keys: dict[str, tuple[set, set]] = defaultdict(lambda: (set(), set()))  # shard: (good keys, failed keys)
        owners = _source_to_shard(manifest["shards"], table["source"].to_pylist(), by_uri)
        for shard, key, error in zip(owners, table["key"].to_pylist(), table["error"].to_pylist()):
            keys[shard][error is not None].add(key)
        for uri, (good, failed) in sorted(keys.items()):
            if failed and uri in by_uri:
                tasks.append(ShardTask(by_uri[uri], frozenset(good - failed)))
                targets[uri] = name
    return tasks, targets


def _row_places(file_shards: list[str], sources: list[str], by_uri: dict[str, Shard]) -> list[tuple[str, int]]:
    """Each row's (shard, seq): a data file holds every record of its shards, one row each, in
    (shard, seq) order, so a row's place among its shard's rows is its seq."""
    seen: Counter = Counter()
    places = []
    for shard in _source_to_shard(file_shards, sources, by_uri):
        places.append((shard, seen[shard]))
        seen[shard] += 1
    return places


def _not_at(rows: pa.Table, places: set[tuple[str, int]]) -> pa.Table:
    """Result rows, less those at the given (shard, seq) places."""
    keep = [place not in places for place in zip(rows["shard"].to_pylist(), rows["seq"].to_pylist())]
    return rows.filter(pa.array(keep, pa.bool_()))


def _merged(old: pa.Table, new: pa.Table) -> pa.Table:
    """`old` then `new`, in the old file's types. A column typed otherwise in the new rows (a
    metadata column all null in one wave is text there, numbers in another) is cast to the old
    type where its values fit, else both sides become text: a retry never fails on types."""
    for name in set(old.column_names) & set(new.column_names):
        kept = old.schema.field(name).type
        if new.schema.field(name).type == kept:
            continue
        try:
            new = _with_column(new, name, new[name].cast(kept))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            old, new = _with_column(old, name, _as_text(old[name])), _with_column(new, name, _as_text(new[name]))
    return pa.concat_tables([old, new], promote_options="permissive")


def _with_column(table: pa.Table, name: str, values: pa.ChunkedArray | pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def _as_text(values: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """Values as text: Arrow's own cast where it has one, else JSON (lists, structs)."""
    try:
        return values.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return json_text(values.to_pylist())


def _source_to_shard(file_shards: list[str], sources: list[str], by_uri: dict[str, Shard]) -> list[str]:
    """The shard of each row: its source, or for image folders the shard that lists the file."""
    # A row's source is valid UTF-8 (sources.valid_utf8); the listing keeps the file's raw name.
    owner = {valid_utf8(f): uri for uri in file_shards if uri in by_uri for f in by_uri[uri].files}
    return [owner.get(s, s) for s in sources]


@dataclass(frozen=True)
class _OutputFormat:
    """How captioned rows become output rows: the job's settings, the model's id, and the source's
    own column types (see `sink.output_table`)."""

    job: CaptionJob
    model_id: str
    source_types: dict[str, pa.DataType]

    def table(self, parts: list[pa.Table]) -> pa.Table:
        job = self.job
        return output_table(pa.concat_tables(parts), self.model_id, job.generation.num_return_sequences > 1,
                            job.output.include_image, job.output.quality, self.source_types)


def _source_types(job: CaptionJob, shards: list[Shard], done: set[str]) -> dict[str, pa.DataType]:
    """A Parquet input's column types, from the first shard still to do (any will do: their schemas
    are the dataset's); none for WebDataset and image files, whose metadata is text."""
    todo = next((s for s in shards if s.uri not in done), None) if job.input.format == "parquet" else None
    if todo is None:
        return {}
    try:
        schema = parquet_schema(todo.uri, job.input.storage_options)
    except Exception:  # noqa: BLE001  (a damaged first file: the run records it; rows then type themselves)
        return {}
    return {f.name: f.type for f in schema}


def _wave_size(job: CaptionJob, shards: int) -> int:
    """Shards per commit: as set, else a few waves per worker, capped so that a kill loses little."""
    if job.compute.shards_per_wave:
        return job.compute.shards_per_wave
    return max(1, min(16, shards // (4 * job.compute.workers)))


def root_cause(err: BaseException) -> str:
    """One line for an error: Ray wraps a worker's exception (a model that fails to load, say)
    in a traceback, whose last line names the original; where Ray Data chains its own exception
    on (a batch function that raised), the original's line is the last before the chaining."""
    original = str(err).split("The above exception was the direct cause of the following exception:")[0]
    lines = [line.strip() for line in original.splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:500]


_failpoint_hits: Counter = Counter()


def _failpoint(name: str) -> None:
    """Crash here, as a power cut would, when the test environment asks for it."""
    spec = os.environ.get(FAILPOINT_ENV, "")
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _failpoint_hits[name] += 1
    if _failpoint_hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
