"""Stratified train/validation splits and k-fold, grouped by patient so no patient is on both sides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import ChestXrayError
from .sources import Samples
from ..storage import atomic_path

__all__ = ["stratify_labels", "kfold_splits", "train_val_split", "save_split", "load_split"]


def stratify_labels(samples: Samples) -> np.ndarray:
    """The label each sample is stratified on (multi-label rows: their label combination)."""
    return samples.frame["label"].replace("", "none").to_numpy()


def kfold_splits(samples: Samples, k: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, patient-grouped k-fold: ``k`` pairs of (train rows, validation rows)."""
    if k < 2:
        raise ChestXrayError(f"k-fold needs at least 2 folds, not {k}")
    labels = stratify_labels(samples)
    _check_class_sizes(samples)
    groups = samples.groups()
    patients = len(np.unique(groups))
    if patients < k:
        raise ChestXrayError(f"{samples.origin or 'data'}: {patients} patient(s) cannot be split {k} ways, and no "
                             "patient may be on both sides of a split: add images of other patients, or use fewer "
                             "folds (a larger --val-fraction)")
    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(np.sort(train), np.sort(val)) for train, val in folds.split(labels, labels, groups)]


def train_val_split(samples: Samples, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows for training and validation.

    Rows of the ``test`` split are never used. A ``val`` split given by the data is used as is;
    otherwise ``val_fraction`` of the other rows is held out, stratified by class and grouped by
    patient (the first fold of a k-fold with ``k = round(1 / val_fraction)``), deterministic for a
    given ``seed``.
    """
    split = samples.frame["split"].to_numpy()
    if (split == "val").any():
        return np.flatnonzero((split != "val") & (split != "test")), np.flatnonzero(split == "val")
    if not 0.0 < val_fraction < 1.0:
        raise ChestXrayError(f"validation fraction must be between 0 and 1, not {val_fraction}")
    pool = np.flatnonzero(split != "test")
    train, val = kfold_splits(samples.subset(pool), max(2, round(1.0 / val_fraction)), seed)[0]
    return pool[train], pool[val]


def save_split(path: str | Path, samples: Samples, assignment: dict[str, np.ndarray]) -> Path:
    """Write which file went where (``path,label,patient_id,subset``) so a run can be reproduced."""
    parts = [samples.frame.iloc[rows][["path", "label", "patient_id"]].assign(subset=name)
             for name, rows in assignment.items()]
    with atomic_path(path) as tmp:
        pd.concat(parts).to_csv(tmp, index=False)
    return Path(path)


def load_split(path: str | Path, samples: Samples) -> dict[str, np.ndarray]:
    """Read a split file written by :func:`save_split` back into row indices of ``samples``."""
    table = _read_split(path)
    row_of = {p: i for i, p in enumerate(samples.frame["path"])}
    missing = [p for p in table["path"] if p not in row_of]
    if missing:
        raise ChestXrayError(f"{path}: {len(missing)} file(s) of the split are not in the data, e.g. {missing[0]}")
    return {name: np.array([row_of[p] for p in group["path"]]) for name, group in table.groupby("subset")}


def split_files(path: str | Path, subset: str) -> list[str]:
    """The files of one subset (``"train"``, ``"val"``) of a split file written by :func:`save_split`."""
    table = _read_split(path)
    return table.loc[table["subset"] == subset, "path"].tolist()


def _read_split(path: str | Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise ChestXrayError(f"{path}: cannot read the split file ({str(err).splitlines()[0]})") from None
    if not {"path", "subset"} <= set(table.columns):
        raise ChestXrayError(f"{path}: not a split file (needs the columns path and subset)")
    return table


def _check_class_sizes(samples: Samples) -> None:
    """Refuse classes with a single image (for multi-label data: a single positive image)."""
    if samples.task == "multilabel":
        values, counts = samples.classes, samples.targets().sum(axis=0).astype(int)
    else:
        values, counts = np.unique(samples.frame["label"].to_numpy(), return_counts=True)
    too_small = [f"{v!r} ({c})" for v, c in zip(values, counts) if c == 1]
    if too_small:
        raise ChestXrayError(f"{samples.origin or 'data'}: class {', '.join(too_small)} has fewer than 2 images; "
                             "a stratified split needs at least 2 per class (add images or remove the class)")
