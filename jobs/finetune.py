"""Fine-tuning GIT on image–caption pairs read from the pipeline's input formats, and the recipe of
the bundled scene captioner.

Pairs come from the same sources a captioning job reads (`pipeline.listing`, `pipeline.sources`), with
the caption:
- "webdataset": the sample's `.txt` member (else the `caption` field of its `.json`);
- "parquet": the `caption` (else `text`) column;
- "images": the `KEY.txt` file beside each image `KEY.jpg`.
`caption_field` names another member extension, column or sidecar extension. Samples whose image
does not decode, or that have no caption, are skipped and counted.

The held-out set is `eval_input`, or else a fixed fraction of the training input chosen by a hash
of each sample's key (the same samples every run). Training itself is `gitmodel.training`; a run
that resumes from a checkpoint takes the processor (tokenizer) saved in it, never a new one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import posixpath
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs

from gitmodel import GitConfig, GitForCausalLM, GitImageProcessor, GitProcessor, GitTokenizer, GitVisionConfig
from gitmodel.tokenization import SPECIAL_TOKENS, bert_wordpiece
from gitmodel.training import CaptionDataset, TrainingArguments, evaluate, fresh_model, latest_checkpoint, train
from pipeline.decode import ImageDecodeError, decode_image
from pipeline.listing import list_shards
from pipeline.sources import Record, read_shard

CAPTION_FIELDS = {"webdataset": ("txt",), "parquet": ("caption", "text"), "images": ("txt",)}


@dataclass
class Pair:
    """One training sample, its image still encoded (decoded when the dataset is built)."""

    key: str
    image: bytes
    caption: str


@dataclass
class PairStats:
    """What reading the input found: pairs kept, and samples skipped by reason."""

    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{self.pairs} pairs" + (f", skipped {skipped}" if skipped else "")


# --- reading pairs -----------------------------------------------------------------------------


def read_pairs(
    path: str | list[str],
    format: str,
    caption_field: str | None = None,
    image_column: str | None = None,
    storage_options: dict[str, Any] | None = None,
    stats: PairStats | None = None,
) -> Iterator[Pair]:
    """Every (image bytes, caption) sample under `path`, in shard order."""
    stats = stats if stats is not None else PairStats()
    options = storage_options or {}
    for shard in list_shards(path, format, options):
        for record in read_shard(shard, options, image_column=image_column):
            if record.error:
                stats.skipped[record.error.split(":", 1)[0]] += 1
                continue
            caption = caption_of(record, format, caption_field, options)
            if not caption:
                stats.skipped["no_caption"] += 1
                continue
            stats.pairs += 1
            yield Pair(record.key, record.data, caption)


def caption_of(record: Record, format: str, caption_field: str | None, options: dict[str, Any]) -> str | None:
    """The record's caption (see the module docstring for where it is looked for), stripped."""
    fields = (caption_field,) if caption_field else CAPTION_FIELDS[format]
    if format == "images":
        return _sidecar_text(record.source, fields[0], options)
    for name in fields:
        value = record.metadata.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    described = record.metadata.get("json")
    if format == "webdataset" and not caption_field and isinstance(described, dict):
        value = described.get("caption")
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _sidecar_text(image_url: str, extension: str, options: dict[str, Any]) -> str | None:
    """`folder/KEY.txt` for the image `folder/KEY.jpg` (the key ends at the first dot, as in WebDataset)."""
    folder, base = posixpath.split(image_url)
    url = posixpath.join(folder, f"{base.split('.', 1)[0]}.{extension}")
    fs, path = url_to_fs(url, **options)
    try:
        return fs.cat_file(path).decode("utf-8", "replace").strip() or None
    except FileNotFoundError:
        return None


