"""Evaluate a bundle on labelled data: metrics with bootstrap intervals, calibration, OOD flags,
Grad-CAM of the most confident errors, and a self-contained HTML report.

``out_dir`` receives ``metrics.json`` (the metrics of :func:`~chestxray.metrics.classification_metrics`
or :func:`~chestxray.metrics.multilabel_metrics` plus what was evaluated), ``predictions.csv`` (one
row per image) and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..data.cache import build_cache
from ..stats.conformal import set_metrics
from ..constants import MULTILABEL_THRESHOLD, SET_SEPARATOR
from ..errors import ChestXrayError, InputError
from ..stats.metrics import (
    COVERAGE_LEVELS,
    accuracy_at_coverages,
    at_operating_points,
    classification_metrics,
    expected_calibration_error,
    interval_text,
    multilabel_metrics,
    proportion_interval,
    risk_coverage,
)
from ..trust.lineage import check_seen
from ..model.modelcard import render_model_card
from ..trust.referral import refer_mask
from .predict import NOT_CHECKED, Predictor, load_model
from .report import calibration_verdict, write_report
from ..model.runners import DEFAULT_BATCH
from ..data.sources import NO_FINDING, SPLIT_NAMES, Samples, load_samples
from ..storage import atomic_path, make_folder, write_text

__all__ = ["EvaluationResult", "evaluate", "headline"]

SPLITS = ("auto", "all", *SPLIT_NAMES)
_CURVE_POINTS = 200
MISUSE_NOTE = (
    "Use it only on images like its training images: it has not been validated on other populations "
    "(e.g. adults vs children), hospitals, devices or views, and must not be used for clinical decisions."
)


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured and wrote."""

    out_dir: Path
    metrics: dict[str, Any]
    classes: list[str]
    task: str
    split: str
    n_evaluated: int
    n_ood: int | None
    """Images flagged out of distribution; ``None``: not checked (the bundle has no guard)."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def files(self) -> dict[str, Path]:
        """The files written: ``metrics``, ``predictions``, ``report``."""
        return {"metrics": self.out_dir / "metrics.json", "predictions": self.out_dir / "predictions.csv",
                "report": self.out_dir / "report.html"}


def evaluate(bundle: str | Path | Predictor, data: str | Path, out_dir: str | Path, *, split: str = "auto",
             n_boot: int = 1000, seed: int = 0, cam_gallery: int = 8, batch_size: int = DEFAULT_BATCH,
             cache_dir: str | Path | None = None, progress: bool = True, overwrite: bool = False,
             source_options: Mapping[str, str] | None = None) -> EvaluationResult:
    """Evaluate ``bundle`` (a bundle folder or a loaded :class:`Predictor`) on ``data`` (anything
    :func:`~chestxray.sources.load_samples` reads, with ``source_options`` as its ``format`` and policies).

    ``split``: ``"auto"`` takes the ``test`` split when the data has one, else every image; or
    ``"all"``, ``"train"``, ``"val"``, ``"test"``. Classes are matched by name (the order may
    differ); a class of the data unknown to the model is an error. Unreadable images are counted,
    listed in ``metrics.json`` and left out of the metrics. A complete earlier evaluation in
    ``out_dir`` (its ``report.html``, written last, is there) is refused unless ``overwrite``; an
    incomplete one (a run killed before its report) is replaced, and the result's warnings say so.
    """
    files = EvaluationResult(Path(out_dir), {}, [], "", "", 0, 0).files
    existing = [path.name for path in files.values() if path.exists()]
    if files["report"].exists() and not overwrite:
        raise ChestXrayError(f"{out_dir} already holds an evaluation ({', '.join(existing)}); choose another --out "
                             "or replace it with --overwrite")
    replaced = [] if files["report"].exists() else existing
    predictor = bundle if isinstance(bundle, Predictor) else load_model(bundle)
    make_folder(out_dir, "evaluation folder")  # before the work: a folder that cannot be made loses nothing
    samples, split = _select(load_samples(data, **(source_options or {})), split, data)
    samples = samples.with_classes(predictor.classes, task=predictor.meta.task, known_as="model's")
    cache = build_cache(samples, predictor.preprocessing, cache_dir=cache_dir, progress=progress)
    failed = [(samples.frame["path"].iloc[row], reason) for row, reason in sorted(cache.failed.items())]
    ok = cache.ok
    if not ok.any():
        raise ChestXrayError(f"{data}: none of the {len(samples)} images could be read (first: {': '.join(failed[0])})")
    images = np.asarray(cache.images)[ok]
    y_true = samples.targets()[ok]
    logits, features = predictor.forward_arrays(images, batch_size)
    probs = predictor.probabilities(logits)
    scores = predictor.ood_scores(features)
    flags = predictor.guard.is_ood(scores) if predictor.guard is not None else np.zeros(len(scores), bool)

    multilabel = predictor.meta.task == "multilabel"
    if multilabel:
        metrics = multilabel_metrics(y_true, probs, predictor.classes, n_boot=n_boot, seed=seed)
        before = None
    else:
        metrics = classification_metrics(y_true, probs, predictor.classes, n_boot=n_boot, seed=seed)
        before = {"ece": expected_calibration_error(y_true, predictor.probabilities(logits, calibrated=False)),
                  "transform": predictor.calibration.describe()}
    if predictor.meta.operating_points:  # thresholds fixed on validation, judged here
        metrics["operating_points"] = at_operating_points(y_true, probs, predictor.classes,
                                                          predictor.meta.operating_points)
    files = samples.frame["path"].to_numpy()[ok]
    sets = None if multilabel else predictor.prediction_sets(probs)
    headers = [_header_reasons(predictor, f) for f in files]
    metrics["conformal"] = None if sets is None else {
        **set_metrics(sets, y_true, predictor.classes, coverage=predictor.coverage, n_boot=n_boot, seed=seed),
        "score": predictor.conformal.score, "fitted_on": predictor.conformal.fitted_on}
    refer = refer_mask(sets, flags, np.array([bool(h) for h in headers], dtype=bool))
    if not multilabel:
        metrics["selective"] = _selective(y_true, probs, refer, sets is not None, predictor.guard is not None)
    out_dir = Path(out_dir)
    result = EvaluationResult(out_dir, metrics, predictor.classes, predictor.meta.task, split,
                              int(ok.sum()), int(flags.sum()) if predictor.guard is not None else None, failed)
    seen = check_seen(predictor.meta.seen_images, files.tolist())
    if seen is not None and seen.warning():
        result.warnings.append(seen.warning())
    if replaced:
        result.warnings.append(f"{out_dir} held an incomplete evaluation ({', '.join(replaced)}, no report.html: "
                               "interrupted); replaced it")
    if before is not None and metrics["ece"] > before["ece"] + 1e-9 and not predictor.calibration.kind == "none":
        result.warnings.append(calibration_verdict(before["ece"], metrics["ece"], before["transform"]))
    summary = {**metrics, "ece_before_calibration": before["ece"] if before else None,
               "temperature": predictor.meta.temperature, "calibration": predictor.calibration.to_dict(),
               "calibration_verdict": calibration_verdict(before["ece"], metrics["ece"], before["transform"])
               if before else None, "seen_images": seen.to_dict() if seen is not None else None,
               "adaptation": predictor.adaptation, "warnings": result.warnings,
               "bundle": "" if isinstance(bundle, Predictor) else str(bundle), "data": str(data), "split": split,
               "n_failed": len(failed), "failed": [{"file": f, "reason": r} for f, r in failed], "n_ood": result.n_ood,
               "ood_threshold": predictor.guard.threshold if predictor.guard is not None else None}
    result.files["report"].unlink(missing_ok=True)  # the completion mark goes first, comes back last
    write_text(result.files["metrics"], json.dumps(summary, indent=2) + "\n")
    predictions = _predictions_frame(samples, ok, predictor, probs, scores, flags, failed, sets, refer, headers)
    with atomic_path(result.files["predictions"]) as tmp:
        predictions.to_csv(tmp, index=False)
    gallery = _error_gallery(predictor, files, images, y_true, probs, cam_gallery)
    history = predictor.meta.extra.get("history")
    shown = predictions.assign(file=[_relative(f, data) for f in predictions["file"]])
    write_report(result.files["report"], title=f"Evaluation on {Path(str(data)).name} ({split})", metrics=metrics,
                 y_true=y_true, probs=probs, classes=predictor.classes,
                 history=pd.DataFrame(history) if history else None,
                 errors_gallery=[{**item, "file": _relative(item["file"], data)} for item in gallery],
                 notes=_notes(predictor, samples, split, result), metrics_before_calibration=before,
                 predictions=shown, predictions_link=result.files["predictions"].name,
                 model_card=render_model_card(dataclasses.asdict(predictor.meta)),
                 adaptation=predictor.meta.extra.get("adaptation"))
    return result


def _header_reasons(predictor: Predictor, file: str) -> list[str]:
    """The DICOM header check's reasons for one evaluated file (none for other formats or when it is off)."""
    if predictor.header_policy is None or not _may_be_dicom(file):
        return []
    try:
        found = predictor.inspect_header(file, file)
    except InputError:
        return []  # the pixels were readable; a header the check cannot parse is not a reason here
    return [] if found is None else list(found.reasons)


