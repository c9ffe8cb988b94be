"""GIT (Generative Image-to-text Transformer) in plain PyTorch, loading the Hugging Face checkpoints."""

from gitmodel.checkpoint import CheckpointError
from gitmodel.config import GenerationConfig, GitConfig, GitVisionConfig
from gitmodel.generation import GenerateOutput
from gitmodel.modeling import GitForCausalLM, GitModel
from gitmodel.vision import GitVisionModel

__all__ = [
    "CheckpointError",
    "GenerateOutput",
    "GenerationConfig",
    "GitConfig",
    "GitForCausalLM",
    "GitModel",
    "GitVisionConfig",
    "GitVisionModel",
]
