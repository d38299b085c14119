"""chestxray: train, evaluate, explain and serve chest X-ray classifiers.

Not a diagnostic device: models built with it are research tools.

The shortest path, from a notebook::

    from chestxray import TrainConfig, evaluate, fit, load_model

    run = fit("data/", TrainConfig(epochs=13))          # run directory and model bundle (ONNX included)
    evaluate(run.bundle_dir, "data/", "runs/eval")      # metrics with intervals, report.html
    load_model(run.bundle_dir).predict("xray.dcm")      # Prediction(label=..., probabilities=...)

Each name is imported on first use, so that ``import chestxray`` stays light.

The modules live in subpackages by concern (``data``, ``stats``, ``model``, ``trust``, ``inference``,
``deploy``, ``training``, ``dicom``, ``serving``; docs/ARCHITECTURE.md draws them). The flat paths of
before (``chestxray.predict``, ``chestxray.train``, ...) still import: :data:`_MOVED` maps each to
its new home, and importing the old name gives the very same module object.
"""

from __future__ import annotations

import importlib.machinery
import sys
from importlib import import_module
from types import ModuleType
from typing import Any

__version__ = "0.1.0"
_LAZY = {"load_model": "inference.predict", "predict_files": "inference.predict", "Predictor": "inference.predict",
         "Prediction": "inference.predict", "fit": "training.train", "prepare_data": "training.train",
         "train_model": "training.train", "calibrate": "trust.calibration", "cross_validate": "training.cv",
         "sweep": "training.sweep", "show_batch": "training.look", "lr_find": "training.look",
         "adapt": "training.adapt", "adapt_unlabeled": "training.adapt_unlabeled",
         "evaluate": "inference.evaluation", "audit": "data.audit", "export_onnx": "deploy.export",
         "quantize_bundle": "deploy.quantize", "TrainConfig": "training.config", "RuntimeSettings": "training.config",
         "load_samples": "data.sources", "ChestXrayError": "errors", "InputError": "errors"}
"""The package face: each name is the function or class, imported on first use. ``audit``, ``sweep``,
``adapt`` and ``adapt_unlabeled`` are also old flat module paths (:data:`_MOVED`): ``import
chestxray.audit`` still imports that module (``sys.modules["chestxray.audit"]``, and ``from
chestxray.audit import ...`` works), but the package attribute stays the function (:class:`_Package`)."""
__all__ = ["__version__", *_LAZY]

# Old flat module name -> its module below the package today.
_MOVED = {
    "decode": "data.decode", "sources": "data.sources", "cache": "data.cache", "splits": "data.splits",
    "audit": "data.audit", "dicomcheck": "data.dicomcheck",
    "metrics": "stats.metrics", "logit_transform": "stats.logit_transform", "conformal": "stats.conformal",
    "ood": "stats.ood",
    "models": "model.models", "runners": "model.runners", "cam": "model.cam", "bundle": "model.bundle",
    "modelcard": "model.modelcard",
    "calibration": "trust.calibration", "lineage": "trust.lineage", "drift": "trust.drift",
    "label_free": "trust.label_free",
    "predict": "inference.predict", "evaluation": "inference.evaluation", "report": "inference.report",
    "export": "deploy.export", "quantize": "deploy.quantize",
    "config": "training.config", "train": "training.train", "cv": "training.cv", "sweep": "training.sweep",
    "adapt": "training.adapt", "adapt_unlabeled": "training.adapt_unlabeled",
    "dicomresult": "dicom.dicomresult", "dicomweb": "dicom.dicomweb", "listen": "dicom.listen",
    "worklist": "dicom.worklist", "audittrail": "dicom.inferencelog",
    "serve": "serving.serve",
}
# (``chestxray.data``, once the torch Dataset module, is now the data subpackage: it re-exports that
# module's names, so ``from chestxray.data import CachedDataset`` still works.)


def _exports(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[list[str], Any, Any]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for a subpackage re-exporting its modules' names
    (``{submodule: names}``), each imported on first use."""
    where = {name: module for module, names in modules.items() for name in names}

    def getattr_(name: str) -> Any:
        if name in where:
            return getattr(import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted({*where, *modules})

    return sorted(where), getattr_, dir_


class _MovedModules:
    """Imports ``chestxray.<old>`` as the module that now lives at ``chestxray.<_MOVED[old]>``.

    The loader hands back the real module (imported under its new name), so ``sys.modules`` holds one
    object under both names and a monkeypatch through either name patches the same module. (A
    meta-path finder and loader by protocol: ``importlib.abc`` alone would double the import time.)
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        package, _, old = fullname.partition(".")
        if package != __name__ or old not in _MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = import_module(f"{__name__}.{_MOVED[spec.name.partition('.')[2]]}")
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the alias's: put it back below
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())


class _Package(ModuleType):
    """The package module: a submodule imported by its old flat name never shadows a function of the
    package face (``chestxray.audit`` is the function even after ``import chestxray.audit``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name in _MOVED:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'chestxray' has no attribute {name!r}")
