"""Step 3 of the data path: the captioning actor. One GIT model per actor, loaded once.

Ray Data calls it with batches of preprocessed rows (`pipeline.stages.ROW_SCHEMA`). Rows that carry
an error, and the shards' end markers, pass straight through; the others are normalised on the
actor's device (the uint8 crops cross to it, floats are made there), captioned, and decoded to
text. Sampling is reproducible across batches, actors and resumed runs: each image's noise comes
from a seed derived from (generation.seed, key), never from its position in a batch.

A batch the model cannot run (out of memory, say) is split in halves and retried; an image that
fails alone becomes an error row (`caption_failed`), and the job goes on. After running out of
memory the actor captions later batches in pieces of the size that fitted. But when every image of
a batch fails, alone as well as together, the model or the device is broken, not the images (they
are decoded crops of the right size by now): the actor raises `CaptioningError` and the run stops,
keeping what it committed, instead of writing an error row for every image of the collection.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.metrics import CaptionMetrics


@dataclass(frozen=True)
class CaptionerConfig:
    model_path: str | None  # None: the bundled model, found by each actor in its own install
    model_id: str = ""  # the `model` column's value; tags the worker metrics
    storage_options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    compile: bool = False
    generate_kwargs: dict[str, Any] = field(default_factory=dict)  # GenerationConfig.generate_kwargs()
    prompt: str | None = None
    seed: int = 0
    threads: int | None = None  # torch intra-op threads on CPU; None leaves torch's default
    images_per_batch: int = 32  # the most images a call brings (compute.images_per_batch)


# On a GPU each new batch size costs a CUDA graph capture of every decode step (and, compiled, a
# recompile), and batches come in many sizes: Ray Data cuts a partial batch at the end of each bundle
# of blocks. So a GPU captions batches padded up to a multiple of this many images: a job sees at
# most images_per_batch / GPU_PAD_MULTIPLE sizes, and their graphs are all kept.
GPU_PAD_MULTIPLE = 64


class CaptioningError(RuntimeError):
    """The model failed on every image of a batch: a broken model or device, not bad images."""


def image_seed(seed: int, key: str) -> int:
    """A 62-bit seed for one image, from the job's seed and the image's key alone."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class Captioner:
    """A callable class for `Dataset.map_batches(..., compute=ActorPoolStrategy(...))`."""

    def __init__(self, config: CaptionerConfig):
        from gitmodel import GitForCausalLM, GitProcessor

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu" and config.threads:
            torch.set_num_threads(config.threads)
        model_path, _ = resolve_model(config.model_path)
        dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
        self.pad_to_multiple = GPU_PAD_MULTIPLE if self.device.type == "cuda" else None
        sizes = -(-config.images_per_batch // GPU_PAD_MULTIPLE) + 1  # the multiples, and a last odd size
        self.model = GitForCausalLM.from_pretrained(
            model_path, dtype=dtype, device=self.device, storage_options=config.storage_options
        ).prepare_for_inference(cuda_graphs=self.device.type == "cuda", compile=config.compile, graph_shapes=sizes)
        self.processor = GitProcessor.from_pretrained(model_path, storage_options=config.storage_options)
        # Refused here, once, rather than by every batch's generate (a model failing on every image).
        do_sample = config.generate_kwargs.get("do_sample", self.model.generation_config.do_sample)
        self.model.generation_config.check_supported(do_sample)
        self.dtype = dtype
        self.prompt, self.seed = config.prompt, config.seed
        self.generate_kwargs = config.generate_kwargs
        self.num_return_sequences = int(config.generate_kwargs.get("num_return_sequences", 1))
        # Beam search returns each image's sequences ranked; samples come unordered.
        self.ranked = (config.generate_kwargs.get("num_beams") or self.model.generation_config.num_beams) > 1
        eos = config.generate_kwargs.get("eos_token_id", self.model.generation_config.eos_token_id)
        self.eos_ids = torch.as_tensor(eos, dtype=torch.long, device=self.device).reshape(-1)
        self.crop_shape = (*self.processor.image_processor.fixed_output_size(), 3)
        self.metrics = CaptionMetrics(config.model_id or model_path)
        self.tokens_generated = 0  # by `caption`, since the last batch
        # After running out of memory, the most images this device has been seen to caption at once:
        # later batches go in pieces of that size instead of failing first every time.
        self.images_that_fit: int | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        todo = pc.and_(pc.is_valid(batch["pixels"]), pc.is_null(batch["error"])).to_numpy(zero_copy_only=False)
        n = batch.num_rows
        captions: list[list[str] | None] = [None] * n
        scores: list[list[float] | None] = [None] * n
        errors = batch["error"].to_pylist()
        rows = np.flatnonzero(todo)
        started, self.tokens_generated = time.perf_counter(), 0
        if len(rows):
            keys = batch["key"].take(pa.array(rows)).to_pylist()
            crops = stacked_crops(batch["pixels"], rows, self.crop_shape)
            piece = self.images_that_fit or len(rows)
            results = [result for start in range(0, len(rows), piece)
                       for result in self._caption_or_split(crops[start : start + piece], keys[start : start + piece])]
            if all(error for _, _, error in results):
                raise CaptioningError(
                    f"the model failed on each of the {len(rows)} images of a batch, together and one by one "
                    f"({results[0][2]}): stopping rather than writing an error row for every image"
                )
            for i, (texts, values, error) in zip(rows, results):
                captions[i], scores[i], errors[i] = texts, values, error or errors[i]
        seconds = time.perf_counter() - started
        images = [e for e, seq in zip(errors, batch["seq"].to_pylist()) if seq >= 0]  # end markers are not images
        self.metrics.record_batch(len(rows), self.tokens_generated, seconds, images)
        # Each captioned row carries its share of the batch's time: the driver sums them per stage.
        share = seconds / len(rows) if len(rows) else 0.0
        caption_s = np.zeros(n, dtype=np.float32)
        caption_s[rows] = share
        return self._output(batch, captions, scores, errors).append_column("caption_s", pa.array(caption_s))

    def _caption_or_split(self, crops: np.ndarray, keys: list[str]) -> list[tuple[Any, Any, str | None]]:
        """[(captions best first, their scores, error)] per image; halves a batch that fails."""
        try:
            return [(c, s, None) for c, s in zip(*self.caption(crops, keys))]
        except Exception as err:  # noqa: BLE001  (OOM, a kernel error: retry smaller, then give up per image)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(keys) == 1:
                return [(None, None, f"caption_failed: {type(err).__name__}: {err}")]
            half = len(keys) // 2
            # torch.cuda's name: torch.OutOfMemoryError, the same class, is new in torch 2.5.
            if isinstance(err, torch.cuda.OutOfMemoryError):  # the larger half is the most that may fit
                self.images_that_fit = min(len(keys) - half, self.images_that_fit or len(keys))
            return self._caption_or_split(crops[:half], keys[:half]) + self._caption_or_split(crops[half:], keys[half:])

    @torch.inference_mode()
    def caption(self, crops: np.ndarray, keys: list[str]) -> tuple[list[list[str]], list[list[float]]]:
        """Captions for uint8 crops (B, H, W, 3): per image, `num_return_sequences` texts best first, with
        their scores (mean token log-probs). Best is generate's ranking for beam search (summed log-prob
        over length ** length_penalty, as transformers ranks beams), so there the scores need not descend;
        samples have no ranking and go by score."""
        n = len(keys)
        padded = self._padded_size(n)
        if padded > n:  # copies of the last image, whose captions are dropped below
            crops = np.concatenate([crops, np.repeat(crops[-1:], padded - n, axis=0)])
            keys = keys + keys[-1:] * (padded - n)
        pixel_values = self.processor.image_processor.normalize(crops, device=self.device, dtype=self.dtype)
        input_ids, attention_mask = self.processor.prompt_inputs(self.prompt, len(keys))
        seeds = torch.tensor([image_seed(self.seed, key) for key in keys], dtype=torch.long)
        out = self.model.generate(
            pixel_values, input_ids.to(self.device), attention_mask.to(self.device),
            seed=seeds.to(self.device), return_dict=True, **self.generate_kwargs,
        )
        sequences = out.sequences[: n * self.num_return_sequences]
        self.tokens_generated += generated_tokens(sequences[:, input_ids.shape[1]:], self.eos_ids)
        texts = [t.strip() for t in self.processor.answers(sequences.cpu(), input_ids)]
        values = out.scores[: len(sequences)].float().cpu().numpy().reshape(n, self.num_return_sequences)
        ranking = np.tile(np.arange(self.num_return_sequences), (n, 1))
        order = ranking if self.ranked else np.argsort(-values, axis=1, kind="stable")
        texts_by_image = np.array(texts, dtype=object).reshape(n, self.num_return_sequences)
        return (
            [list(texts_by_image[i, order[i]]) for i in range(n)],
            [[float(v) for v in values[i, order[i]]] for i in range(n)],
        )

    def _padded_size(self, n: int) -> int:
        """`n` rounded up to the padding multiple, never past what fitted in memory (`n` at least)."""
        if not self.pad_to_multiple:
            return n
        padded = -(-n // self.pad_to_multiple) * self.pad_to_multiple
        return max(n, min(padded, self.images_that_fit or padded))

    def _output(self, batch: pa.Table, captions: list, scores: list, errors: list) -> pa.Table:
        table = batch.drop_columns(["pixels", "error"]).append_column("error", pa.array(errors, pa.string()))
        best = [c[0] if c else None for c in captions]
        table = table.append_column("caption", pa.array(best, pa.string()))
        table = table.append_column("score", pa.array([s[0] if s else None for s in scores], pa.float32()))
        if self.num_return_sequences > 1:
            table = table.append_column("captions", pa.array(captions, pa.list_(pa.string())))
            table = table.append_column("scores", pa.array(scores, pa.list_(pa.float32())))
        return table


def generated_tokens(new_tokens: torch.Tensor, eos_ids: torch.Tensor) -> int:
    """Tokens generated, each row counted up to and including its first EOS. What follows is filler,
    not generated: pad after a greedy or sampled row's EOS, EOS again after a beam's (transformers
    fills beams with pad, or EOS when pad is 0)."""
    is_eos = torch.isin(new_tokens, eos_ids)
    lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, new_tokens.shape[1])
    return int(lengths.sum())


def stacked_crops(pixels: pa.ChunkedArray, rows: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The crops of `rows` as one uint8 array (n, H, W, 3), read straight from Arrow's data buffer.

    Per-row Python bytes objects cost ~12 ms for 256 crops of 224x224 (on this project's CPU), a
    quarter of the batch's time on a fast GPU; one buffer view costs nothing when every row is
    captioned, one copy otherwise.
    """
    column = pixels if len(rows) == len(pixels) else pixels.take(pa.array(rows))
    column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()  # one chunk: no copy
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int64 if pa.types.is_large_binary(column.type) else np.int32)
    offsets = offsets[column.offset : column.offset + len(column) + 1]
    crop_bytes = int(np.prod(shape))
    if not (np.diff(offsets) == crop_bytes).all():
        sizes = sorted(set(np.diff(offsets).tolist()) - {crop_bytes})
        raise ValueError(f"crops of {sizes[0]} bytes where the model's preprocessing makes {crop_bytes} ({shape})")
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(len(column), *shape)


BUNDLED_MODEL_ID = "gitcap/bundled"


def resolve_model(path: str | None) -> tuple[str, str]:
    """(where to load the model from, the id written in the `model` column). No path: the model
    bundled with gitcap, when this install has one."""
    if path:
        return path, path
    import gitmodel

    try:
        bundled = gitmodel.bundled_model_path()
    except (AttributeError, FileNotFoundError):
        bundled = None
    if bundled is None or not os.path.exists(os.path.join(str(bundled), "config.json")):
        raise FileNotFoundError(
            "model.path: not set, and this install has no bundled model (gitmodel/bundled/ is missing); "
            "set model.path to a GIT checkpoint folder or URL"
        )
    return str(bundled), BUNDLED_MODEL_ID
