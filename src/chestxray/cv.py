"""Cross-validation: one model per stratified, patient-grouped fold, out-of-fold predictions, optional ensemble.

``runs/<name>/`` receives ``fold<i>/`` (each fold's training run: config, split, epoch metrics and
curves; its weights are deleted once scored), ``cv.csv`` (one row per fold), ``cv.json`` (mean and
standard deviation over the folds, and the pooled out-of-fold figures), ``oof.csv`` (every image's
probabilities from the fold model that did not train on it, and its fold) and, with
``keep_models``, ``bundle/``: the fold models as one ensemble that averages their probabilities.

The folds partition the training pool: every image that is not in the test split, without the
training images byte-identical to a test image (as :func:`chestxray.train.fit` does); the data's own
train/val assignment is ignored. Each fold model is trained like ``chestxray train`` on the other
folds: ``val_fraction`` of them (patient-grouped) is its validation set for early stopping,
checkpoint choice and temperature. The held-out fold is only scored, so the figures are not biased
by model selection. Training images byte-identical to a held-out image are left out of that fold.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from sklearn.metrics import balanced_accuracy_score

from .bundle import BundleMeta, load_bundle, save_bundle
from .config import TrainConfig
from .errors import ChestXrayError
from .metrics import fit_temperature, logits_to_probs, operating_points
from .models import ChestXrayNet, EnsembleNet
from .runners import TorchRunner, run_images
from .sources import NO_FINDING, Samples
from .splits import kfold_splits, save_split, train_val_split
from .train import console, drop_test_copies, fit, prepare_data, validation_metrics

SCORES = ("loss", "accuracy", "balanced_accuracy", "macro_auc")


@dataclass
class CVResult:
    """What a cross-validation produced: per-fold scores, their summary, out-of-fold predictions."""

    run_dir: Path
    folds: pd.DataFrame
    summary: dict[str, Any]
    oof: pd.DataFrame
    bundle_dir: Path | None


def cross_validate(data: str | Path | Samples, config: TrainConfig | None = None, folds: int = 5, *,
                   out_dir: str | Path = "runs", name: str | None = None, keep_models: bool = False,
                   cache_dir: str | Path | None = None, progress: bool | None = None) -> CVResult:
    """Train one model per fold of the training pool and score it on the fold it did not see.

    Writes ``cv.csv``, ``cv.json``, ``oof.csv`` and the fold runs into ``out_dir/name``; with
    ``keep_models`` also an ensemble bundle of the fold models, its temperature fitted on the
    out-of-fold logits and ``meta.metrics`` the out-of-fold figures.
    """
    config = one_device(config or TrainConfig())
    progress = console.is_terminal if progress is None else progress
    run_dir = Path(out_dir) / (name or datetime.now().strftime("cv-%Y%m%d-%H%M%S"))
    prepared = prepare_data(data, config, cache_dir=cache_dir, progress=progress)
    usable = prepared.samples
    pool = Samples(usable.frame.assign(split=""), usable.classes, usable.task, usable.origin)
    _check_fold_count(pool, folds)
    images, targets = np.asarray(prepared.cache.images), prepared.targets
    logits = np.zeros((len(pool), len(pool.classes)), dtype=np.float32)
    fold_of = np.full(len(pool), -1)
    rows: list[dict[str, Any]] = []
    members: list[ChestXrayNet] = []
    run_dir.mkdir(parents=True, exist_ok=True)
    for index, (train_rows, held_rows) in enumerate(kfold_splits(pool, folds, config.seed)):
        fold_dir = run_dir / f"fold{index}"
        fold_dir.mkdir(exist_ok=True)
        console.print(f"fold {index + 1}/{folds}: holding out {len(held_rows)} images")
        inner_train, inner_val = _inner_split(pool, train_rows, held_rows, config)
        split_file = save_split(fold_dir / "split.csv", pool, {"train": inner_train, "val": inner_val})
        run = fit(pool, config, out_dir=run_dir, name=fold_dir.name, cache_dir=cache_dir,
                  progress=progress, split_file=split_file)
        model, _ = load_bundle(run.bundle_dir)
        discard_weights(run.run_dir)
        logits[held_rows] = run_images(TorchRunner(model), images[held_rows], 64)[0]
        fold_of[held_rows] = index
        rows.append({"fold": index, **_scores(logits[held_rows], targets[held_rows], pool.task)})
        if keep_models:
            members.append(model)
    table = pd.DataFrame(rows)
    table.to_csv(run_dir / "cv.csv", index=False)
    summary = _summary(table, logits, targets, pool.task, config)
    (run_dir / "cv.json").write_text(json.dumps(summary, indent=2) + "\n")
    oof = _oof_frame(pool, fold_of, logits)
    oof.to_csv(run_dir / "oof.csv", index=False)
    bundle_dir = None
    if keep_models:
        bundle_dir = _save_ensemble(run_dir / "bundle", members, pool, config, prepared.cache.fingerprint, summary,
                                    logits, targets)
    result = CVResult(run_dir, table, summary, oof, bundle_dir)
    render_cv(result, console)
    return result


def one_device(config: TrainConfig) -> TrainConfig:
    """``config`` on a single device: folds and sweep trials train one after another in this process."""
    if config.num_nodes > 1 or config.strategy != "auto" or str(config.devices) not in ("auto", "1"):
        raise ChestXrayError("cross-validation and sweeps train on one device in one process: "
                             "leave --devices, --num-nodes and --strategy at their defaults")
    return config.replace(devices="1")


def discard_weights(run_dir: Path) -> None:
    """Delete a run directory's checkpoints and bundle, keeping its logs (config, split, metrics, curves)."""
    for folder in ("checkpoints", "bundle"):
        shutil.rmtree(run_dir / folder, ignore_errors=True)