def held_out(key: str, fraction: float) -> bool:
    """Whether `key` belongs to the held-out split: a fixed function of the key alone."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return digest < fraction * 2**64


def caption_dataset(processor: GitProcessor, pairs: list[Pair], max_length: int, stats: PairStats) -> CaptionDataset:
    """Decode the pairs' images (skipping, and counting, those that fail) and build the dataset."""

    def decoded() -> Iterator[tuple[Any, str]]:
        for pair in pairs:
            try:
                image = decode_image(pair.image).image
            except ImageDecodeError as err:
                stats.skipped[err.reason] += 1
                stats.pairs -= 1
                continue
            yield image, pair.caption

    return CaptionDataset.build(processor, decoded(), max_length=max_length)


# --- the model to start from -------------------------------------------------------------------


def starting_point(
    model: str | None = None,
    config: str | GitConfig | None = None,
    processor: str | GitProcessor | None = None,
    captions: list[str] | None = None,
    vocab_size: int = 1000,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> tuple[GitForCausalLM, GitProcessor]:
    """A checkpoint to fine-tune (`model`, default: the bundled one), or a fresh model of `config`.

    A fresh model takes `processor`, or else a CLIP image processor at the config's image size and a
    WordPiece tokenizer of `vocab_size` trained on `captions`; the config's vocabulary size and
    special token ids are then set from that tokenizer.
    """
    if model is not None and config is not None:
        raise ValueError("give a starting checkpoint (model) or a config for a fresh model, not both")
    if isinstance(processor, str):
        processor = GitProcessor.from_pretrained(processor, storage_options)
    if config is None:
        from gitmodel import bundled_model_path

        model = str(model or bundled_model_path())
        loaded = GitForCausalLM.from_pretrained(model, storage_options=storage_options)
        processor = processor or GitProcessor.from_pretrained(model, storage_options)
        if len(processor.tokenizer) > loaded.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(processor.tokenizer)} tokens but {model} only {loaded.config.vocab_size}"
            )
        _check_image_size(processor, loaded.config)
        return loaded, processor

    if isinstance(config, str):
        config = _read_config(config) if config.endswith(".json") else GitConfig.from_pretrained(config, storage_options)
    config = copy.deepcopy(config)  # its vocabulary and special ids are set below
    if processor is None:
        if not captions:
            raise ValueError("a fresh model without a processor needs captions to train its tokenizer on")
        size = config.vision_config.image_size
        tokenizer = train_tokenizer(captions, vocab_size)
        processor = GitProcessor(GitImageProcessor(size={"shortest_edge": size}, crop_size=size), tokenizer)
    tokenizer = processor.tokenizer
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
    )
    _check_image_size(processor, config)
    return fresh_model(config, seed), processor


def train_tokenizer(captions: list[str], vocab_size: int) -> GitTokenizer:
    """A BERT-style WordPiece tokenizer trained on `captions`, with ids in a fixed order: the special
    tokens ([PAD]=0, [UNK], [CLS], [SEP], [MASK]), then the other tokens sorted.

    The trainer breaks ties between equally frequent pairs differently from run to run, which changes
    the ids it hands out and the intermediate pieces it passes through on the way to whole words
    (`righ`, `##ght`). When every caption word ended up whole, those pieces are never used and are
    dropped, which leaves the characters and the words: then the tokenizer is a pure function of the
    captions (as for the bundled model). Otherwise the trained pieces are all kept, in sorted order.
    """
    trained = GitTokenizer.train_wordpiece(captions, vocab_size=vocab_size)
    backend = trained.backend_tokenizer
    learned = set(backend.get_vocab(with_added_tokens=False))
    words = {
        word
        for caption in captions
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption))
    }
    if words <= learned:
        learned = words | {token for token in learned if len(token.removeprefix("##")) == 1}
    specials = list(SPECIAL_TOKENS.values())
    vocab = {token: i for i, token in enumerate(specials + sorted(learned - set(specials)))}
    return GitTokenizer(bert_wordpiece(vocab), model_max_length=trained.model_max_length)


def _read_config(path: str) -> GitConfig:
    with open(path, encoding="utf-8") as f:
        return GitConfig.from_dict(json.load(f))


def _check_image_size(processor: GitProcessor, config: GitConfig) -> None:
    size = processor.image_processor.output_size
    expected = config.vision_config.image_size
    if size != (expected, expected):
        raise ValueError(f"the image processor makes {size} crops but the model takes {expected}x{expected} images")


