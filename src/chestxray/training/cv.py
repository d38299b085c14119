"""Cross-validation: one model per stratified, patient-grouped fold, out-of-fold predictions, optional ensemble.

``runs/<name>/`` receives ``fold<i>/`` (each fold's training run: config, split, epoch metrics and
curves; the fold models stay in memory, their checkpoints in a temporary folder), ``cv.csv`` (one row per fold), ``cv.json`` (mean and
standard deviation over the folds, the pooled out-of-fold figures, and ``oof_trust``: the coverage per
class and mean set size of each fold model's conformal sets, fitted on its inner validation split,
on its held-out fold, with the risk-coverage accuracy at 80% and 50%), ``oof.csv`` (every image's
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

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..model.bundle import save_bundle
from ..trust.calibration import Calibration, calibrate_outputs, fit_guard
from .config import RuntimeSettings, TrainConfig
from ..stats.conformal import DEFAULT_COVERAGE, ConformalSets, set_metrics
from ..errors import ChestXrayError
from ..storage import write_text
from ..launch import one_device
from ..stats.metrics import accuracy_at_coverages, json_safe, logit_scores, logits_to_probs
from ..model.models import ChestXrayNet, EnsembleNet
from ..stats.ood import OODGuard, cross_fitted_scores
from ..model.runners import TorchRunner, run_images
from ..data.sources import NO_FINDING, Samples
from ..data.splits import kfold_splits, train_val_split
from .train import (LRSearch, PreparedData, console, drop_test_copies, find_lr, model_meta, prepare_data,
                    pretrained_config, run_directory,
                    train_model)

__all__ = ["cross_validate", "CVResult", "SCORES"]

COMPLETE_FILE = "cv.json"
"""Written last: a run folder without it is an interrupted cross-validation, replaced by a rerun."""
SCORES = ("loss", "accuracy", "balanced_accuracy", "macro_auc")
"""The figures of each fold, of their mean and standard deviation, and of the pooled out-of-fold outputs."""


@dataclass
class CVResult:
    """What a cross-validation produced: per-fold scores, their summary, out-of-fold predictions."""

    run_dir: Path
    folds: pd.DataFrame
    summary: dict[str, Any]
    oof: pd.DataFrame
    bundle_dir: Path | None


def cross_validate(data: str | Path | Samples, config: TrainConfig | None = None, folds: int = 5,
                   runtime: RuntimeSettings | None = None, *,
                   out_dir: str | Path = "runs", name: str | None = None, keep_models: bool = False,
                   overwrite: bool = False, cache_dir: str | Path | None = None,
                   progress: bool | None = None, lr_search: LRSearch | None = None) -> CVResult:
    """Train one model per fold of the training pool and score it on the fold it did not see.

    Writes ``cv.csv``, ``cv.json``, ``oof.csv`` and the fold runs into ``out_dir/name``; with
    ``keep_models`` also an ensemble bundle of the fold models, calibrated on the out-of-fold
    logits (temperature, operating points) and ``meta.metrics`` the out-of-fold figures. An
    existing run folder is refused unless ``overwrite`` (``train.run_directory``). ``lr_search``
    (``cv --lr auto``): each fold model trains at the rate the learning-rate finder suggests on that fold's
    own training images (``cv.csv`` column ``lr``; each ``fold<i>/`` holds its ``lr_find.json``).
    """
    config, runtime = pretrained_config(config or TrainConfig()), one_device(runtime or RuntimeSettings())
    progress = console.is_terminal if progress is None else progress
    run_dir = run_directory(out_dir, name, prefix="cv-", overwrite=overwrite, complete=COMPLETE_FILE)
    prepared = prepare_data(data, config, cache_dir=cache_dir, progress=progress)
    usable = prepared.samples
    pool = Samples(usable.frame.assign(split=""), usable.classes, usable.task, usable.origin)
    _check_fold_count(pool, folds)
    images, targets = np.asarray(prepared.cache.images), prepared.targets
    logits = np.zeros((len(pool), len(pool.classes)), dtype=np.float32)
    fold_of = np.full(len(pool), -1)
    multiclass = pool.task == "multiclass"
    fold_probs = np.zeros(logits.shape)  # each held-out fold's probabilities through its own model's logit transform
    fold_sets = np.zeros(logits.shape, dtype=bool)  # and its conformal sets, fitted on that model's inner validation
    rows: list[dict[str, Any]] = []
    members: list[ChestXrayNet] = []
    run_dir.mkdir(parents=True, exist_ok=True)
    for index, (train_rows, held_rows) in enumerate(kfold_splits(pool, folds, config.seed)):
        console.print(f"fold {index + 1}/{folds}: holding out {len(held_rows)} images")
        inner_train, inner_val = _inner_split(pool, train_rows, held_rows, config)
        fold = dataclasses.replace(prepared, samples=pool, train_rows=inner_train, val_rows=inner_val)
        finding = find_lr(fold, config, runtime, lr_search, progress=progress) if lr_search is not None else None
        fold_config = config if finding is None else config.replace(lr=finding.suggestion)
        if finding is not None:
            console.print(f"fold {index + 1}: learning-rate finder suggests lr {finding.suggestion:.2e}")
        model, _ = train_model(fold, fold_config, runtime, run_dir=run_dir / f"fold{index}", keep_checkpoints=False,
                               progress=progress, lr_finding=finding)
        logits[held_rows] = run_images(TorchRunner(model), images[held_rows])[0]
        fold_of[held_rows] = index
        if multiclass:
            fold_probs[held_rows], fold_sets[held_rows] = _fold_trust(model, fold, logits[held_rows], config.seed)
        rows.append({"fold": index, **_scores(logits[held_rows], targets[held_rows], pool.task),
                     **({"lr": fold_config.lr} if finding is not None else {})})
        if keep_models:
            members.append(model)
    table = pd.DataFrame(rows)
    table.to_csv(run_dir / "cv.csv", index=False)
    calibration = calibrate_outputs(logits, targets, classes=list(pool.classes), task=pool.task, seed=config.seed,
                                    fitted_on=f"out-of-fold predictions ({folds} folds, {len(targets)} images)",
                                    groups=pool.groups())
    summary = _summary(table, calibration, pool.task, config)
    if lr_search is not None:
        summary["lr_find"] = {"per_fold": table["lr"].tolist(), "min_lr": lr_search.min_lr, "max_lr": lr_search.max_lr,
                              "num_training": lr_search.num_training,
                              "note": "each fold trained at the finder's suggestion on its own training images; "
                                      "config.lr was not used"}
    if multiclass:
        summary["oof_trust"] = json_safe(_oof_trust(fold_probs, fold_sets, targets, list(pool.classes), config.seed))
    oof = _oof_frame(pool, fold_of, logits)
    oof.to_csv(run_dir / "oof.csv", index=False)
    bundle_dir = None
    if keep_models:
        bundle_dir = _save_ensemble(run_dir / "bundle", members, prepared, pool, config, summary, logits)
    write_text(run_dir / COMPLETE_FILE, json.dumps(summary, indent=2) + "\n")  # last: the run is complete
    return CVResult(run_dir, table, summary, oof, bundle_dir)


def _fold_trust(model: ChestXrayNet, fold: PreparedData, held_logits: np.ndarray,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out fold's probabilities and conformal sets as its model's own bundle would give them:
    logit transform and class-conditional sets fitted on the model's inner validation split (never on
    the held-out fold), at the default coverage."""
    images = np.asarray(fold.cache.images)[fold.val_rows]
    inner = calibrate_outputs(run_images(TorchRunner(model), images)[0], fold.targets[fold.val_rows],
                              classes=list(fold.samples.classes), task="multiclass", seed=seed,
                              fitted_on=f"inner validation split ({len(images)} images)",
                              groups=fold.samples.subset(fold.val_rows).groups())
    probs = inner.transform.probabilities(held_logits)
    return probs, ConformalSets.from_dict(inner.conformal, list(fold.samples.classes)).sets(probs)