def render_cv(result: CVResult, console: Console) -> None:
    """The per-fold scores, their mean ± std and the out-of-fold figures as a table."""
    table = Table(title=f"{len(result.folds)}-fold cross-validation ({result.run_dir})")
    for column in ("fold", "n", *SCORES):
        table.add_column(column.replace("_", " "), justify="right")
    for row in result.folds.to_dict("records"):
        table.add_row(str(row["fold"]), str(row["n"]), *(_cell(row[s]) for s in SCORES))
    mean, std = result.summary["mean"], result.summary["std"]
    table.add_row("mean ± std", "", *(f"{_cell(mean[s])} ± {_cell(std[s])}" for s in SCORES), end_section=True)
    oof = result.summary["oof"]
    table.add_row("out-of-fold", str(oof["n"]), *(_cell(oof[s]) for s in SCORES))
    console.print(table)


def _check_fold_count(pool: Samples, folds: int) -> None:
    patients = len(set(pool.groups()))
    if folds > patients:
        raise ChestXrayError(f"{pool.origin}: {folds} folds need at least {folds} patients; "
                             f"the training pool has {patients}")


def _inner_split(pool: Samples, train_rows: np.ndarray, held_rows: np.ndarray,
                 config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """The fold's training rows without copies of held-out images, split train/validation as ``fit`` does."""
    kept = drop_test_copies(pool.subset(train_rows), pool.subset(held_rows))
    train_rows = train_rows[np.isin(pool.frame["path"].to_numpy()[train_rows], kept.frame["path"].to_numpy())]
    inner_train, inner_val = train_val_split(pool.subset(train_rows), config.val_fraction, config.seed)
    return train_rows[inner_train], train_rows[inner_val]


def _scores(logits: np.ndarray, targets: np.ndarray, task: str) -> dict[str, Any]:
    """Size, cross-entropy, accuracy, balanced accuracy (multi-class only) and macro ROC-AUC."""
    figures = validation_metrics(torch.tensor(logits), torch.tensor(targets), task)
    balanced = balanced_accuracy_score(targets, logits.argmax(1)) if task == "multiclass" else math.nan
    return {"n": len(targets), "loss": figures["val_loss"], "accuracy": figures["val_acc"],
            "balanced_accuracy": float(balanced), "macro_auc": figures["val_auc"]}


def _summary(table: pd.DataFrame, logits: np.ndarray, targets: np.ndarray, task: str,
             config: TrainConfig) -> dict[str, Any]:
    """Mean and sample standard deviation over folds, pooled out-of-fold figures (NaN as ``None``)."""
    oof = _scores(logits, targets, task)
    if task == "multiclass":
        temperature = fit_temperature(logits, targets)
        oof["temperature"] = temperature
        oof["loss_calibrated"] = _scores(logits / temperature, targets, task)["loss"]
    summary = {"folds": len(table), "mean": table[list(SCORES)].mean().to_dict(),
               "std": table[list(SCORES)].std(ddof=1).to_dict(), "oof": oof, "config": config.to_dict(),
               "note": "each fold model chose its epoch on an inner validation split of its training folds; "
                       "the held-out fold was only scored (std over folds uses ddof=1)"}
    return _json_safe(summary)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _oof_frame(pool: Samples, fold_of: np.ndarray, logits: np.ndarray) -> pd.DataFrame:
    """One row per pool image: file, truth, patient, fold and the uncalibrated probability of each class."""
    probs = logits_to_probs(logits, pool.task)
    frame = pd.DataFrame({"file": pool.frame["path"], "truth": pool.frame["label"].replace("", NO_FINDING),
                          "patient_id": pool.frame["patient_id"], "fold": fold_of})
    return pd.concat([frame, pd.DataFrame(probs, columns=pool.classes)], axis=1)


def _save_ensemble(directory: Path, members: list[ChestXrayNet], pool: Samples, config: TrainConfig,
                   fingerprint: str, summary: dict[str, Any], logits: np.ndarray, targets: np.ndarray) -> Path:
    """The fold models as one bundle; temperature and operating points from the out-of-fold logits.

    No held-out data is left for the ensemble itself, so each fold model's outputs on the fold it did
    not see stand in for the ensemble's (which average five models and are a little less spread).
    """
    oof = summary["oof"]
    temperature = float(oof.get("temperature", 1.0))
    meta = BundleMeta(
        classes=list(pool.classes), image_size=config.image_size, preprocess=config.preprocessing().options(),
        temperature=temperature, train_fingerprint=fingerprint,
        operating_points=operating_points(targets, logits_to_probs(logits, pool.task, temperature), pool.classes),
        metrics={**oof, "evaluated_on": f"out-of-fold ({len(members)} folds)"},
        extra={"config": config.to_dict(),
               "trained_on": {"origin": pool.origin, "n_train": len(pool),
                              "class_counts": pool.frame["label"].value_counts().to_dict()},
               "cv": {"folds": len(members), "mean": summary["mean"], "std": summary["std"]}})
    return save_bundle(directory, EnsembleNet(members), meta)


def _cell(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
