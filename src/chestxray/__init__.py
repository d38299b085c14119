"""chestxray: train, evaluate, explain and serve chest X-ray classifiers.

Not a diagnostic device: models built with it are research tools.

``from chestxray import load_model`` gives :func:`chestxray.predict.load_model` (imported on first
use, so that ``import chestxray`` stays light).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from .predict import load_model

        return load_model
    raise AttributeError(f"module 'chestxray' has no attribute {name!r}")
