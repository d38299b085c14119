"""Logit transforms that calibrate a model's probabilities, and their choice by cross-validated NLL.

Pure numpy/scipy on logits ``(N, C)`` and labels (class indices ``(N,)`` or a multi-label 0/1
matrix ``(N, C)``); no model, no files. A transform maps logits ``z`` to ``z * scale + bias``
before the softmax (multi-class) or sigmoid (multi-label):

* ``none``: the model as trained;
* ``temperature``: one shared scale ``1 / T`` (Guo et al. 2017);
* ``bias``: one offset per class (the class priors of a new site);
* ``vector``: a scale and an offset per class (vector scaling; per-label Platt scaling when
  multi-label), the "logistic regression on the outputs" of a local recalibration.

:func:`choose_logit_transform` fits each candidate on ``k - 1`` folds of the held-out images it is
given, scores the NLL of the fold left out, and keeps the simplest candidate whose mean held-out
NLL is within one standard error of the best one (Breiman's one-standard-error rule), ``none``
first: a transform is adopted only when it beats the untouched model by more than the noise of
the comparison. With ``sharpen=False`` no scale may exceed 1 (temperatures of at least 1): for
held-out images of the *training* distribution, where label smoothing and mixup make the model
look under-confident and a sharpening temperature fitted there makes it over-confident on new
data, the usual case after a shift.
"""

from __future__ import annotations

__all__ = ["KINDS", "TRAIN_KINDS", "SCALE_RANGE", "BIAS_RANGE", "DEFAULT_FOLDS", "ABSENT_LOGIT", "LogitTransform",
           "TransformChoice", "per_image_nll", "fit_logit_transform", "fold_indices", "choose_logit_transform"]

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import expit, log_expit, log_softmax, softmax

from ..errors import ChestXrayError

KINDS = ("none", "temperature", "bias", "vector")
"""Every transform, simplest first (the order of the one-standard-error rule)."""
TRAIN_KINDS = ("none", "temperature", "vector")
"""The candidates for a bundle's own calibration on its validation (or out-of-fold) images."""
SCALE_RANGE = (0.05, 20.0)
BIAS_RANGE = (-20.0, 20.0)
DEFAULT_FOLDS = 5
ABSENT_LOGIT = -1e4
"""The logit of a class ruled out at a site: exp(-1e4) is 0 in float64, and no NaN arises as -inf would."""
_PRIOR = 1.0  # weight (in images) of the Gaussian prior pulling scale to 1 and bias to 0


