"""Job specs: a YAML file, `--set a.b=value` overrides, and the checks that run before any model loads.

    input:      {path, format, storage_options, image_column, images_per_shard}
    model:      {path (default: the bundled model), storage_options, dtype, compile}
    generation: {max_new_tokens: 20, num_beams: 1, do_sample: false, num_return_sequences: 1,
                 prompt: null, seed: 0, temperature, top_k, top_p, length_penalty}
    output:     {path, storage_options, include_image: false, webdataset: false,
                 quality: {min_words: 3, max_words: 40, min_score: null},
                 filter: null (or {drop_flags: [...]}, which makes the filtered view)}
    compute:    {batch_size: null (256 on GPU workers, else 32), workers: null, gpus_per_worker: null
                 (null: auto, one worker per GPU where the cluster has GPUs, else one CPU worker),
                 cpus_per_worker: 1, preprocess_workers, shards_per_wave}

Override values are YAML, so `--set generation.num_beams=3` is an integer and
`--set generation.prompt=null` clears the prompt. Every failure is one `JobConfigError` whose
message starts with the field at fault: a wrong type or unknown key (from `CaptionJob.from_dict`),
an input that lists nothing or cannot be read, an output location that refuses a write, a model
path with no checkpoint.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.job import CaptionJob, GenerationConfig, InputConfig, JobConfigError
from pipeline.storage import storage_error_cause

if TYPE_CHECKING:
    from gitmodel.config import GitConfig
    from gitmodel.hub import CheckpointFolder


def load_spec(path: str, overrides: list[str] | tuple[str, ...] = ()) -> CaptionJob:
    """Read a YAML job spec, apply `KEY=VALUE` overrides, and validate it."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except OSError as err:
        raise JobConfigError("job", f"cannot read the job spec {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise JobConfigError("job", f"{path} is not valid YAML: {err}") from None
    return spec_from_dict(values if values is not None else {}, overrides, source=path)


def spec_from_dict(values: Any, overrides: list[str] | tuple[str, ...] = (), source: str = "job") -> CaptionJob:
    if not isinstance(values, dict):
        raise JobConfigError("job", f"{source}: expected a mapping of sections (input, output, ...), got {type(values).__name__}")
    for override in overrides:
        apply_override(values, override)
    return CaptionJob.from_dict(values)


def apply_override(values: dict[str, Any], override: str) -> None:
    """`generation.num_beams=3` sets values["generation"]["num_beams"] = 3 (the value is YAML)."""
    name, sep, raw = override.partition("=")
    name = name.strip()
    if not sep or not name or any(not part for part in name.split(".")):
        raise JobConfigError(override or "--set", "expected KEY=VALUE with a dotted key, e.g. generation.num_beams=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise JobConfigError(name, f"the value {raw!r} is not valid YAML: {err}") from None
    *parents, leaf = name.split(".")
    node = values
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise JobConfigError(".".join(parents[: depth + 1]), f"is {child!r}, not a section, so {name} cannot be set")
        node = child
    node[leaf] = value


@dataclass
class PreflightReport:
    shards: int
    model_path: str
    model_id: str


def preflight(job: CaptionJob) -> PreflightReport:
    """Check, before any cluster starts or model loads, that the job can run: the input lists and
    its first object reads, the output location accepts a write and a delete (and holds no
    progress of a job with other settings), the model resolves."""
    from pipeline.progress import JobProgress
    from pipeline.listing import list_shards
    from pipeline.sources import SourceError

    try:
        shards = list_shards(job.input.path, job.input.format, job.input.storage_options, job.input.images_per_shard)
    except SourceError as err:
        raise JobConfigError("input.path", str(err)) from None
    _read_first_bytes(shards[0], job.input.storage_options)
    if job.input.format == "parquet":
        _check_image_column(shards[0].uri, job.input)
    folder = _check_output(job.output.path, job.output.storage_options)
    JobProgress(folder).check(job)  # a rerun with other settings is refused here, not after Ray starts
    model_path, model_id = _check_model(job)
    return PreflightReport(shards=len(shards), model_path=model_path, model_id=model_id)


def _read_first_bytes(shard, storage_options: dict[str, Any]) -> None:
    from fsspec.core import url_to_fs

    url = shard.files[0] if shard.files else shard.uri
    try:
        fs, path = url_to_fs(url, **storage_options)
        with fs.open(path, "rb") as f:
            f.read(1)
    except Exception as err:  # noqa: BLE001  (each storage raises its own)
        raise JobConfigError("input.path", f"cannot read {url}: {storage_error_cause(err)}") from None


def _check_image_column(url: str, spec: InputConfig) -> None:
    """Find the first file's image column as the reader will: with a wrong `image_column`, every
    file would become a failed source, and a rerun with the name fixed would be refused (the name is
    part of the job's fingerprint)."""
    from pipeline.sources import image_column, parquet_schema

    try:
        schema = parquet_schema(url, spec.storage_options)
    except Exception:  # noqa: BLE001  (it read a moment ago: so a damaged file, the run's to record as failed)
        return
    try:
        image_column(schema, spec.image_column)
    except ValueError as err:
        raise JobConfigError("input.image_column", f"{url} has {err}") from None


def _check_output(url: str, storage_options: dict[str, Any]):
    from pipeline.storage import Folder

    probe = f".gitcap/preflight-{uuid.uuid4().hex[:8]}"
    try:
        folder = Folder(url, storage_options)
        folder.write_bytes(probe, b"gitcap preflight\n")
        folder.delete(probe)
    except Exception as err:  # noqa: BLE001
        raise JobConfigError("output.path", f"cannot write to {url}: {storage_error_cause(err)}") from None
    return folder


def _check_model(job: CaptionJob) -> tuple[str, str]:
    from gitmodel.hub import CheckpointFolder
    from pipeline.captioner import resolve_model

    try:
        path, model_id = resolve_model(job.model.path)
    except FileNotFoundError as err:
        raise JobConfigError("model.path", str(err).removeprefix("model.path: ")) from None
    try:
        folder = CheckpointFolder(path, job.model.storage_options)
        missing = [name for name in ("config.json",) if not folder.exists(name)]
        if not (folder.exists("preprocessor_config.json") or folder.exists("processor_config.json")):
            missing.append("preprocessor_config.json")
    except Exception as err:  # noqa: BLE001
        raise JobConfigError("model.path", f"cannot open {path}: {storage_error_cause(err)}") from None
    if missing:
        raise JobConfigError("model.path", f"{path} is not a GIT checkpoint folder (no {' or '.join(missing)})")
    positions = _read_config(folder).max_position_embeddings
    _check_text_positions(job.generation, _prompt_length(folder, job.generation.prompt), positions, path)
    _check_generation_config(folder, job.generation.do_sample)
    return path, model_id


def _check_generation_config(folder: CheckpointFolder, do_sample: bool) -> None:
    """generation_config.json may set what transformers applies and gitmodel does not implement
    (bad_words_ids, ...): every worker would refuse it at start, so refuse it here."""
    from gitmodel.config import GenerationConfig

    if not folder.exists("generation_config.json"):
        return
    try:
        GenerationConfig.from_dict(folder.read_json("generation_config.json")).check_supported(do_sample)
    except (AttributeError, TypeError, ValueError) as err:
        raise JobConfigError("model.path", f"{folder.path}/generation_config.json: {err}") from None


def _read_config(folder: CheckpointFolder) -> GitConfig:
    """config.json as the captioning workers will read it, or a model.path error."""
    from gitmodel.config import GitConfig

    try:
        values = folder.read_json("config.json")
    except ValueError as err:  # not JSON; it names the file
        raise JobConfigError("model.path", str(err)) from None
    except Exception as err:  # noqa: BLE001  (the storage failed)
        cause = storage_error_cause(err)
        raise JobConfigError("model.path", f"cannot read {folder.path}/config.json: {cause}") from None
    if not isinstance(values, dict):
        kind = type(values).__name__
        raise JobConfigError("model.path", f"{folder.path}/config.json holds a {kind}, not a GIT config object")
    try:
        return GitConfig.from_dict(values)
    except (AttributeError, TypeError, ValueError) as err:  # fields of the wrong type or value
        raise JobConfigError("model.path", f"{folder.path}/config.json is not a GIT config: {err}") from None


def _prompt_length(folder: CheckpointFolder, prompt: str | None) -> int:
    """Tokens of the prompt that generation starts from: [CLS], then the prompt's, with no [SEP]."""
    if prompt is None:
        return 1
    from gitmodel.processing import GitProcessor

    try:
        processor = GitProcessor.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001  (missing or malformed files, or the storage failed)
        cause = storage_error_cause(err)
        raise JobConfigError("model.path", f"cannot load the tokenizer of {folder.path}: {cause}") from None
    input_ids, _ = processor.prompt_inputs(prompt, batch_size=1)  # as the captioning workers build it
    return input_ids.shape[1]


def _check_text_positions(generation: GenerationConfig, prompt_length: int, positions: int, path: str) -> None:
    """Each of the prompt's tokens and all but the last new one take a text position of the model."""
    if prompt_length + generation.max_new_tokens - 1 <= positions:
        return
    if generation.prompt is None:
        raise JobConfigError(
            "generation.max_new_tokens",
            f"{generation.max_new_tokens} is more than {path} can generate: it has {positions} text positions",
        )
    if prompt_length > positions:
        raise JobConfigError(
            "generation.prompt", f"{prompt_length} tokens with [CLS], more than the {positions} text positions "
            f"of {path}: shorten it"
        )
    raise JobConfigError(
        "generation.max_new_tokens",
        f"{generation.max_new_tokens} is more than {path} can generate after generation.prompt, {prompt_length} "
        f"tokens with [CLS]: it has {positions} text positions, so at most {positions - prompt_length + 1} new "
        "tokens follow this prompt; lower it or shorten the prompt",
    )