# --- fine-tuning -------------------------------------------------------------------------------


def finetune(
    train_input: str | list[str],
    args: TrainingArguments,
    *,
    format: str = "webdataset",
    eval_input: str | list[str] | None = None,
    eval_fraction: float = 0.05,
    max_eval: int = 500,
    model: str | None = None,
    config: str | GitConfig | None = None,
    processor: str | GitProcessor | None = None,
    vocab_size: int = 1000,
    caption_field: str | None = None,
    image_column: str | None = None,
    storage_options: dict[str, Any] | None = None,
    log=print,
) -> dict[str, Any]:
    """Read pairs, split off the held-out set, pick the starting model, train; return the final metrics."""
    options = storage_options or {}
    train_stats, eval_stats = PairStats(), PairStats()
    pairs = list(read_pairs(train_input, format, caption_field, image_column, options, train_stats))
    if eval_input is not None:
        train_pairs = pairs
        eval_pairs = list(read_pairs(eval_input, format, caption_field, image_column, options, eval_stats))
    else:
        train_pairs = [p for p in pairs if not held_out(p.key, eval_fraction)]
        eval_pairs = [p for p in pairs if held_out(p.key, eval_fraction)]
    eval_pairs = eval_pairs[:max_eval]
    if pairs and not train_pairs:  # read some, held out every one
        raise ValueError(
            f"the eval fraction {eval_fraction} holds out all {len(pairs)} pairs read from {train_input}: nothing is "
            "left to train on; lower it, or give held-out data of its own (the eval input)"
        )
    if not train_pairs:
        raise ValueError(f"no image–caption pairs to train on in {train_input} ({train_stats})")

    # A resumed run reads its captions with the processor its weights were trained with, the one in
    # the checkpoint: a tokenizer trained again need not give each token the same id.
    resuming = latest_checkpoint(args.output_dir, args.storage_options) if args.resume else None
    if resuming:
        log(f"resuming: using the processor saved in {resuming}")
        processor = GitProcessor.from_pretrained(resuming, args.storage_options)
    model_, processor_ = starting_point(
        model, config, processor, [p.caption for p in train_pairs], vocab_size, args.seed, options
    )
    max_length = model_.config.max_position_embeddings
    train_data = caption_dataset(processor_, train_pairs, max_length, train_stats)
    eval_data = caption_dataset(processor_, eval_pairs, max_length, eval_stats) if eval_pairs else None
    log(f"training on {len(train_data)} pairs, holding out {len(eval_data or [])} (read: {train_stats})")
    unknown = sum(processor_.tokenizer.unk_token_id in row for row in train_data.token_ids)
    if unknown:
        log(f"warning: {unknown} of {len(train_data)} captions have words the tokenizer does not know ([UNK])")
    return train(model_, processor_, train_data, eval_data, args)


# --- the bundled model -------------------------------------------------------------------------

# Scene seeds: training, held-out during training, and the final test (also the CI quality gate's).
BUNDLED_TRAIN_SEED = 1
BUNDLED_EVAL_SEED = 2
BUNDLED_TEST_SEED = 3
BUNDLED_COMMAND = "gitcap train-bundled --out gitmodel/bundled"


@dataclass
class BundledRecipe:
    """Everything that makes the bundled captioner; `gitcap train-bundled` runs it as it is."""

    train_scenes: int = 60_000
    eval_scenes: int = 500
    test_scenes: int = 500
    vocab_size: int = 256  # an upper bound: 77 tokens are kept, every caption word whole plus the characters
    image_size: int = 96
    patch_size: int = 12
    vision_hidden: int = 128
    vision_layers: int = 4
    text_hidden: int = 128
    text_layers: int = 3
    heads: int = 4
    initializer_range: float = 0.06  # 0.02 (BERT's) learns several times slower at this width
    max_steps: int = 4500
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.05
    eval_every: int = 1500
    save_every: int = 500
    seed: int = 0

    def config(self) -> GitConfig:
        vision = GitVisionConfig(
            hidden_size=self.vision_hidden, intermediate_size=4 * self.vision_hidden,
            num_hidden_layers=self.vision_layers, num_attention_heads=self.heads,
            image_size=self.image_size, patch_size=self.patch_size, initializer_range=self.initializer_range,
        )
        # No dropout: the scenes are plentiful and exactly labelled.
        return GitConfig(
            vision_config=vision, hidden_size=self.text_hidden, num_hidden_layers=self.text_layers,
            num_attention_heads=self.heads, intermediate_size=4 * self.text_hidden, max_position_embeddings=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=self.initializer_range,
        )


