"""Classification metrics with stratified bootstrap intervals, and calibration.

scikit-learn and the heavier parts of scipy are imported inside the functions that use them, so that
prediction (which needs only :func:`logits_to_probs`) starts fast.

Everything works on plain arrays: ``y_true`` holds class indices ``(N,)`` (multiclass) or a 0/1
matrix ``(N, C)`` (multi-label), ``probs`` holds probabilities ``(N, C)``. The returned dicts are
JSON-serialisable: undefined values (an AUC for a class with no positives) are ``None``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit, log_softmax, softmax

from chestxray.constants import MULTILABEL_THRESHOLD
from chestxray.errors import ChestXrayError

__all__ = ["json_number", "json_safe", "bootstrap_ci", "classification_metrics", "multilabel_metrics",
           "interval_text", "accuracy_interval_text", "reliability_curve", "expected_calibration_error",
           "LogitScores", "logit_scores", "logits_to_probs", "fit_temperature", "positives_matrix",
           "operating_points", "at_operating_points", "proportion_interval", "risk_coverage",
           "accuracy_at_coverage", "accuracy_at_coverages", "COVERAGE_LEVELS"]

MetricFn = Callable[[np.ndarray, np.ndarray], float]

TEMPERATURE_RANGE = (0.05, 20.0)
TARGET_SENSITIVITIES = (0.90, 0.95)
_CLASS_AUC = "roc_auc/"  # keys of per-class AUC resamples, moved into the per-class table
_BATCH_ELEMENTS = 2_000_000  # resamples are evaluated in batches of about this many indices


PROBABILITY_DECIMALS = 4
"""Decimals of a probability in every result a user reads (CLI JSON and CSV, REST, worklist, audit)."""
PERCENTILE_DECIMALS = 1
"""Decimals of an OOD percentile (0-100) in every result."""
SCORE_DECIMALS = 2
"""Decimals of an OOD score in every result."""


def rounded(value: float | None, decimals: int) -> float | None:
    """``value`` rounded for a result, ``None`` (not checked) for ``None`` or NaN."""
    if value is None or value != value:
        return None
    return round(float(value), decimals)


def json_number(value: float) -> float | None:
    """A plain float for JSON, ``None`` for NaN."""
    return None if np.isnan(value) else float(value)


def json_safe(value: Any) -> Any:
    """``value`` (nested dicts and lists) with NaN as ``None`` and numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN (without a warning) where a row has none."""
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite, values, 0.0).sum(-1) / finite.sum(-1)


def _check_probs(y_true: np.ndarray, probs: np.ndarray, classes: list[str], multilabel: bool) -> None:
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ChestXrayError(f"probabilities must have shape (N, {len(classes)}), got {probs.shape}")
    expected = probs.shape if multilabel else probs.shape[:1]
    if y_true.shape != expected:
        raise ChestXrayError(f"labels must have shape {expected}, got {y_true.shape}")
    if len(y_true) == 0:
        raise ChestXrayError("no samples to evaluate")
    if multilabel and not np.isin(y_true, (0, 1)).all():
        raise ChestXrayError("multi-label targets must be 0 or 1")
    if not multilabel and (y_true.min() < 0 or y_true.max() >= len(classes)):
        raise ChestXrayError(f"labels must be class indices in 0..{len(classes) - 1}")


# ----------------------------------------------------------------------------- bootstrap


def _index_batches(
    y_true: np.ndarray, n_boot: int, seed: int, stratified: bool
) -> Iterator[np.ndarray]:
    """Bootstrap index arrays, stacked into ``(batch, N)`` blocks.

    Resample ``b`` draws, for each true class in ascending order, ``rng.integers(0, n_c, n_c)``
    positions among that class's samples (or ``rng.integers(0, N, N)`` when not stratified), so
    class counts stay fixed and the draws do not depend on the batch size.
    """
    if stratified and y_true.ndim != 1:
        raise ChestXrayError("a stratified bootstrap needs one class index per sample")
    rng = np.random.default_rng(seed)
    if stratified:
        groups = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    else:
        groups = [np.arange(len(y_true))]
    batch_size = max(1, _BATCH_ELEMENTS // len(y_true))
    for start in range(0, n_boot, batch_size):
        yield np.stack([
            np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
            for _ in range(min(batch_size, n_boot - start))
        ])


def _percentile_interval(values: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval of bootstrap values, ignoring NaN resamples."""
    if np.isnan(values).all():
        return float("nan"), float("nan")
    # rounding keeps e.g. 2.5 exactly 2.5 instead of 2.5000000000000022
    low, high = np.nanpercentile(values, np.round([50 * (1 - ci), 50 * (1 + ci)], 10))
    return float(low), float(high)