def _oof_trust(probs: np.ndarray, sets: np.ndarray, targets: np.ndarray, classes: list[str],
               seed: int) -> dict[str, Any]:
    """Conformal coverage per class and mean set size (with intervals), and the risk-coverage accuracy
    at 80% and 50% coverage, of every image's held-out fold model (see :func:`_fold_trust`)."""
    correct, confidence = probs.argmax(1) == targets, probs.max(1)
    return {"conformal": set_metrics(sets, targets, classes, coverage=DEFAULT_COVERAGE, seed=seed),
            "at_coverage": accuracy_at_coverages(correct, confidence),
            "note": "each fold model's logit transform and class-conditional (Mondrian) LAC sets were fitted on its "
                    "inner validation split and judged on the held-out fold it never saw; risk-coverage keeps "
                    "the most confident predictions by top calibrated probability"}


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
    """Size and :data:`SCORES` (balanced accuracy: multi-class only)."""
    return dataclasses.asdict(logit_scores(logits, targets, task))


def _summary(table: pd.DataFrame, calibration: Calibration, task: str, config: TrainConfig) -> dict[str, Any]:
    """Mean and sample standard deviation over folds, pooled out-of-fold figures (NaN as ``None``)."""
    oof = dataclasses.asdict(calibration.scores) if calibration.scores is not None else {}
    if task == "multiclass":
        oof["temperature"] = calibration.temperature
        oof["loss_calibrated"] = calibration.loss_calibrated
    summary = {"folds": len(table), "mean": table[list(SCORES)].mean().to_dict(),
               "std": table[list(SCORES)].std(ddof=1).to_dict(), "oof": oof, "config": config.to_dict(),
               "note": "each fold model chose its epoch on an inner validation split of its training folds; "
                       "the held-out fold was only scored (std over folds uses ddof=1)"}
    return json_safe(summary)


