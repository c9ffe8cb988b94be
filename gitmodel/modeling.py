"""GIT: image tokens from a CLIP ViT, then a BERT-style decoder over [image tokens | text tokens].

Image tokens attend to each other only; text tokens attend to every image token and causally to
earlier text. Parameter names follow the Hugging Face checkpoints (`git.encoder.layer.{i}.attention.self.query`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gitmodel.attention import QKVAttention, input_major_layout
from gitmodel.checkpoint import PretrainedModel
from gitmodel.config import GenerationConfig, GitConfig
from gitmodel.hub import CheckpointFolder
from gitmodel.kv_cache import KVCache, LayerCache
from gitmodel.vision import GitVisionModel


class TextEmbeddings(nn.Module):
    def __init__(self, config: GitConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(QKVAttention):
    def __init__(self, config: GitConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: LayerCache | None, start: int
    ) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x)
        if cache is not None:
            k, v = cache.update(start, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(batch, length, dim)

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.query, self.key, self.value

    def store_keys_values(self, x: torch.Tensor, cache: LayerCache, start: int) -> None:
        """Only fill the cache: what a query at these positions would compute is never used."""
        cache.update(start, self.heads(self.key(x)), self.heads(self.value(x)))


class DenseLayerNorm(nn.Module):
    """BERT's post-LayerNorm residual: LayerNorm(dropout(dense(x)) + residual)."""

    def __init__(self, in_features: int, config: GitConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, config: GitConfig):
        super().__init__()
        self.self = SelfAttention(config)
        self.output = DenseLayerNorm(config.hidden_size, config)


class Intermediate(nn.Module):
    def __init__(self, config: GitConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: GitConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = DenseLayerNorm(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: LayerCache | None, start: int) -> torch.Tensor:
        attended = self.attention.output(self.attention.self(x, mask, cache, start), x)
        return self.output(self.intermediate(attended), attended)


class Decoder(nn.Module):
    def __init__(self, config: GitConfig):
        super().__init__()
        self.layer = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None, start: int = 0
    ) -> torch.Tensor:
        for i, layer in enumerate(self.layer):
            x = layer(x, mask, cache.layers[i] if cache is not None else None, start)
        return x

    def prefill_image(self, image_tokens: torch.Tensor, cache: KVCache) -> None:
        """Cache every layer's keys and values for the image tokens (which attend to each other only).
        The last layer's outputs for image positions feed no logits, so only its keys and values are computed."""
        x = image_tokens
        for layer, layer_cache in zip(self.layer[:-1], cache.layers):
            x = layer(x, None, layer_cache, 0)
        self.layer[-1].attention.self.store_keys_values(x, cache.layers[-1], 0)


class VisualProjection(nn.Module):
    def __init__(self, config: GitConfig):
        super().__init__()
        # The LayerNorm takes the vision tower's eps (1e-5), not the decoder's.
        self.visual_projection = nn.Sequential(
            nn.Linear(config.vision_config.hidden_size, config.hidden_size),
            nn.LayerNorm(config.hidden_size, eps=config.vision_config.layer_norm_eps),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(x)


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Text position ids that start at 0 at each row's first real token (rows may be left-padded)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def text_attention_mask(
    num_image_tokens: int, text_mask: torch.Tensor, past_text: int = 0, new_text: int | None = None
) -> torch.Tensor:
    """Boolean mask (rows, 1, new_text, image + past_text + new_text) for text queries: every image token,
    causal over text, never a padded text key. `text_mask` covers past and new text tokens."""
    rows, text_len = text_mask.shape
    new_text = text_len - past_text if new_text is None else new_text
    query_pos = torch.arange(past_text, past_text + new_text, device=text_mask.device)
    key_pos = torch.arange(text_len, device=text_mask.device)
    causal = key_pos[None, :] <= query_pos[:, None]
    text = causal[None] & text_mask.bool()[:, None, :]
    image = torch.ones(rows, new_text, num_image_tokens, dtype=torch.bool, device=text_mask.device)
    return torch.cat([image, text], dim=-1)[:, None]


