"""The tiny scene captioner that ships inside the package: gitcap's default model, usable offline."""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"


def bundled_model_path() -> Path:
    """The folder of the bundled GIT checkpoint (Hugging Face layout; its README.md is the model card).

    `gitcap train-bundled --out gitmodel/bundled` makes it; an install without it has no `config.json` there.
    """
    return BUNDLED_DIR