def _oof_frame(pool: Samples, fold_of: np.ndarray, logits: np.ndarray) -> pd.DataFrame:
    """One row per pool image: file, truth, patient, fold and the uncalibrated probability of each class."""
    probs = logits_to_probs(logits, pool.task)
    frame = pd.DataFrame({"file": pool.frame["path"], "truth": pool.frame["label"].replace("", NO_FINDING),
                          "patient_id": pool.frame["patient_id"], "fold": fold_of})
    return pd.concat([frame, pd.DataFrame(probs, columns=pool.classes)], axis=1)


def _save_ensemble(directory: Path, members: list[ChestXrayNet], prepared: PreparedData, pool: Samples,
                   config: TrainConfig, summary: dict[str, Any], oof_logits: np.ndarray) -> Path:
    """The fold models as one bundle, calibrated on the out-of-fold logits (logit transform, operating
    points, conformal sets), with an OOD guard on the ensemble's features of the pool images.

    No held-out data is left for the ensemble itself, so each fold model's outputs on the fold it did
    not see stand in for the ensemble's (which average five models and are a little less spread).
    The guard is fitted on the features of the whole pool (each image trained 4 of the 5 members), its
    threshold set by the guard's own cross-fitting: the scores of new X-rays may sit a little higher.
    The drift reference's referral rate counts what a prediction is referred for: a set of more or
    fewer than one class, or a cross-fitted OOD score above the threshold.
    """
    ensemble = EnsembleNet(members)
    features = run_images(TorchRunner(ensemble), np.asarray(prepared.cache.images))[1]
    ood = fit_guard(features, prepared.targets)
    flags = OODGuard.from_dict(ood).is_ood(cross_fitted_scores(features, prepared.targets)) if ood else None
    calibration = dataclasses.replace(calibrate_outputs(
        oof_logits, prepared.targets, classes=list(pool.classes), task=pool.task, seed=config.seed, ood_flags=flags,
        fitted_on=f"out-of-fold predictions ({len(members)} folds, {len(oof_logits)} images)",
        groups=pool.groups()), ood=ood)
    # every pool image trained the ensemble (4 of its 5 members): none was held out from it
    meta = model_meta(pool, config, calibration, fingerprint=prepared.cache.fingerprint,
                      metrics={**summary["oof"], "evaluated_on": f"out-of-fold ({len(members)} folds)"},
                      train_paths=pool.frame["path"].tolist(), val_paths=[],
                      extra={"cv": {"folds": len(members), "mean": summary["mean"], "std": summary["std"]}})
    return save_bundle(directory, ensemble, meta)