def train_bundled(
    out: str, work_dir: str | None = None, recipe: BundledRecipe | None = None, progress: bool = True, log=print
) -> dict[str, Any]:
    """Write scenes, train a fresh tiny GIT on them with `finetune`, test it on unseen scenes, and
    write the model with its card to `out`. Checkpoints go to `work_dir` (rerun to resume)."""
    from pipeline.scenes import encode_image, generate_scenes, write_scenes

    recipe = recipe or BundledRecipe()
    started = time.monotonic()
    work = work_dir or tempfile.mkdtemp(prefix="gitcap-bundled-")
    data = {}
    for split, count, seed in (
        ("train", recipe.train_scenes, BUNDLED_TRAIN_SEED), ("eval", recipe.eval_scenes, BUNDLED_EVAL_SEED)
    ):
        data[split] = os.path.join(work, f"scenes-{split}-seed{seed}-{count}")
        if not os.path.exists(os.path.join(data[split], "_SUCCESS")):
            write_scenes(data[split], count=count, seed=seed, format="webdataset", image_format="png")
            Path(data[split], "_SUCCESS").touch()
    log(f"scenes ready in {time.monotonic() - started:.0f}s under {work}")

    args = TrainingArguments(
        output_dir=os.path.join(work, "run"), max_steps=recipe.max_steps, batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate, warmup_steps=recipe.warmup_steps, weight_decay=recipe.weight_decay,
        eval_every=recipe.eval_every, save_every=recipe.save_every, seed=recipe.seed, progress=progress,
    )
    metrics = finetune(
        data["train"], args, eval_input=data["eval"], config=recipe.config(), vocab_size=recipe.vocab_size, log=log
    )
    train_seconds = time.monotonic() - started

    model = GitForCausalLM.from_pretrained(args.output_dir)
    processor = GitProcessor.from_pretrained(args.output_dir)
    test_scenes = list(generate_scenes(recipe.test_scenes, seed=BUNDLED_TEST_SEED))
    test = evaluate(model, processor, CaptionDataset.build(processor, ((s.image, s.caption) for s in test_scenes)))
    # `gitcap scenes` writes JPEG by default: how the model does on those is worth knowing too.
    jpeg_pairs = ((encode_image(s.image, "jpeg"), s.caption) for s in test_scenes)
    test_jpeg = evaluate(model, processor, CaptionDataset.build(processor, jpeg_pairs))
    log(
        f"test (seed {BUNDLED_TEST_SEED}): exact match {test['exact_match']:.4f} "
        f"({test_jpeg['exact_match']:.4f} as JPEG), token accuracy {test['token_accuracy']:.4f}"
    )

    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    card = model_card(recipe, model, metrics, test, test_jpeg, train_seconds, out)
    Path(out, "README.md").write_text(card, encoding="utf-8")
    return {"validation": metrics, "test": test, "test_jpeg": test_jpeg, "seconds": train_seconds}


