"""A captioning job: what to read, which model, how to generate, where to write, on what compute.

Plain dataclasses, validated on construction, built from nested dicts (a YAML job spec is one) with
errors that name the field (`generation.num_beams: expected an integer, got 'three'`). Nothing here
reads YAML or touches storage: `jobs/` parses specs, `pipeline/` runs them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from pipeline.quality import FLAG_CODES

INPUT_FORMATS = ("webdataset", "parquet", "images")


class JobConfigError(ValueError):
    """A job spec that cannot run; the message starts with the dotted name of the field at fault."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class InputConfig:
    path: str | list[str]
    format: str = "webdataset"
    storage_options: dict[str, Any] = field(default_factory=dict)
    image_column: str | None = None  # parquet: default auto-detects image/jpg/png/img
    images_per_shard: int = 1000  # images: files per unit of work

    def validate(self, name: str) -> None:
        if not self.path:
            raise JobConfigError(f"{name}.path", "is required")
        if self.format not in INPUT_FORMATS:
            raise JobConfigError(f"{name}.format", f"must be one of {', '.join(INPUT_FORMATS)}, got {self.format!r}")
        _positive(f"{name}.images_per_shard", self.images_per_shard)


@dataclass
class ModelConfig:
    path: str | None = None  # None: the bundled model
    storage_options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    compile: bool = False  # torch.compile on GPU workers: slower start, faster batches

    def validate(self, name: str) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise JobConfigError(f"{name}.dtype", f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 20
    num_beams: int = 1
    length_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_return_sequences: int = 1
    prompt: str | None = None  # conditional captioning / VQA: "[CLS] prompt" with no [SEP]
    seed: int = 0  # sampling: each image's noise comes from (seed, key), so reruns sample the same

    def validate(self, name: str) -> None:
        _positive(f"{name}.max_new_tokens", self.max_new_tokens)
        _positive(f"{name}.num_beams", self.num_beams)
        _positive(f"{name}.num_return_sequences", self.num_return_sequences)
        for number in ("temperature", "length_penalty"):
            _finite(f"{name}.{number}", getattr(self, number))
        if self.temperature <= 0:
            raise JobConfigError(f"{name}.temperature", f"must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise JobConfigError(f"{name}.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise JobConfigError(f"{name}.top_k", f"must be >= 0, got {self.top_k}")
        if self.do_sample and self.num_beams > 1:
            raise JobConfigError(f"{name}.num_beams", "beam search and sampling cannot be combined; pick one")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise JobConfigError(f"{name}.num_return_sequences", f"cannot exceed num_beams ({self.num_beams})")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise JobConfigError(
                f"{name}.num_return_sequences", "greedy decoding gives one caption: set do_sample or num_beams"
            )

    def decisive_settings(self) -> dict[str, Any]:
        """The settings that change which captions come out: sampling's only when sampling, the
        length penalty only with beams."""
        settings: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": self.do_sample,
            "num_return_sequences": self.num_return_sequences, "prompt": self.prompt,
        }
        if self.num_beams > 1:
            settings["length_penalty"] = self.length_penalty
        if self.do_sample:
            settings.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)
        return settings

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `GitForCausalLM.generate` (the prompt and seeds are per batch)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "length_penalty": self.length_penalty,
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "num_return_sequences": self.num_return_sequences,
        }


@dataclass
class QualityConfig:
    """The thresholds of the quality flags every output row gets (pipeline.quality)."""

    min_words: int = 3  # fewer words: too_short
    max_words: int = 40  # more words: too_long
    min_score: float | None = None  # a lower score (mean token log-prob): low_score; None: no such flag

    def validate(self, name: str) -> None:
        _positive(f"{name}.min_words", self.min_words)
        if self.min_score is not None:
            _finite(f"{name}.min_score", self.min_score)
            if self.min_score > 0:  # a mean log-probability is never above 0: every row would be flagged
                raise JobConfigError(f"{name}.min_score", f"is a mean token log-probability, at most 0; got {self.min_score}")
        if self.max_words < self.min_words:
            raise JobConfigError(
                f"{name}.max_words", f"must be at least min_words ({self.min_words}), got {self.max_words}"
            )


@dataclass
class FilterConfig:
    """Which rows the filtered view keeps: those without an error and without any of `drop_flags`."""

    drop_flags: list[str] = field(default_factory=lambda: list(FLAG_CODES))

    def validate(self, name: str) -> None:
        for code in self.drop_flags:
            if code not in FLAG_CODES:
                raise JobConfigError(f"{name}.drop_flags", f"unknown flag {code!r} (flags: {', '.join(FLAG_CODES)})")


@dataclass
class OutputConfig:
    path: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    include_image: bool = False  # the image bytes as a Hugging Face datasets {bytes, path} column
    quality: QualityConfig = field(default_factory=QualityConfig)
    filter: FilterConfig | None = None  # the filtered view (pipeline.views); None: no view
    webdataset: bool = False  # WebDataset tars of the ok rows (pipeline.views); needs include_image

    def validate(self, name: str) -> None:
        if not self.path:
            raise JobConfigError(f"{name}.path", "is required")
        self.quality.validate(f"{name}.quality")
        if self.filter is not None:
            self.filter.validate(f"{name}.filter")
        if self.webdataset and not self.include_image:
            # The tars are derived from the committed Parquet files alone (that is what makes them
            # exactly-once and repairable), so the image bytes must be in those files.
            raise JobConfigError(
                f"{name}.webdataset", "needs output.include_image: true (the tars are built from the output files)"
            )


