"""The tiny scene captioner that ships inside the package: gitcap's default model, usable offline."""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


def bundled_model_path() -> Path:
    """The folder of the bundled GIT checkpoint (Hugging Face layout; its README.md is the model card)."""
    if not (BUNDLED_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the bundled model is missing from {BUNDLED_DIR}; make it with `gitcap train-bundled --out {BUNDLED_DIR}`"
        )
    return BUNDLED_DIR