@dataclass(frozen=True)
class LogitTransform:
    """``z * scale + bias`` on logits; ``scale`` and ``bias`` have one value per class (or are empty)."""

    kind: str = "none"
    scale: tuple[float, ...] = ()
    bias: tuple[float, ...] = ()
    absent: tuple[int, ...] = ()
    """Classes (indices) that do not occur where the model is used (a site without COVID-19 images): their
    probability is 0 and the others share what they had."""

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """The transformed logits (float64)."""
        z = np.asarray(logits, dtype=np.float64)
        if self.scale:
            z = z * np.asarray(self.scale)
        if self.bias:
            z = z + np.asarray(self.bias)
        if self.absent:
            z = z.copy() if z is logits else z
            z[..., list(self.absent)] = ABSENT_LOGIT
        return z

    def without(self, absent: tuple[int, ...] | list[int]) -> LogitTransform:
        """This transform with the classes ``absent`` (indices) ruled out."""
        return LogitTransform(self.kind, self.scale, self.bias, tuple(sorted(set(int(k) for k in absent))))

    def probabilities(self, logits: np.ndarray, task: str = "multiclass") -> np.ndarray:
        """Softmax (multi-class) or sigmoid (multi-label) of the transformed logits."""
        z = self.apply(logits)
        return expit(z) if task == "multilabel" else softmax(z, axis=1)

    @property
    def temperature(self) -> float:
        """``T`` of a temperature transform, 1 otherwise (what older readers of ``meta.temperature`` expect)."""
        return 1.0 / self.scale[0] if self.kind == "temperature" and self.scale else 1.0

    def describe(self) -> str:
        """One line, e.g. ``temperature 1.40`` or ``vector scaling (scale 0.81..1.20, bias -0.30..0.45)``."""
        ruled_out = f"; {len(self.absent)} class(es) ruled out at this site" if self.absent else ""
        if self.kind == "none":
            return "none (the model's own probabilities)" + ruled_out
        if self.kind == "temperature":
            return f"temperature {self.temperature:.2f}"
        parts = []
        if self.scale:
            parts.append(f"scale {min(self.scale):.2f}..{max(self.scale):.2f}")
        if self.bias:
            parts.append(f"bias {min(self.bias):+.2f}..{max(self.bias):+.2f}")
        return f"{self.kind} scaling ({', '.join(parts)}){ruled_out}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form, stored in the bundle's ``model.json`` under ``calibration``."""
        return {"kind": self.kind, "scale": list(self.scale), "bias": list(self.bias),
                **({"absent": list(self.absent)} if self.absent else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, n_classes: int) -> LogitTransform:
        """Rebuild from :meth:`to_dict`'s output, checking the sizes; ``None`` gives ``none``."""
        if not data:
            return cls()
        kind = data.get("kind")
        scale, bias = tuple(map(float, data.get("scale") or ())), tuple(map(float, data.get("bias") or ()))
        sizes_ok = {"none": not scale and not bias, "temperature": len(scale) == 1 and not bias,
                    "bias": not scale and len(bias) == n_classes,
                    "vector": len(scale) == n_classes and len(bias) == n_classes}
        try:
            absent = tuple(int(k) for k in data.get("absent") or ())
        except (TypeError, ValueError):
            absent = (-1,)
        if kind not in sizes_ok or not sizes_ok[kind] or any(not 0 <= k < n_classes for k in absent) \
                or len(set(absent)) >= n_classes:
            raise ChestXrayError(f"malformed calibration {data!r}: expected kind one of {', '.join(KINDS)} "
                                 f"with one scale/bias per class ({n_classes}) and fewer absent classes than that")
        return cls(kind, scale, bias, absent)

    @classmethod
    def from_temperature(cls, temperature: float) -> LogitTransform:
        """The transform of a bundle that only records ``temperature``."""
        if not temperature > 0:
            raise ChestXrayError(f"temperature must be positive, not {temperature!r}")
        return cls() if temperature == 1.0 else cls("temperature", (1.0 / float(temperature),))


@dataclass
class TransformChoice:
    """The chosen transform (fitted on all the images) and the evidence for it."""

    transform: LogitTransform
    held_out_nll: dict[str, float] = field(default_factory=dict)
    standard_error: dict[str, float] = field(default_factory=dict)
    folds: int = 0
    n: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary: the transform, each candidate's held-out NLL and the rule."""
        return {"chosen": self.transform.kind, "transform": self.transform.to_dict(),
                "description": self.transform.describe(), "held_out_nll": self.held_out_nll,
                "standard_error": self.standard_error, "folds": self.folds, "n": self.n, "note": self.note}


def _check(logits: np.ndarray, labels: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    expected = logits.shape if task == "multilabel" else logits.shape[:1]
    if logits.ndim != 2 or labels.shape != expected:
        raise ChestXrayError(f"calibration needs logits (N, C) and labels of shape {expected}, "
                             f"got {logits.shape} and {labels.shape}")
    return logits, labels.astype(np.float64 if task == "multilabel" else np.int64)


def per_image_nll(logits: np.ndarray, labels: np.ndarray, task: str = "multiclass",
                  transform: LogitTransform | None = None) -> np.ndarray:
    """Negative log-likelihood of each image (N,) under ``transform`` (summed over labels when multi-label)."""
    logits, labels = _check(logits, labels, task)
    z = (transform or LogitTransform()).apply(logits)
    if task == "multilabel":
        return -(labels * log_expit(z) + (1 - labels) * log_expit(-z)).sum(1)
    return -log_softmax(z, axis=1)[np.arange(len(labels)), labels]


def fit_logit_transform(logits: np.ndarray, labels: np.ndarray, kind: str, task: str = "multiclass", *,
                        sharpen: bool = True) -> LogitTransform:
    """The ``kind`` transform minimising the mean NLL on these images (L-BFGS-B, analytic gradient).

    A weak Gaussian prior (worth one image) pulls the scales to 1 and the biases to 0, so that a
    class with few or no images here keeps finite parameters. ``sharpen=False`` caps the scales at 1.
    """
    if kind not in KINDS:
        raise ChestXrayError(f"unknown calibration {kind!r}: use one of {', '.join(KINDS)}")
    logits, labels = _check(logits, labels, task)
    if kind == "none" or not len(logits):
        return LogitTransform()
    n, c = logits.shape
    n_scale = {"temperature": 1, "vector": c}.get(kind, 0)
    n_bias = c if kind in ("bias", "vector") else 0
    target = labels if task == "multilabel" else np.eye(c)[labels]
    weight = _PRIOR / n

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        scale = params[:n_scale] if n_scale else np.ones(1)
        bias = params[n_scale:] if n_bias else np.zeros(1)
        z = logits * scale + bias
        if task == "multilabel":
            value = -(target * log_expit(z) + (1 - target) * log_expit(-z)).sum(1).mean()
            dz = (expit(z) - target) / n
        else:
            log_p = log_softmax(z, axis=1)
            value = -(target * log_p).sum(1).mean()
            dz = (np.exp(log_p) - target) / n
        grad = []
        if n_scale:
            grad.append((dz * logits).sum() if n_scale == 1 else (dz * logits).sum(0))
        if n_bias:
            grad.append(dz.sum(0))
        value += weight * (((scale - 1) ** 2).sum() * bool(n_scale) + (bias**2).sum() * bool(n_bias))
        gradient = np.concatenate([np.atleast_1d(g) for g in grad])
        gradient += 2 * weight * np.concatenate([(scale - 1) if n_scale else [], bias if n_bias else []])
        return float(value), gradient

    high = 1.0 if not sharpen else SCALE_RANGE[1]
    bounds = [(SCALE_RANGE[0], high)] * n_scale + [BIAS_RANGE] * n_bias
    start = np.concatenate([np.ones(n_scale), np.zeros(n_bias)])
    from scipy.optimize import minimize  # not at import: the prediction path never fits

    result = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    params = np.clip(result.x, [b[0] for b in bounds], [b[1] for b in bounds])
    scale = tuple(float(v) for v in params[:n_scale])
    bias = tuple(float(v) for v in params[n_scale:])
    return LogitTransform(kind, scale, bias)


def fold_indices(labels: np.ndarray, folds: int, seed: int = 0,
                 groups: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(fit rows, held-out rows)`` of a stratified (multi-class) k-fold, patient-grouped when ``groups``.

    Each row is held out exactly once. Fewer folds than asked when the smallest class is smaller.
    """
    from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    if labels.ndim == 1:
        counts = np.bincount(labels)
        folds = min(folds, int(counts[counts > 0].min()))
    folds = min(folds, len(labels))
    grouped = groups is not None and len(set(groups)) < len(groups)
    if grouped:
        folds = min(folds, len(set(groups)))  # a fold per patient at most (sklearn raises beyond)
    if folds < 2:
        return []
    if labels.ndim != 1:
        return list(KFold(folds, shuffle=True, random_state=seed).split(rows))
    if grouped:
        return list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(rows, labels, groups))
    return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(rows, labels))


def choose_logit_transform(logits: np.ndarray, labels: np.ndarray, task: str = "multiclass", *,
                           kinds: tuple[str, ...] = TRAIN_KINDS, folds: int = DEFAULT_FOLDS, seed: int = 0,
                           sharpen: bool = True, groups: np.ndarray | None = None) -> TransformChoice:
    """Choose among ``kinds`` by cross-validated NLL on these held-out images; fit the choice on all of them.

    Every candidate is fitted on ``folds - 1`` folds and scored on the fold left out; the simplest
    candidate (in :data:`KINDS` order) whose mean held-out NLL is within one standard error of the
    lowest is kept, so ``none`` stays unless a transform beats it clearly. Too few images for two
    folds keep ``none``.
    """
    logits, labels = _check(logits, labels, task)
    kinds = tuple(k for k in KINDS if k in kinds)
    if "none" not in kinds:
        kinds = ("none", *kinds)
    splits = fold_indices(labels, folds, seed, groups)
    if not splits:
        return TransformChoice(LogitTransform(), n=len(labels),
                               note="too few images per class for a cross-validated choice: kept none")
    held = {kind: np.empty(len(labels)) for kind in kinds}
    for fit_rows, test_rows in splits:
        for kind in kinds:
            transform = fit_logit_transform(logits[fit_rows], labels[fit_rows], kind, task, sharpen=sharpen)
            held[kind][test_rows] = per_image_nll(logits[test_rows], labels[test_rows], task, transform)
    mean = {kind: float(values.mean()) for kind, values in held.items()}
    best = min(kinds, key=lambda k: mean[k])
    # standard error of each candidate's paired difference from the best, image by image
    error = {kind: float(np.std(held[kind] - held[best], ddof=1) / np.sqrt(len(labels))) if len(labels) > 1 else 0.0
             for kind in kinds}
    chosen = next(kind for kind in kinds if mean[kind] <= mean[best] + error[kind])
    transform = fit_logit_transform(logits, labels, chosen, task, sharpen=sharpen)
    note = (f"{len(splits)}-fold cross-validated NLL on {len(labels)} held-out images; the simplest transform "
            f"within one standard error of the best ({best}) was kept"
            + ("" if sharpen else "; scales capped at 1 (no sharpening: held-out images of the training "
                                  "distribution look under-confident under label smoothing and mixup)"))
    return TransformChoice(transform, mean, error, len(splits), len(labels), note)