@dataclass
class ModelOutput:
    last_hidden_state: torch.Tensor


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class GitModel(PretrainedModel):
    """Image encoder, visual projection and text decoder; returns the decoder's hidden states."""

    config_class = GitConfig
    checkpoint_prefixes = ("", "git.")

    def __init__(self, config: GitConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.image_encoder = GitVisionModel(config.vision_config)
        self.encoder = Decoder(config)
        self.visual_projection = VisualProjection(config)
        if config.num_image_with_embedding:
            self.img_temporal_embedding = nn.ParameterList(
                nn.Parameter(torch.zeros(1, 1, config.vision_config.hidden_size))
                for _ in range(config.num_image_with_embedding)
            )

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image tokens (B, N, D) for images (B, 3, S, S) or videos (B, frames, 3, S, S)."""
        if pixel_values.ndim == 4:
            features = self.image_encoder(pixel_values).last_hidden_state
        elif pixel_values.ndim == 5:
            frames = pixel_values.shape[1]
            if frames != self.config.num_image_with_embedding:
                raise ValueError(
                    f"video input has {frames} frames but this model takes "
                    f"{self.config.num_image_with_embedding or 'no'} frames (num_image_with_embedding)"
                )
            batch = pixel_values.shape[0]
            encoded = self.image_encoder(pixel_values.flatten(0, 1)).last_hidden_state
            encoded = encoded.unflatten(0, (batch, frames))
            temporal = torch.stack(list(self.img_temporal_embedding), dim=1).to(encoded.dtype)  # (1, F, 1, Dv)
            features = (encoded + temporal).flatten(1, 2)
        else:
            raise ValueError(f"pixel_values must be (B, 3, H, W) or (B, frames, 3, H, W), got {tuple(pixel_values.shape)}")
        return self.visual_projection(features)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Hidden states (B, N + T, D) over [image tokens | text tokens], as transformers' GitModel gives."""
        batch, text_len = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(text_len, device=input_ids.device).expand(batch, -1)
        text = self.embeddings(input_ids, position_ids)
        if pixel_values is None:
            image = text.new_zeros(batch, 0, text.shape[-1])
        else:
            image = self.encode_image(pixel_values)
            if batch % image.shape[0]:
                raise ValueError(f"{batch} texts for {image.shape[0]} images: give a multiple of the images' number")
            # More texts than images: the images are tiled (text i sees image i mod images), as transformers does.
            image = image.repeat(batch // image.shape[0], 1, 1)
        n = image.shape[1]
        image_rows = torch.zeros(batch, 1, n, n + text_len, dtype=torch.bool, device=text.device)
        image_rows[..., :n] = True
        text_rows = text_attention_mask(n, attention_mask)
        if n == 0:
            # Text alone: a left-padded query would attend to nothing; let it see itself.
            text_rows |= torch.eye(text_len, dtype=torch.bool, device=text.device)
        mask = torch.cat([image_rows, text_rows], dim=2)
        return ModelOutput(self.encoder(torch.cat([image, text], dim=1), mask))


class GitForCausalLM(PretrainedModel):
    """GIT with its language-modelling head: captioning, VQA and video captioning by generation."""

    config_class = GitConfig
    checkpoint_prefixes = ("",)

    def __init__(self, config: GitConfig):
        super().__init__()
        self.config = config
        self.git = GitModel(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size)
        self.generation_config = GenerationConfig.from_model_config(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits over every position (image and text), and with `labels` the next-token loss over text."""
        hidden = self.git(input_ids, attention_mask, pixel_values, position_ids).last_hidden_state
        logits = self.output(hidden)
        loss = None
        if labels is not None:
            num_image_tokens = logits.shape[1] - input_ids.shape[1]
            text_logits = logits[:, num_image_tokens:-1].float()
            loss = F.cross_entropy(text_logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """Captions (or answers, with a prompt) for a batch of images; see `gitmodel.generation.generate`."""
        from gitmodel.generation import generate

        return generate(self, pixel_values, input_ids, attention_mask, **kwargs)

    def prepare_for_inference(
        self, cuda_graphs: bool = True, compile: bool = False, graph_shapes: int = 2
    ) -> GitForCausalLM:
        """Speed-ups for batch inference: one matmul for q/k/v, CUDA graphs for the decode steps (on a
        GPU, captured per batch shape and kept for the last `graph_shapes` shapes, each with its own
        KV cache), on a CPU weights laid out for its small-batch GEMMs, and, optionally,
        `torch.compile` (a minute to start, faster after)."""
        from gitmodel.cuda_graphs import DecodeGraphs

        self.eval()
        on_cpu = self.device.type == "cpu"
        for module in self.modules():
            if isinstance(module, QKVAttention):
                module.fuse_projections(input_major=on_cpu)
            if on_cpu and isinstance(module, nn.Linear):
                module.weight.data = input_major_layout(module.weight.data)
        self.decode_graphs = DecodeGraphs(graph_shapes) if cuda_graphs else None
        if compile:
            # Compiled in place, so parameter names stay the checkpoint's. In the decoder, only the parts
            # whose shapes do not change from step to step (all but attention) are compiled: they fuse
            # bias, GELU, residual and LayerNorm into few kernels, and stay capturable by the CUDA graphs.
            self.git.image_encoder.vision_model.compile(dynamic=False)
            self.git.embeddings.compile(dynamic=False)
            for layer in self.git.encoder.layer:
                for part in (layer.attention.output, layer.intermediate, layer.output):
                    part.compile(dynamic=False)
        return self

    def after_load(self, folder: CheckpointFolder) -> None:
        if folder.exists("generation_config.json"):
            self.generation_config = GenerationConfig.from_dict(folder.read_json("generation_config.json"))

    def save_pretrained(self, path, storage_options=None) -> None:
        super().save_pretrained(path, storage_options)
        CheckpointFolder(path, storage_options).write_json("generation_config.json", self.generation_config.to_dict())