def _may_be_dicom(file: str) -> bool:
    """Whether ``file`` is named or starts like a DICOM file (reads 132 bytes at most)."""
    path = Path(file)
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _selective(y_true: np.ndarray, probs: np.ndarray, refer: np.ndarray, sets_checked: bool,
               ood_checked: bool) -> dict[str, Any]:
    """Risk-coverage: accuracy of the most confident predictions against the share kept, accuracy at
    :data:`COVERAGE_LEVELS`, and the accuracy of the predictions the referral rule keeps."""
    correct, confidence = probs.argmax(1) == y_true, probs.max(1)
    curve = risk_coverage(correct, confidence)
    step = max(1, len(correct) // _CURVE_POINTS)
    kept = ~refer
    accuracy_kept, kept_ci = proportion_interval(int(correct[kept].sum()), int(kept.sum()))
    accuracy_referred, referred_ci = proportion_interval(int(correct[refer].sum()), int(refer.sum()))
    checks = [name for name, done in (("set size", sets_checked), ("OOD", ood_checked)) if done] + ["DICOM header"]
    return {"risk_coverage": {key: values[step - 1::step] for key, values in curve.items()},
            "at_coverage": accuracy_at_coverages(correct, confidence),
            "referral": {"checks": checks, "kept_share": float(kept.mean()), "referred": int(refer.sum()),
                         "accuracy_kept": accuracy_kept, "accuracy_kept_ci": kept_ci,
                         "accuracy_referred": accuracy_referred, "accuracy_referred_ci": referred_ci}}


def _origin_name(origin: str | None) -> str:
    """The training data as the report names it: its folder's (or file's) own name, not a path on the machine
    that trained the model."""
    if not origin:
        return "?"
    return Path(str(origin).rstrip("/\\")).name or str(origin)


def _relative(path: str, root: str | Path) -> str:
    """``path`` relative to the data root (the folder, or the folder of a manifest or .npz); as is elsewhere."""
    base = Path(str(root)).expanduser()
    base = base.parent if base.is_file() else base
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except (ValueError, OSError):
        return path


def headline(result: EvaluationResult) -> list[str]:
    """A few lines for the terminal: the main figures with their 95% intervals."""
    m = result.metrics
    ood = f"{result.n_ood} flagged out-of-distribution" if result.n_ood is not None else \
        f"out-of-distribution {NOT_CHECKED} (no guard in the bundle)"
    lines = [f"{result.n_evaluated} images evaluated (split: {result.split}), {len(result.failed)} unreadable, {ood}"]
    lines += [f"warning: {w}" for w in result.warnings]
    if result.task == "multilabel":
        lines.append(f"mean ROC-AUC {interval_text(m, 'mean_auc', percent=False)}")
        aucs = ", ".join(f"{name} {row['roc_auc']:.3f}" for name, row in m["per_label"].items()
                         if row["roc_auc"] is not None)
        return lines + [f"ROC-AUC per label: {aucs}"]
    lines += [f"accuracy {interval_text(m, 'accuracy')}",
              f"balanced accuracy {interval_text(m, 'balanced_accuracy')}",
              f"macro ROC-AUC {interval_text(m, 'macro_auc', percent=False)}"]
    recalls = ", ".join(f"{name} {100 * row['sensitivity']:.1f}%" for name, row in m["per_class"].items()
                        if row["support"])
    lines.append(f"sensitivity (recall) per class: {recalls}")
    conformal = m.get("conformal")
    if conformal is None:
        lines.append(f"conformal prediction sets: {NOT_CHECKED} (none in the bundle)")
    else:
        low, high = conformal["coverage_ci"]
        per_class = ", ".join(f"{name} {100 * row['coverage']:.0f}%" for name, row in conformal["per_class"].items()
                              if row["coverage"] is not None)
        lines.append(f"prediction sets at {100 * conformal['target_coverage']:g}% target: coverage "
                     f"{100 * conformal['coverage']:.1f}% (95% CI {100 * low:.1f}–{100 * high:.1f}), mean set size "
                     f"{conformal['mean_set_size']:.2f}; per class {per_class}")
    at_coverage = m.get("selective", {}).get("at_coverage")
    if at_coverage:
        lines.append("risk-coverage: accuracy of the " + ", ".join(
            f"{level} most confident {100 * row['accuracy']:.1f}% (95% CI {100 * row['accuracy_ci'][0]:.1f}–"
            f"{100 * row['accuracy_ci'][1]:.1f})" for level, row in at_coverage.items() if row["accuracy"] is not None))
    referral = m.get("selective", {}).get("referral")
    if referral:
        kept = referral["accuracy_kept"]
        lines.append(f"referred {referral['referred']} of {result.n_evaluated}; accuracy on the rest "
                     + ("n/a" if kept is None else f"{100 * kept:.1f}%"))
    return lines


def _select(samples: Samples, split: str, data: str | Path) -> tuple[Samples, str]:
    if split not in SPLITS:
        raise ChestXrayError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if split == "auto":
        split = "test" if (samples.frame["split"] == "test").any() else "all"
    if split == "all":
        return samples, split
    chosen = samples.split(split)
    if not len(chosen):
        present = sorted(set(samples.frame["split"]) - {""}) or ["none"]
        raise ChestXrayError(f"{data}: no images in the '{split}' split (splits present: {', '.join(present)})")
    return chosen, split


def _predictions_frame(samples: Samples, ok: np.ndarray, predictor: Predictor, probs: np.ndarray, scores: np.ndarray,
                       flags: np.ndarray, failed: list[tuple[str, str]], sets: np.ndarray | None, refer: np.ndarray,
                       headers: list[list[str]]) -> pd.DataFrame:
    frame = pd.DataFrame({"file": samples.frame["path"], "truth": samples.frame["label"].replace("", NO_FINDING)})
    frame["prediction"] = ""
    frame.loc[ok, "prediction"] = [predictor.label(p) for p in probs]
    frame["prediction_set"] = ""
    frame.loc[ok, "prediction_set"] = NOT_CHECKED if sets is None else \
        [SET_SEPARATOR.join(c for c, inside in zip(predictor.classes, row) if inside) for row in sets]
    frame["refer"] = False
    frame.loc[ok, "refer"] = refer
    frame["header_check"] = ""
    frame.loc[ok, "header_check"] = ["; ".join(h) for h in headers]
    for k, name in enumerate(predictor.classes):
        frame[name] = np.nan
        frame.loc[ok, name] = probs[:, k]
    frame["ood"] = False if predictor.guard is not None else NOT_CHECKED
    frame.loc[ok, "ood"] = flags if predictor.guard is not None else NOT_CHECKED
    frame["ood_score"] = np.nan
    frame.loc[ok, "ood_score"] = scores
    frame["ood_percentile"] = np.nan
    frame.loc[ok, "ood_percentile"] = predictor.ood_percentiles(scores)
    reasons = dict(failed)
    frame["error"] = [reasons.get(file, "") for file in frame["file"]]
    return frame


def _error_gallery(predictor: Predictor, files: np.ndarray, images: np.ndarray, y_true: np.ndarray,
                   probs: np.ndarray, size: int) -> list[dict[str, Any]]:
    """The ``size`` most confident errors with their Grad-CAM overlays (torch backend only).

    Multi-class: wrong arg-max, ranked by its probability. Multi-label: the label furthest on the
    wrong side of 0.5, ranked by its distance from the truth; the overlay explains that label.
    """
    if size <= 0 or predictor.model is None:
        return []
    if predictor.meta.task == "multilabel":
        gap = np.abs(y_true - probs)
        wrong_side = (probs >= MULTILABEL_THRESHOLD) != (y_true >= MULTILABEL_THRESHOLD)
        worst = np.where(wrong_side, gap, -1.0).argmax(1)
        confidence = gap[np.arange(len(gap)), worst]
        is_error = wrong_side.any(1)
        truths = [SET_SEPARATOR.join(c for c, t in zip(predictor.classes, row) if t) or NO_FINDING for row in y_true]
    else:
        worst = probs.argmax(1)
        confidence = probs.max(1)
        is_error = worst != y_true
        truths = [predictor.classes[t] for t in y_true]
    order = [i for i in np.argsort(-confidence, kind="stable") if is_error[i]][:size]
    return [{"image_png": predictor.gradcam_png(images[i], int(worst[i])), "file": files[i], "truth": truths[i],
             "prediction": predictor.label(probs[i]), "confidence": float(confidence[i])} for i in order]


def _notes(predictor: Predictor, samples: Samples, split: str, result: EvaluationResult) -> list[str]:
    meta = predictor.meta
    trained = meta.extra.get("trained_on") or {}
    notes = [f"Model: {meta.arch} at {meta.image_size} px ({predictor.preprocessing.mode}, "
             f"contrast {predictor.preprocessing.contrast}), "
             f"{len(meta.classes)} classes, created {meta.created}, calibration {predictor.calibration.describe()}."]
    if predictor.adaptation:
        notes.append(f"This bundle is {predictor.adaptation}.")
    notes += [f"Warning: {w}" for w in result.warnings]
    if trained:
        counts = ", ".join(f"{k} {v}" for k, v in (trained.get("class_counts") or {}).items())
        notes.append(f"Trained on {_origin_name(trained.get('origin'))}: {trained.get('n_train', '?')} training and "
                     f"{trained.get('n_val', '?')} validation images ({counts}).")
        if split != "test" and _same_place(trained.get("origin"), samples.origin):
            notes.append("Warning: these images come from the training data set and may include training or "
                         "validation images; the figures are then optimistic.")
    else:
        notes.append("The bundle does not record what the model was trained on.")
    notes.append(f"Evaluated on {samples.origin} ({split}): {result.n_evaluated} images"
                 + (f", {len(result.failed)} unreadable (listed in metrics.json)." if result.failed else "."))
    if predictor.guard is None:
        notes.append(f"Out-of-distribution check: {NOT_CHECKED} (the bundle has no guard).")
    else:
        notes.append(f"{result.n_ood} image(s) scored as unlike the training images "
                     f"(OOD score above {predictor.guard.threshold:.1f}).")
    return notes + [MISUSE_NOTE]


def _same_place(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
