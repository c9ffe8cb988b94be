"""A tiny but complete GIT processor folder (image processor + BERT tokenizer), written by transformers.

The files are whatever transformers' own `save_pretrained` writes, so loaders are tested against
the real layout, not against our idea of it. Test-only: imports transformers.
"""

from __future__ import annotations

import os
import tempfile

# BERT's layout, shrunk: [PAD]=0, [unused0..98], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, then
# single characters, word pieces and a few caption / question words (about 230 tokens).
_WORDS = (
    "a the an of on in with and is are there what how many color man woman dog cat sitting standing "
    "table red blue green white black two three street car people picture photo holding next to ' s"
).split()
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?'\"-:;()&%$#@/")
TINY_VOCAB: list[str] = (
    ["[PAD]"]
    + [f"[unused{i}]" for i in range(99)]
    + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + _CHARS
    + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    + [w for w in dict.fromkeys(_WORDS) if w not in _CHARS]
    + ["##ing", "##ed", "##er"]
)


def save_tiny_processor(
    path: str | os.PathLike,
    image_size: int = 32,
    processor_type: str = "clip",
    layout: str = "hub",
    model_max_length: int = 512,
) -> str:
    """Write a tiny GIT processor folder at `path` with transformers' own `save_pretrained`.

    processor_type: "clip" (CLIPImageProcessor: bicubic, CLIP mean/std) or "videomae"
    (VideoMAEImageProcessor: bilinear, mean = std = 0.5), both resizing the shortest edge to
    `image_size` and centre-cropping `image_size` squares.
    layout: "hub" (preprocessor_config.json, tokenizer.json, tokenizer_config.json, vocab.txt, as
    on the hub) or "transformers5" (exactly what transformers 5's GitProcessor.save_pretrained writes:
    processor_config.json with a nested image_processor, tokenizer.json, tokenizer_config.json).
    """
    from transformers import BertTokenizer
    from transformers import GitProcessor as HFGitProcessor

    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = os.path.join(scratch, "vocab.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            f.write("".join(f"{token}\n" for token in TINY_VOCAB))
        tokenizer = BertTokenizer(vocab=vocab_file, model_max_length=model_max_length)
    image_processor = _image_processor(processor_type, image_size)
    processor = HFGitProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(path)
    if layout == "hub":
        os.remove(os.path.join(path, "processor_config.json"))
        image_processor.save_pretrained(path)  # preprocessor_config.json
        with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{token}\n" for token in TINY_VOCAB))
    elif layout != "transformers5":
        raise ValueError(f"layout must be 'hub' or 'transformers5', got {layout!r}")
    return str(path)


def _image_processor(processor_type: str, image_size: int):
    """transformers' PIL-backend processors: the ones GIT's original preprocessing matches."""
    if processor_type == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=image_size)
    if processor_type == "videomae":
        from transformers.models.videomae.image_processing_pil_videomae import VideoMAEImageProcessorPil

        return VideoMAEImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size=image_size, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    raise ValueError(f"processor_type must be 'clip' or 'videomae', got {processor_type!r}")