GPU_BATCH_SIZE = 256
CPU_BATCH_SIZE = 32


@dataclass
class ComputeConfig:
    batch_size: int | None = None  # images per model call; None: see images_per_batch
    # None: auto (pipeline.cluster), decided on the driver against the cluster the job runs on:
    # one GPU per worker and one worker per GPU where the cluster has GPUs, else one CPU worker.
    workers: int | None = None  # captioning actors, each holding one model
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1
    preprocess_workers: int | None = None  # CPU decode/resize tasks in flight; None lets Ray decide
    shards_per_wave: int | None = None  # commit granularity; None: a few waves per worker

    def validate(self, name: str) -> None:
        if self.batch_size is not None:
            _positive(f"{name}.batch_size", self.batch_size)
        if self.workers is not None:
            _positive(f"{name}.workers", self.workers)
        if self.gpus_per_worker is not None:
            _finite(f"{name}.gpus_per_worker", self.gpus_per_worker)
        _finite(f"{name}.cpus_per_worker", self.cpus_per_worker)
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise JobConfigError(f"{name}.gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        if self.cpus_per_worker <= 0:
            raise JobConfigError(f"{name}.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        if self.preprocess_workers is not None:
            _positive(f"{name}.preprocess_workers", self.preprocess_workers)
        if self.shards_per_wave is not None:
            _positive(f"{name}.shards_per_wave", self.shards_per_wave)

    @property
    def images_per_batch(self) -> int:
        """`batch_size`, or the default for the workers' device: a GPU captions ~1.5x more images a
        second at batch 256 than at 64 (README, Performance); a CPU gains little past a few dozen."""
        if self.batch_size is not None:
            return self.batch_size
        if self.gpus_per_worker is None:
            raise ValueError("the batch size depends on the device: resolve compute first (pipeline.cluster)")
        return GPU_BATCH_SIZE if self.gpus_per_worker else CPU_BATCH_SIZE


@dataclass
class CaptionJob:
    input: InputConfig
    output: OutputConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CaptionJob:
        """Build from nested dicts; unknown keys and wrong types are errors naming the field."""
        return _build(cls, values, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def decisive_settings(self) -> dict[str, Any]:
        """What decides the output rows: input, model and generation settings, and the thresholds of
        the quality flags; only the settings that take effect (a greedy job's `temperature` does
        not, so changing it does not refuse a rerun). Not compute, not credentials, and not the
        views (output.filter, output.webdataset): those are rebuilt from the rows whenever they
        change. `model.dtype` counts as written: "auto" resumed on other hardware stays "auto"."""
        inp = {"path": self.input.path, "format": self.input.format, "image_column": self.input.image_column}
        if self.input.format == "images":  # how image files are grouped into shards
            inp["images_per_shard"] = self.input.images_per_shard
        return {
            "input": inp,
            "model": {"path": self.model.path, "dtype": self.model.dtype},
            "generation": self.generation.decisive_settings(),
            "output": {"include_image": self.output.include_image, "quality": dataclasses.asdict(self.output.quality)},
        }

    def fingerprint(self) -> str:
        """A hash of `decisive_settings`: a resumed job must have the same as the progress it resumes."""
        return hashlib.sha256(json.dumps(self.decisive_settings(), sort_keys=True).encode()).hexdigest()[:16]


def _build(cls: type, values: Any, prefix: str):
    if not isinstance(values, dict):
        raise JobConfigError(prefix.rstrip(".") or "job", f"expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((str(key) for key in set(values) - set(fields)))  # YAML keys may be numbers
    if unknown:
        raise JobConfigError(
            f"{prefix}{unknown[0]}", f"unknown key (known keys here: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _convert(hints[name], value, f"{prefix}{name}")
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise JobConfigError(f"{prefix}{missing[0]}", "is required")
    return cls(**kwargs)


def _convert(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{name}.")
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise JobConfigError(name, "must not be empty")
    for option in options:
        if dataclasses.is_dataclass(option):  # an optional section, such as output.filter
            return _build(option, value, f"{name}.")
        if _matches(option, value):
            return float(value) if option is float else value
    expected = " or ".join(_type_name(o) for o in options if o is not type(None))
    raise JobConfigError(name, f"expected {expected}, got {value!r}")


def _matches(option: Any, value: Any) -> bool:
    origin = typing.get_origin(option)
    if origin is list:
        (item,) = typing.get_args(option)
        return isinstance(value, list) and all(_matches(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if option is bool:
        return isinstance(value, bool)
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if option is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, option)


def _type_name(option: Any) -> str:
    origin = typing.get_origin(option)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(option)[0])}"
    if origin is dict:
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(option, str(option))


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise JobConfigError(name, f"must be a finite number, got {value}")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise JobConfigError(name, f"must be at least 1, got {value}")
