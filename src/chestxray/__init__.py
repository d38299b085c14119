"""chestxray: train, evaluate, explain and serve chest X-ray classifiers.

Not a diagnostic device: models built with it are research tools.

The shortest path, from a notebook::

    from chestxray import TrainConfig, evaluate, fit, load_model

    run = fit("data/", TrainConfig(epochs=12))          # run directory and model bundle
    evaluate(run.bundle_dir, "data/", "runs/eval")      # metrics with intervals, report.html
    load_model(run.bundle_dir).predict("xray.dcm")      # Prediction(label=..., probabilities=...)

Each name is imported on first use, so that ``import chestxray`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
_LAZY = {"load_model": "predict", "predict_files": "predict", "fit": "train", "prepare_data": "train",
         "train_model": "train", "calibrate": "calibration", "cross_validate": "cv", "evaluate": "evaluation",
         "TrainConfig": "config", "RuntimeSettings": "config", "load_samples": "sources"}
# Never a name that is also a submodule's (e.g. sweep): once the submodule is imported it would shadow the function.
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'chestxray' has no attribute {name!r}")
