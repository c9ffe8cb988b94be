"""GIT configurations, read from and written to the Hugging Face `config.json` layout."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gitmodel.hub import CheckpointFolder


class _JsonConfig:
    """Shared dict conversion: known fields are typed; unknown hub fields are kept and written back."""

    model_type: ClassVar[str]

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
        known = {k: v for k, v in values.items() if k in names}
        extra = {k: v for k, v in values.items() if k not in names and k != "model_type"}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **values, "model_type": self.model_type}


@dataclass
class GitVisionConfig(_JsonConfig):
    """The CLIP ViT image encoder. Defaults are git-base's (hub configs list only what differs)."""

    model_type: ClassVar[str] = "git_vision_model"

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_tokens(self) -> int:
        """Tokens per image: one class token plus the patch grid."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class GitConfig(_JsonConfig):
    """The whole model: text decoder fields, plus the vision tower's config."""

    model_type: ClassVar[str] = "git"

    vision_config: GitVisionConfig = field(default_factory=GitVisionConfig)
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    bos_token_id: int = 101
    eos_token_id: int = 102
    tie_word_embeddings: bool = False
    num_image_with_embedding: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = GitVisionConfig.from_dict(self.vision_config)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act != "gelu" or self.vision_config.hidden_act != "quick_gelu":
            raise ValueError(
                f"unsupported activations (text {self.hidden_act!r}, vision {self.vision_config.hidden_act!r}): "
                "GIT uses 'gelu' in the decoder and 'quick_gelu' in the vision tower"
            )
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings=true is not a GIT checkpoint: GIT's output layer is not tied")

    @property
    def num_image_tokens(self) -> int:
        """Decoder positions taken by the image: every frame's tokens, side by side."""
        return self.vision_config.num_tokens * (self.num_image_with_embedding or 1)

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        values["vision_config"] = self.vision_config.to_dict()
        values.setdefault("architectures", ["GitForCausalLM"])
        return values

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> GitConfig:
        return cls.from_dict(CheckpointFolder(path, storage_options).read_json("config.json"))

    def save_pretrained(self, path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
        CheckpointFolder(path, storage_options).write_json("config.json", self.to_dict())


@dataclass
class GenerationConfig(_JsonConfig):
    """The defaults `generate` falls back to, from `generation_config.json`."""

    model_type: ClassVar[str] = ""

    bos_token_id: int = 101
    eos_token_id: int | list[int] = 102
    pad_token_id: int = 0
    max_length: int | None = None  # unset: 20 new tokens, as transformers does
    max_new_tokens: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_length: int = 0  # prompt (its padded width) + generated tokens, as transformers counts
    min_new_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_model_config(cls, config: GitConfig) -> GenerationConfig:
        return cls(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        del values["model_type"]
        return {k: v for k, v in values.items() if v is not None}

    def check_supported(self, do_sample: bool) -> None:
        """A ValueError naming the first setting transformers would apply here that gitmodel does not
        implement: generating without it would silently give other tokens than transformers."""
        unsupported = {**_UNSUPPORTED, **(_UNSUPPORTED_SAMPLING if do_sample else {})}
        for key, off in unsupported.items():
            value = self.extra.get(key)
            if value is not None and value != off:
                fix = "remove it from generation_config.json" + ("" if off is None else f" or set it to {off!r}")
                raise ValueError(
                    f"generation config sets {key}={value!r}, which transformers applies and gitmodel does not "
                    f"implement; {fix}"
                )


# generation_config.json keys that change transformers' tokens, with the value that turns each off (None:
# only unset is off). Keys that change nothing but speed or outputs beside the tokens are not here.
_UNSUPPORTED: dict[str, Any] = {
    "bad_words_ids": None,
    "begin_suppress_tokens": None,
    "constraints": None,
    "diversity_penalty": 0.0,
    "dola_layers": None,
    "encoder_no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "exponential_decay_length_penalty": None,
    "force_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "guidance_scale": 1.0,
    "max_time": None,
    "num_beam_groups": 1,
    "penalty_alpha": None,
    "remove_invalid_values": False,
    "renormalize_logits": False,
    "sequence_bias": None,
    "stop_strings": None,
    "suppress_tokens": None,
    "token_healing": False,
    "watermarking_config": None,
}
# The warpers transformers applies only when sampling.
_UNSUPPORTED_SAMPLING: dict[str, Any] = {
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "top_h": None,
    "typical_p": 1.0,
}
