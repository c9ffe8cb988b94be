"""GIT (Generative Image-to-text Transformer) in plain PyTorch, loading the Hugging Face checkpoints."""

from gitmodel.bundled_model import bundled_model_path
from gitmodel.checkpoint import CheckpointError
from gitmodel.config import GenerationConfig, GitConfig, GitVisionConfig
from gitmodel.generation import GenerateOutput
from gitmodel.image_processing import GitImageProcessor
from gitmodel.modeling import GitForCausalLM, GitModel
from gitmodel.processing import GitProcessor
from gitmodel.tokenization import GitTokenizer
from gitmodel.vision import GitVisionModel

__all__ = [
    "CheckpointError",
    "GenerateOutput",
    "GenerationConfig",
    "GitConfig",
    "GitForCausalLM",
    "GitImageProcessor",
    "GitModel",
    "GitProcessor",
    "GitTokenizer",
    "GitVisionConfig",
    "GitVisionModel",
    "bundled_model_path",
]