def model_card(
    recipe: BundledRecipe,
    model: GitForCausalLM,
    validation: dict,
    test: dict,
    test_jpeg: dict,
    seconds: float,
    out: str,
) -> str:
    parameters = sum(p.numel() for p in model.parameters())
    config = model.config
    vision = config.vision_config
    settings = "\n".join(f"| `{name}` | {value} |" for name, value in vars(recipe).items())
    mistakes = "\n".join(f"- predicted \"{m['prediction']}\", true \"{m['reference']}\"" for m in test["mistakes"])
    return f"""# gitcap-scenes-tiny: a tiny GIT captioner for synthetic scenes

gitcap's default model, bundled with the package (`gitmodel.bundled_model_path()`), so that captions
come out in a minute, offline. It describes the synthetic scenes of `pipeline.scenes` (`gitcap scenes`)
— coloured shapes on muted backgrounds — and nothing else: it has never seen a photograph.

It is a GIT model in the Hugging Face layout (`GitForCausalLM`, a `GitProcessor` with a CLIP image
processor and a BERT-style WordPiece tokenizer), so `transformers` loads it too.

## Made by

```
{BUNDLED_COMMAND}
```

trained from scratch with gitcap's own fine-tuning code (`gitmodel.training`, via `jobs.finetune`),
on {os.cpu_count()} CPU cores ({_cpu_name()}, {_torch_threads()} torch threads): **{seconds / 60:.1f} minutes**
from nothing (scenes, tokenizer and training; Python {platform.python_version()}, torch {_torch_version()}).

## Data

- Training: scenes 0..{recipe.train_scenes - 1} of seed {BUNDLED_TRAIN_SEED}, 96x96, written as PNG WebDataset shards.
- Held out during training: {recipe.eval_scenes} scenes of seed {BUNDLED_EVAL_SEED}.
- Test: {recipe.test_scenes} scenes of seed {BUNDLED_TEST_SEED}, never used in training
  (`tests/test_bundled_model.py` checks the same scenes in CI).

Captions follow the scene grammar: `a {{size}} {{colour}} {{shape}} in the {{position}}`, or
`a small {{colour}} {{shape}} {{relation}} a large {{colour}} {{shape}}`.

## Model

{parameters / 1e6:.2f} M parameters (float32, {_folder_megabytes(out):.1f} MB on disk).

- Vision: CLIP ViT, {vision.image_size} px, patch {vision.patch_size} ({vision.num_tokens} tokens), hidden {vision.hidden_size},
  {vision.num_hidden_layers} layers, {vision.num_attention_heads} heads, MLP {vision.intermediate_size}.
- Decoder: hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads, MLP {config.intermediate_size},
  vocabulary {config.vocab_size} (WordPiece trained on the training captions; [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4).

## Training

| setting | value |
|---|---|
{settings}

AdamW (no weight decay on biases and LayerNorms), linear warmup then cosine decay, gradient clipping 1.0,
no dropout. Loss over caption tokens only.

## Accuracy

Greedy captions through `GitProcessor` + `generate`, compared word for word with the true caption:

| split | exact match | token accuracy | loss |
|---|---|---|---|
| held out (seed {BUNDLED_EVAL_SEED}, {validation.get('eval_examples', 0)} scenes) | {validation.get('exact_match', float('nan')):.1%} | {validation.get('token_accuracy', float('nan')):.2%} | {validation.get('eval_loss', float('nan')):.4f} |
| test (seed {BUNDLED_TEST_SEED}, {test['eval_examples']} scenes) | **{test['exact_match']:.1%}** | {test['token_accuracy']:.2%} | {test['eval_loss']:.4f} |
| the same test scenes as JPEG (quality 90, `gitcap scenes`' default) | {test_jpeg['exact_match']:.1%} | {test_jpeg['token_accuracy']:.2%} | {test_jpeg['eval_loss']:.4f} |

Some of its mistakes on the test scenes:

{mistakes or "- none"}

## Use

```python
from gitmodel import GitForCausalLM, GitProcessor, bundled_model_path
from pipeline.scenes import make_scene

model = GitForCausalLM.from_pretrained(bundled_model_path())
processor = GitProcessor.from_pretrained(bundled_model_path())
inputs = processor(images=[make_scene(seed=7, index=0).image])
print(processor.batch_decode(model.generate(inputs["pixel_values"]), skip_special_tokens=True))
```
"""


def _folder_megabytes(path: str) -> float:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()) / 1e6


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else (platform.processor() or platform.machine())


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _torch_version() -> str:
    import torch

    return torch.__version__