def bootstrap_ci(
    metric_fn: MetricFn,
    y_true: np.ndarray,
    probs: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    stratified: bool = True,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(y_true, probs)``.

    Stratified: each resample draws with replacement within every true class, keeping class
    counts. Resamples where the metric is NaN are ignored.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    values = np.array([
        metric_fn(y_true[idx], probs[idx])
        for batch in _index_batches(y_true, n_boot, seed, stratified)
        for idx in batch
    ], dtype=float)
    return _percentile_interval(values, ci)


def _resampled_macro_auc(idx: np.ndarray, positives: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Mean one-vs-rest ROC-AUC of each resample row of ``idx`` (Mann-Whitney U with tie ranks).

    Labels with no positives or no negatives in a resample are left out of its mean.
    """
    return _nanmean_rows(_resampled_aucs(idx, positives, probs))


def _resampled_aucs(idx: np.ndarray, positives: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC-AUC (B, C) of each label in each resample row of ``idx``; NaN where undefined."""
    from scipy.stats import rankdata

    aucs = np.empty((len(idx), probs.shape[1]))
    for k in range(probs.shape[1]):
        is_pos = positives[idx, k]
        n_pos = is_pos.sum(1)
        n_neg = idx.shape[1] - n_pos
        rank_sum = np.where(is_pos, rankdata(probs[idx, k], axis=1), 0.0).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs[:, k] = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
        aucs[(n_pos == 0) | (n_neg == 0), k] = np.nan
    return aucs


def _resampled_multiclass(idx: np.ndarray, y_true: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro F1 and macro AUC of each resample row of ``idx``."""
    n_classes = probs.shape[1]
    truth, pred = y_true[idx], probs.argmax(1)[idx]
    recall, f1 = np.empty((len(idx), n_classes)), np.empty((len(idx), n_classes))
    for k in range(n_classes):
        is_true, is_pred = truth == k, pred == k
        tp, n_true, n_pred = (is_true & is_pred).sum(1), is_true.sum(1), is_pred.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall[:, k] = tp / n_true  # NaN for a class absent from the resample, as sklearn
            f1[:, k] = np.where(n_true + n_pred > 0, 2 * tp / (n_true + n_pred), 0.0)
    aucs = _resampled_aucs(idx, np.eye(n_classes, dtype=bool)[y_true], probs)
    return {
        "accuracy": (truth == pred).mean(1),
        "balanced_accuracy": _nanmean_rows(recall),
        "macro_f1": f1.mean(1),
        "macro_auc": _nanmean_rows(aucs),
        **{f"{_CLASS_AUC}{k}": aucs[:, k] for k in range(n_classes)},
    }


def _bootstrap_intervals(
    resample_fn: Callable[[np.ndarray], dict[str, np.ndarray]],
    y_true: np.ndarray, n_boot: int, seed: int, ci: float, stratified: bool,
) -> dict[str, list[float | None]]:
    """Intervals of every metric ``resample_fn`` computes on a batch of resample indices."""
    batches = [resample_fn(idx) for idx in _index_batches(y_true, n_boot, seed, stratified)]
    return {
        name: [json_number(v) for v in _percentile_interval(np.concatenate([b[name] for b in batches]), ci)]
        for name in batches[0]
    }


# ----------------------------------------------------------------------------- metrics


def _binary_scores(is_pos: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """ROC-AUC and average precision of one label; NaN when it has a single class."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if is_pos.all() or not is_pos.any():
        return float("nan"), float("nan")
    return roc_auc_score(is_pos, scores), average_precision_score(is_pos, scores)


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Multiclass metrics, per-class table, confusion matrix, ECE and stratified bootstrap CIs.

    ``y_true`` holds class indices ``(N,)``, ``probs`` softmax probabilities ``(N, C)``.
    Classes absent from ``y_true`` get ``None`` AUCs and are left out of ``macro_auc``.
    """
    from sklearn.metrics import (
        accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, log_loss, precision_recall_fscore_support)

    y_true, probs = np.asarray(y_true).astype(int), np.asarray(probs, dtype=float)
    _check_probs(y_true, probs, classes, multilabel=False)
    labels = list(range(len(classes)))
    pred = probs.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, pred, labels=labels, zero_division=0
    )
    cm = confusion_matrix(y_true, pred, labels=labels)
    intervals = _bootstrap_intervals(
        lambda idx: _resampled_multiclass(idx, y_true, probs), y_true, n_boot, seed, ci, stratified=True)
    false_pos = cm.sum(0) - cm.diagonal()
    true_neg = len(y_true) - cm.sum(1) - false_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        specificity = true_neg / (true_neg + false_pos)
    auc, pr_auc = np.array([_binary_scores(y_true == k, probs[:, k]) for k in labels]).T
    per_class = {
        name: {
            "precision": float(precision[k]),
            "sensitivity": float(recall[k]),
            "specificity": json_number(specificity[k]),
            "f1": float(f1[k]),
            "roc_auc": json_number(auc[k]),
            "pr_auc": json_number(pr_auc[k]),
            "support": int(support[k]),
            # Wilson intervals of the proportions; a stratified bootstrap for the AUC
            "precision_ci": proportion_interval(int(cm[k, k]), int(cm[:, k].sum()), ci)[1],
            "sensitivity_ci": proportion_interval(int(cm[k, k]), int(support[k]), ci)[1],
            "specificity_ci": proportion_interval(int(true_neg[k]), int(true_neg[k] + false_pos[k]), ci)[1],
            "roc_auc_ci": intervals.pop(f"{_CLASS_AUC}{k}") if not np.isnan(auc[k]) else [None, None],
        }
        for k, name in enumerate(classes)
    }
    intervals = {name: value for name, value in intervals.items() if not name.startswith(_CLASS_AUC)}
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "cross_entropy": float(log_loss(y_true, probs, labels=labels)),
        "macro_f1": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, pred, labels=labels, average="weighted", zero_division=0)),
        "macro_auc": json_number(_nanmean_rows(auc)),
        "ece": expected_calibration_error(y_true, probs),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "ci_level": ci,
        "ci": intervals,
        "bootstrap": f"stratified (class counts fixed), {n_boot} resamples, percentile intervals",
    }


def multilabel_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Multi-label metrics: per-label AUC, average precision and F1 at 0.5; mean AUC with CI.

    ``y_true`` is a 0/1 matrix ``(N, C)``, ``probs`` sigmoid outputs ``(N, C)``. The bootstrap
    resamples whole samples (not stratified); labels with a single class get ``None`` AUCs.
    """
    from sklearn.metrics import f1_score

    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    _check_probs(y_true, probs, classes, multilabel=True)
    y_true = y_true.astype(bool)
    auc, pr_auc = np.array([_binary_scores(y_true[:, k], probs[:, k]) for k in range(len(classes))]).T
    per_label = {
        name: {
            "roc_auc": json_number(auc[k]),
            "pr_auc": json_number(pr_auc[k]),
            "f1": float(f1_score(y_true[:, k], probs[:, k] >= MULTILABEL_THRESHOLD, zero_division=0)),
            "support": int(y_true[:, k].sum()),
        }
        for k, name in enumerate(classes)
    }
    return {
        "n": len(y_true),
        "mean_auc": json_number(_nanmean_rows(auc)),
        "per_label": per_label,
        "ci_level": ci,
        "ci": _bootstrap_intervals(
            lambda idx: {"mean_auc": _resampled_macro_auc(idx, y_true, probs)},
            y_true, n_boot, seed, ci, stratified=False,
        ),
        "bootstrap": f"whole images resampled (not stratified: several labels per image), {n_boot} resamples",
    }


def interval_text(metrics: dict[str, Any], name: str, percent: bool = True) -> str:
    """``metrics[name]`` with its bootstrap interval, e.g. ``"95.0% (95% CI 85.0–100.0%)"``."""
    value, (low, high) = metrics[name], metrics["ci"][name]
    if value is None:
        return "n/a"
    fmt = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.3f}")
    unit = "%" if percent else ""
    if low is None:
        return f"{fmt(value)}{unit}"
    return f"{fmt(value)}{unit} ({100 * metrics['ci_level']:g}% CI {fmt(low)}–{fmt(high)}{unit})"


def accuracy_interval_text(metrics: dict[str, Any]) -> str:
    """Headline accuracy with its interval, e.g. ``"95.0% (95% CI 85.0–100.0%)"``."""
    return interval_text(metrics, "accuracy")


# ----------------------------------------------------------------------------- calibration


def reliability_curve(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict[str, list]:
    """Mean confidence (max probability), accuracy and count in equal-width confidence bins.

    Bin ``i`` holds confidences in ``(i/n_bins, (i+1)/n_bins]``; empty bins give ``None``.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    confidence = probs.max(1)
    correct = probs.argmax(1) == y_true
    bins = np.digitize(confidence, np.linspace(0, 1, n_bins + 1)[1:-1], right=True)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, confidence, n_bins) / count
        accuracy = np.bincount(bins, correct, n_bins) / count
    return {
        "bin_confidence": [json_number(v) for v in mean_conf],
        "bin_accuracy": [json_number(v) for v in accuracy],
        "bin_count": count.tolist(),
    }


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Count-weighted mean gap between accuracy and confidence over equal-width bins."""
    curve = reliability_curve(y_true, probs, n_bins)
    count = np.array(curve["bin_count"])
    gap = np.abs(np.array(curve["bin_accuracy"], dtype=float) - np.array(curve["bin_confidence"], dtype=float))
    return float(np.nansum(gap * count) / count.sum())


@dataclass(frozen=True)
class LogitScores:
    """Quick figures of raw logits against their targets: the validation figures of every epoch, of
    calibration and of each cross-validation fold (NaN where undefined; the AUC averages the classes the targets hold).

    ``loss`` is the cross-entropy (multi-class) or the binary cross-entropy (multi-label) of the
    logits; ``accuracy`` the share of right arg-maxes (multi-label: of right labels at 0.5);
    ``balanced_accuracy`` the mean recall (multi-class only); ``macro_auc`` the one-vs-rest macro ROC-AUC.
    """

    n: int
    loss: float
    accuracy: float
    balanced_accuracy: float
    macro_auc: float


def _tensor(values: Any) -> Any:
    """``torch.as_tensor``, copying a read-only array (a cache's, a memory map) that torch warns about."""
    import torch

    if isinstance(values, np.ndarray) and not values.flags.writeable:
        values = values.copy()
    return torch.as_tensor(values)


def logit_scores(logits: np.ndarray, targets: np.ndarray, task: str) -> LogitScores:
    """:class:`LogitScores` of ``logits`` (N, C) for class indices (N,) or a 0/1 matrix (N, C) (``task`` multilabel)."""
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    logits_t, targets_t = _tensor(logits).float(), _tensor(targets)
    if task == "multilabel":
        loss = F.binary_cross_entropy_with_logits(logits_t, targets_t.float()).item()
        probs, truth = logits_t.sigmoid().numpy(), targets_t.numpy()
        accuracy = float(((probs >= MULTILABEL_THRESHOLD) == (truth >= MULTILABEL_THRESHOLD)).mean())
        present = [c for c in range(truth.shape[1]) if 0 < truth[:, c].sum() < len(truth)]
        auc = float(np.mean([roc_auc_score(truth[:, c], probs[:, c]) for c in present])) if present else np.nan
        return LogitScores(len(truth), loss, accuracy, np.nan, auc)
    loss = F.cross_entropy(logits_t, targets_t).item()
    probs, truth = logits_t.softmax(-1).numpy(), targets_t.numpy()
    accuracy = float((probs.argmax(1) == truth).mean())
    # macro one-vs-rest AUC over the classes these targets hold (sklearn's "ovr" when every class is there);
    # a class without images here (ruled out at a site) has no AUC and is not averaged as NaN
    present = [c for c in range(probs.shape[1]) if 0 < int((truth == c).sum()) < len(truth)]
    if probs.shape[1] == 2:
        present = present[1:] if len(present) == 2 else []
    auc = float(np.mean([roc_auc_score(truth == c, probs[:, c]) for c in present])) if present else np.nan
    with warnings.catch_warnings():  # a class absent from a small validation set is expected
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(truth, np.asarray(logits).argmax(1)))
    return LogitScores(len(truth), loss, accuracy, balanced, auc)


def logits_to_probs(logits: np.ndarray, task: str, temperature: float = 1.0) -> np.ndarray:
    """Softmax (multi-class) or sigmoid (multi-label) of ``logits / temperature``, float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    return expit(scaled) if task == "multilabel" else softmax(scaled, axis=1)


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature ``T`` minimising the NLL of ``softmax(logits / T)``, within ``TEMPERATURE_RANGE``."""
    from scipy.optimize import minimize_scalar

    logits, y_true = np.asarray(logits, dtype=float), np.asarray(y_true).astype(int)
    if logits.ndim != 2 or y_true.shape != logits.shape[:1]:
        raise ChestXrayError(f"logits must be (N, C) with one label each, got {logits.shape} and {y_true.shape}")
    rows = np.arange(len(y_true))

    def nll(log_t: float) -> float:
        return -log_softmax(logits / np.exp(log_t), axis=1)[rows, y_true].mean()

    low, high = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded")
    return float(np.clip(np.exp(result.x), *TEMPERATURE_RANGE))


# ----------------------------------------------------------------------------- operating points


def positives_matrix(y_true: np.ndarray, n_classes: int) -> np.ndarray:
    """Boolean ``(N, C)`` truth: one-hot of class indices, or the multi-label 0/1 matrix as is."""
    y_true = np.asarray(y_true)
    return np.eye(n_classes, dtype=bool)[y_true.astype(int)] if y_true.ndim == 1 else y_true.astype(bool)


def operating_points(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                     sensitivities: tuple[float, ...] = TARGET_SENSITIVITIES) -> dict[str, dict[str, float]]:
    """Per class, thresholds on its probability chosen on this (validation) data, one-vs-rest.

    ``youden``: the threshold maximising sensitivity + specificity; ``sensitivity_90`` etc.: the
    highest threshold whose sensitivity here is at least the target. A case is called positive when
    its probability is at or above the threshold. Classes without positives or negatives are left out.
    Choose them on validation data and judge them on other data (:func:`at_operating_points`).
    """
    from sklearn.metrics import roc_curve

    positives, probs = positives_matrix(y_true, len(classes)), np.asarray(probs, dtype=float)
    points: dict[str, dict[str, float]] = {}
    for k, name in enumerate(classes):
        is_pos = positives[:, k]
        if is_pos.all() or not is_pos.any():
            continue
        fpr, tpr, thresholds = roc_curve(is_pos, probs[:, k])
        finite = np.isfinite(thresholds)
        best = np.argmax(np.where(finite, tpr - fpr, -np.inf))
        points[name] = {"youden": float(thresholds[best])}
        ranked = np.sort(probs[is_pos, k])[::-1]
        for target in sensitivities:
            needed = int(np.ceil(target * len(ranked) - 1e-9))
            points[name][f"sensitivity_{round(100 * target)}"] = float(ranked[max(needed, 1) - 1])
    return points


def at_operating_points(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                        points: dict[str, dict[str, float]], ci: float = 0.95) -> dict[str, dict[str, Any]]:
    """Sensitivity and specificity (with Wilson intervals) of each class at each of its ``points``."""
    positives, probs = positives_matrix(y_true, len(classes)), np.asarray(probs, dtype=float)
    results: dict[str, dict[str, Any]] = {}
    for name, thresholds in points.items():
        if name not in classes:
            continue
        k = classes.index(name)
        is_pos = positives[:, k]
        results[name] = {}
        for point, threshold in thresholds.items():
            called = probs[:, k] >= threshold
            sens, sens_ci = proportion_interval(int(called[is_pos].sum()), int(is_pos.sum()), ci)
            spec, spec_ci = proportion_interval(int((~called[~is_pos]).sum()), int((~is_pos).sum()), ci)
            results[name][point] = {"threshold": threshold, "sensitivity": sens, "sensitivity_ci": sens_ci,
                                    "specificity": spec, "specificity_ci": spec_ci,
                                    "positives": int(is_pos.sum()), "negatives": int((~is_pos).sum())}
    return results


def proportion_interval(successes: int, trials: int, ci: float = 0.95) -> tuple[float | None, list[float | None]]:
    """``successes / trials`` with its Wilson score interval; ``None`` when there are no trials."""
    from scipy.stats import binomtest

    if not trials:
        return None, [None, None]
    interval = binomtest(successes, trials).proportion_ci(confidence_level=ci, method="wilson")
    return successes / trials, [float(interval.low), float(interval.high)]


# ----------------------------------------------------------------------------- selective prediction


def risk_coverage(correct: np.ndarray, confidence: np.ndarray) -> dict[str, list[float]]:
    """Accuracy on the predictions kept against the share kept, keeping the most confident first.

    ``correct`` (N,) bool, ``confidence`` (N,) (e.g. the top probability). Point ``k`` keeps the
    ``k + 1`` most confident images (ties broken by input order).
    """
    correct, confidence = np.asarray(correct, dtype=float), np.asarray(confidence, dtype=float)
    if correct.shape != confidence.shape or correct.ndim != 1:
        raise ChestXrayError(f"risk-coverage: need one confidence per prediction, got {confidence.shape} "
                             f"and {correct.shape}")
    order = np.argsort(-confidence, kind="stable")
    kept = np.arange(1, len(order) + 1)
    return {"coverage": (kept / max(1, len(order))).tolist(),
            "accuracy": (np.cumsum(correct[order]) / kept).tolist()}


COVERAGE_LEVELS = (0.8, 0.5)
"""Shares of the most confident predictions at which the risk-coverage accuracy is reported."""


def accuracy_at_coverages(correct: np.ndarray, confidence: np.ndarray,
                          levels: tuple[float, ...] = COVERAGE_LEVELS) -> dict[str, dict[str, Any]]:
    """:func:`accuracy_at_coverage` at each of ``levels``, keyed ``"80%"``, ``"50%"``."""
    return {f"{round(100 * level)}%": accuracy_at_coverage(correct, confidence, level) for level in levels}


def accuracy_at_coverage(correct: np.ndarray, confidence: np.ndarray, share: float,
                         ci: float = 0.95) -> dict[str, Any]:
    """Accuracy (Wilson interval) of the ``share`` most confident predictions (at least one)."""
    correct, confidence = np.asarray(correct, dtype=bool), np.asarray(confidence, dtype=float)
    kept = max(1, int(round(share * len(correct)))) if len(correct) else 0
    chosen = np.argsort(-confidence, kind="stable")[:kept]
    accuracy, interval = proportion_interval(int(correct[chosen].sum()), kept, ci)
    return {"coverage": share, "kept": kept, "accuracy": accuracy, "accuracy_ci": interval}
