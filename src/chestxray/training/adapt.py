"""Site adaptation: validate and adapt a bundle on a small labelled sample from a new site.

``adapt(bundle, local_data, out)`` writes a *child* bundle:

* ``mode="recalibrate"`` (default) keeps the weights and refits, on the local images, the logit
  transform (none, temperature, bias or vector scaling, chosen by cross-validated NLL inside the
  sample, :mod:`chestxray.logit_transform`), the operating points, the OOD guard's reference scores
  (the local scores pooled with the parent's held-out ones) and conformal sets when the parent has
  them;
* ``mode="finetune"`` continues training from the bundle's weights on the local images (optionally
  mixed with other labelled data, ``with_data``), early-stopped on an inner, patient-grouped split of
  the local images, then recalibrates on that inner split as above.

Before the child is fitted on all the local images, an honest estimate of what adaptation buys: a
stratified, patient-grouped k-fold inside the local sample, each fold adapted on the other ``k - 1``
and scored on itself (:func:`cross_fitted`), compared with the parent on the same images: bootstrap
intervals, per-class sensitivity, ECE, and a paired interval of the accuracy difference. It is
written as ``adaptation.json`` and ``adaptation.html`` in the child bundle and kept in its
``model.json`` (``extra["adaptation"]``) for the evaluation report. The child's ``lineage`` names
its parent (id and weights SHA-256), the local data (content fingerprint, counts per class), the
mode and the date.
"""

from __future__ import annotations

__all__ = ["MODES", "MIN_PER_CLASS", "DEFAULT_FOLDS", "FINETUNE_DEFAULTS", "REPORT_FILE", "REPORT_HTML", "LocalSample",
           "Adaptation", "AdaptationResult", "model_outputs", "site_absent", "load_local", "local_transform",
           "site_coverage", "site_calibration", "recalibration", "finetune", "finetune_config", "cross_fitted",
           "compare", "adapt", "site_lineage", "headline"]

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd

from ..console import make_console
from ..model.bundle import (INT8_ONNX_FILE, ONNX_FILE, BundleMeta, ChangedFileError, load_bundle, record_file,
                     save_bundle, verify_file)
from ..data.cache import build_cache
from ..trust.calibration import Calibration, calibrate_outputs
from ..stats.conformal import DEFAULT_COVERAGE, ConformalSets, fit_conformal, set_metrics
from ..stats.logit_transform import KINDS, LogitTransform, choose_logit_transform, fold_indices
from .config import RuntimeSettings, TrainConfig, make_config
from ..launch import one_device
from ..model.runners import TorchRunner, run_images
from ..errors import ChestXrayError, InputError
from ..trust.lineage import (check_seen, data_fingerprint, describe_lineage, lineage_record, merge_seen,
                             short_hash)
from ..stats.metrics import bootstrap_ci, classification_metrics
from ..model.models import ChestXrayNet, EnsembleNet
from ..stats.ood import OODGuard
from ..data.sources import Samples, load_samples
from ..data.splits import save_split, train_val_split
from ..storage import staged_folder

if TYPE_CHECKING:
    from ..deploy.export import ExportResult

MODES = ("recalibrate", "finetune")
MIN_PER_CLASS = 5
"""Fewest local images per class: enough for a k-fold estimate and for operating points."""
DEFAULT_FOLDS = 5
FINETUNE_DEFAULTS = {"epochs": 4, "lr": 3e-4, "freeze_epochs": 0, "warmup_epochs": 0, "patience": 2,
                     "val_fraction": 0.25}
"""Training settings of ``mode="finetune"`` over the parent's own (flags win): a short, gentle run."""
REPORT_FILE = "adaptation.json"
REPORT_HTML = "adaptation.html"

console = make_console(stderr=True)
Fitted = TypeVar("Fitted")


@dataclass
class LocalSample:
    """The readable local images in the bundle's class order, with their content hashes."""

    samples: Samples
    images: np.ndarray
    targets: np.ndarray
    hashes: np.ndarray
    failed: list[tuple[str, str]]
    warnings: list[str] = field(default_factory=list)

    def class_counts(self) -> dict[str, int]:
        """Images per class of the model (in its order)."""
        counts = np.bincount(self.targets, minlength=len(self.samples.classes))
        return {name: int(n) for name, n in zip(self.samples.classes, counts)}

    def fingerprint(self) -> str:
        """Content fingerprint of the labelled images (file names and order do not matter)."""
        return data_fingerprint(self.hashes, self.samples.frame["label"].tolist())


@dataclass
class Adaptation:
    """What an adaptation fitted: the model (the parent's own for ``recalibrate``) and its calibration
    on local images (:class:`~chestxray.calibration.Calibration`: logit transform, operating points,
    OOD guard, conformal sets, drift reference)."""

    model: ChestXrayNet
    calibration: Calibration
    trained_on: dict[str, Any] = field(default_factory=dict)
    seen_train: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    seen_val: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    history: dict[str, list] | None = None

    @property
    def transform(self) -> LogitTransform:
        """The chosen logit transform."""
        return self.calibration.transform

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Adapted probabilities of uint8 images (N, S, S)."""
        return self.transform.probabilities(model_outputs(self.model, images)[0])


@dataclass
class AdaptationResult:
    """The child bundle and the k-fold estimate (``summary`` is ``adaptation.json``)."""

    bundle_dir: Path
    summary: dict[str, Any]
    local: LocalSample
    onnx: ExportResult | None = None
    """The fine-tuned child's ONNX export (``None``: recalibrated, whose parent graphs are copied, or ``onnx=False``)."""


def model_outputs(model: ChestXrayNet | EnsembleNet, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, features)`` of uint8 squares (N, S, S) through the model (eval mode, batched)."""
    return run_images(TorchRunner(model.eval()), images)


# ---------------------------------------------------------------------- the local sample


def site_absent(meta: BundleMeta, site_classes: Sequence[str] | None) -> list[int]:
    """Indices of the model's classes a site declares absent: those not in ``site_classes`` (``None``:
    every class occurs). One-line errors for a name the model does not have, or fewer than two classes."""
    if site_classes is None:
        return []
    names = [name.strip() for name in site_classes if name.strip()]
    unknown = sorted(set(names) - set(meta.classes))
    if unknown:
        raise ChestXrayError(f"--site-classes names {', '.join(unknown)}, which the model does not have "
                             f"(its classes: {', '.join(meta.classes)})")
    if len(set(names)) < 2:
        raise ChestXrayError("--site-classes needs at least two of the model's classes: with one, there is "
                             "nothing left to predict")
    return [k for k, name in enumerate(meta.classes) if name not in names]


def load_local(meta: BundleMeta, data: str | Path | Samples, *, cache_dir: str | Path | None = None,
               progress: bool = True, min_per_class: int = MIN_PER_CLASS,
               site_classes: Sequence[str] | None = None, warn_seen: bool = True) -> LocalSample:
    """Read the local labelled images (every split) for ``meta``'s model, refusing what cannot be adapted on.

    One-line errors: classes the bundle does not have; a class the site declares present (``site_classes``,
    default all of the model's) with no readable image, or one declared absent that has images. A present
    class with fewer than ``min_per_class`` images is kept with a warning: its prediction sets take the
    pooled threshold. Unreadable files are counted and named, the others used. Images the bundle was
    trained or validated on give a warning (all of them: the local sample *is* the training data), unless
    ``warn_seen`` is false (a reference known to be the bundle's validation images).
    """
    absent = {meta.classes[k] for k in site_absent(meta, site_classes)}
    samples = data if isinstance(data, Samples) else load_samples(data)
    if samples.task != "multiclass" or meta.task != "multiclass":
        raise ChestXrayError(f"{samples.origin}: site adaptation supports multi-class models and labels "
                             f"(got {samples.task} labels for a {meta.task} model)")
    unknown = sorted(set(samples.frame["label"]) - set(meta.classes))
    if unknown:
        raise ChestXrayError(f"{samples.origin}: class(es) {', '.join(unknown)} are not the bundle's "
                             f"(its classes: {', '.join(meta.classes)}); rename or leave them out")
    samples = Samples(samples.frame.assign(split=""), list(meta.classes), "multiclass", samples.origin)
    cache = build_cache(samples, meta.preprocessing(), cache_dir=cache_dir, progress=progress)
    failed = [(samples.frame["path"].iloc[row], reason) for row, reason in sorted(cache.failed.items())]
    if failed:
        named = "; ".join(f"{file}: {reason}" for file, reason in failed[:5])
        console.print(f"[yellow]{len(failed)} unreadable local image(s) left out[/] ({named}"
                      f"{'; ...' if len(failed) > 5 else ''})", soft_wrap=True, highlight=False)
    ok = cache.ok
    usable = samples.subset(ok)
    local = LocalSample(usable, np.asarray(cache.images)[ok], usable.targets(),
                        np.array([short_hash(p) or 0 for p in usable.frame["path"]], dtype=np.uint64), failed)
    counts = local.class_counts()
    declared_absent = {name: n for name, n in counts.items() if name in absent and n}
    if declared_absent:
        have = ", ".join(f"{name} {n}" for name, n in declared_absent.items())
        raise ChestXrayError(f"{samples.origin}: class(es) declared absent by --site-classes have local images "
                             f"({have}); add them to --site-classes or leave their images out")
    missing = [name for name, n in counts.items() if name not in absent and not n]
    if missing:
        raise ChestXrayError(f"{samples.origin}: no readable local image of {', '.join(missing)}; if the site has "
                             f"no such cases, declare the classes that occur there, e.g. --site-classes "
                             f"{','.join(name for name in meta.classes if name not in absent and name not in missing)}")
    short = {name: n for name, n in counts.items() if name not in absent and n < min_per_class}
    if short:
        have = ", ".join(f"{name} {n}" for name, n in short.items())
        message = (f"few local images of {have} (fewer than {min_per_class}): their prediction sets take the "
                   "threshold of all classes pooled, and their figures are uncertain")
        local.warnings.append(message)
        console.print(f"[yellow]warning:[/] {message}", soft_wrap=True, highlight=False)
    seen = check_seen(meta.seen_images, usable.frame["path"].tolist(), local.hashes) if warn_seen else None
    if seen is not None and seen.n_seen:
        if seen.n_seen == len(usable):
            message = (f"the local sample is this model's training data: all {len(usable)} images were its training "
                       f"({seen.n_train}) or validation ({seen.n_val}) images; the estimate says nothing about a new site")
        else:
            message = seen.warning("local")
        local.warnings.append(message)
        console.print(f"[yellow]warning:[/] {message}", soft_wrap=True, highlight=False)
    return local


# ---------------------------------------------------------------------- fitting


def local_transform(logits: np.ndarray, targets: np.ndarray, groups: np.ndarray | None = None, *,
                    seed: int = 0, absent: Sequence[int] = ()) -> LogitTransform:
    """The logit transform a site's own labelled images choose (any kind, sharpening allowed: they *are*
    the new distribution); ``absent`` classes ruled out."""
    ruled_out = LogitTransform().without(absent)
    return choose_logit_transform(ruled_out.apply(logits), targets, "multiclass", kinds=KINDS, sharpen=True,
                                  groups=groups, seed=seed).transform.without(absent)


def site_coverage(meta: BundleMeta) -> float:
    """The coverage of a site's conformal sets: the parent's (the default when it has none)."""
    return float((meta.conformal or {}).get("coverage", DEFAULT_COVERAGE))


def site_calibration(meta: BundleMeta, logits: np.ndarray, features: np.ndarray, targets: np.ndarray,
                     groups: np.ndarray | None, *, ood: dict[str, Any] | None, fitted_on: str,
                     seed: int = 0, absent: Sequence[int] = ()) -> Calibration:
    """Everything :func:`~chestxray.calibration.calibrate_outputs` fits, on a site's labelled images: the
    logit transform (as :func:`local_transform`), operating points, conformal sets at the parent's
    coverage, the drift reference and the figures; ``ood`` is the guard to keep (already fitted);
    ``absent`` classes are ruled out."""
    return calibrate_outputs(LogitTransform().without(absent).apply(logits), targets, classes=list(meta.classes),
                             task="multiclass", features=features, ood=ood, kinds=KINDS, sharpen=True, groups=groups,
                             seed=seed, coverage=site_coverage(meta), fitted_on=fitted_on, absent=absent)


def recalibration(model: ChestXrayNet, meta: BundleMeta, logits: np.ndarray, features: np.ndarray,
                  targets: np.ndarray, groups: np.ndarray | None = None, *, seed: int = 0,
                  absent: Sequence[int] = ()) -> Adaptation:
    """Refit on these local images the logit transform, the operating points, the conformal sets, the
    drift reference and the OOD guard's reference scores (the local scores pooled with the parent's
    held-out ones, the threshold set again); the weights stay the parent's."""
    ood = None
    if meta.ood:
        guard = OODGuard.from_dict(meta.ood)
        ood = guard.with_reference(guard.score(features)).to_dict()
    fitted_on = f"site's {len(targets)} local images (chestxray adapt, recalibrate)"
    return Adaptation(model, site_calibration(meta, logits, features, targets, groups, ood=ood,
                                              fitted_on=fitted_on, seed=seed, absent=absent))


def finetune(bundle_dir: Path, meta: BundleMeta, local: LocalSample, rows: np.ndarray, work_dir: Path, *,
             with_samples: Samples | None = None, overrides: dict[str, Any] | None = None, seed: int = 0,
             cache_dir: str | Path | None = None, progress: bool = False,
             runtime: RuntimeSettings | None = None, absent: Sequence[int] = ()) -> Adaptation:
    """Continue training the bundle's model on the local images at ``rows`` (plus ``with_samples``),
    early-stopped on an inner split of those local images, then recalibrated on that inner split;
    ``runtime`` (on one device) says how to use the machine."""
    from .train import fit

    config = finetune_config(meta, bundle_dir, overrides, seed)
    chosen = local.samples.subset(rows)
    inner_train, inner_val = train_val_split(chosen, config.val_fraction, config.seed)
    frames = [chosen.frame]
    if with_samples is not None and len(with_samples):
        frames.append(with_samples.frame.assign(split=""))
    pool = Samples(pd.concat(frames, ignore_index=True), list(meta.classes), "multiclass", local.samples.origin)
    extra_rows = np.arange(len(chosen), len(pool))
    work_dir.mkdir(parents=True, exist_ok=True)
    split_file = save_split(work_dir / "split.csv", pool, {"train": np.concatenate([inner_train, extra_rows]),
                                                           "val": inner_val})
    run = fit(pool, config, one_device(runtime or RuntimeSettings()), out_dir=work_dir, name="run",
              cache_dir=cache_dir, progress=progress, split_file=split_file, onnx=False)
    model, fitted = load_bundle(run.bundle_dir)
    val_images, val_targets = local.images[rows][inner_val], local.targets[rows][inner_val]
    logits, features = model_outputs(model, val_images)
    calibration = site_calibration(meta, logits, features, val_targets, chosen.subset(inner_val).groups(),
                                   ood=fitted.ood, seed=seed, absent=absent,
                                   fitted_on=f"inner validation split of the local images ({len(inner_val)} images, "
                                             "chestxray adapt, finetune)")
    with_hashes = np.array([short_hash(p) or 0 for p in pool.frame["path"].iloc[extra_rows]], dtype=np.uint64)
    adaptation = Adaptation(
        model, calibration, fitted.extra.get("trained_on", {}),
        np.concatenate([local.hashes[rows][inner_train], with_hashes]), local.hashes[rows][inner_val],
        fitted.extra.get("history"))
    shutil.rmtree(run.run_dir / "checkpoints", ignore_errors=True)
    return adaptation


def finetune_config(meta: BundleMeta, bundle_dir: Path, overrides: dict[str, Any] | None = None,
                    seed: int = 0) -> TrainConfig:
    """The parent's training config (defaults when it has none), warm-started from ``bundle_dir``, with
    :data:`FINETUNE_DEFAULTS` and then ``overrides`` applied."""
    parent = dict(meta.extra.get("config") or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    base = make_config({k: v for k, v in parent.items() if k in known})
    return base.replace(**{**FINETUNE_DEFAULTS, "seed": seed, **(overrides or {}), "init": str(bundle_dir)})


# ---------------------------------------------------------------------- the honest estimate


def cross_fitted(items: Sequence[np.ndarray], targets: np.ndarray, groups: np.ndarray | None, folds: int,
                 seed: int, fit: Callable[[tuple[np.ndarray, ...], np.ndarray], Fitted],
                 predict: Callable[[Fitted, tuple[np.ndarray, ...]], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold predictions: for each fold, ``fit`` on the other folds' rows of ``items`` (arrays
    aligned with ``targets``) and ``predict`` the fold's own rows. ``fit`` and ``predict`` only ever see
    the slices, never the other rows. Returns ``(probabilities (N, C), fold of each row)``."""
    splits = fold_indices(targets, folds, seed, groups)
    if not splits:
        raise ChestXrayError("too few local images per class for a k-fold estimate")
    fold_of = np.full(len(targets), -1)
    outputs: np.ndarray | None = None
    for index, (fit_rows, held_rows) in enumerate(splits):
        fitted = fit(tuple(item[fit_rows] for item in items), targets[fit_rows])
        probs = np.asarray(predict(fitted, tuple(item[held_rows] for item in items)))
        if outputs is None:
            outputs = np.zeros((len(targets), probs.shape[1]))
        outputs[held_rows] = probs
        fold_of[held_rows] = index
    return outputs, fold_of


def compare(y_true: np.ndarray, before: np.ndarray, after: np.ndarray, classes: list[str], *,
            n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Before/after metrics on the same images, with paired bootstrap intervals of the differences."""
    def difference(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
        from sklearn.metrics import accuracy_score, balanced_accuracy_score

        score = {"accuracy": accuracy_score, "balanced_accuracy": balanced_accuracy_score}[name]
        c = len(classes)
        return lambda y, both: score(y, both[:, c:].argmax(1)) - score(y, both[:, :c].argmax(1))

    first = classification_metrics(y_true, before, classes, n_boot=n_boot, seed=seed)
    second = classification_metrics(y_true, after, classes, n_boot=n_boot, seed=seed)
    both = np.hstack([before, after])
    differences = {}
    for name in ("accuracy", "balanced_accuracy"):
        low, high = bootstrap_ci(difference(name), y_true, both, n_boot=n_boot, seed=seed)
        differences[name] = {"value": second[name] - first[name], "ci": [low, high]}
    return {"before": _brief(first), "after": _brief(second), "difference": differences,
            "after_full": second, "before_full": first}


def _coverage(y_true: np.ndarray, before: np.ndarray | None, after: np.ndarray, classes: list[str], coverage: float,
              n_boot: int, seed: int) -> dict[str, Any]:
    """Coverage and size of the prediction sets on the same images: the parent's sets (``None``: it has
    none) and the out-of-fold refitted ones."""
    def brief(sets: np.ndarray) -> dict[str, Any]:
        found = set_metrics(sets, y_true, classes, coverage=coverage, n_boot=n_boot, seed=seed)
        return {**{k: found[k] for k in ("coverage", "coverage_ci", "mean_set_size", "single_class_share")},
                "per_class": {name: row["coverage"] for name, row in found["per_class"].items()}}

    return {"target": coverage, "before": brief(before) if before is not None else None, "after": brief(after)}


def _brief(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("n", "accuracy", "balanced_accuracy", "macro_auc", "cross_entropy", "ece", "ci")
    return {**{k: metrics[k] for k in keys},
            "sensitivity": {name: row["sensitivity"] for name, row in metrics["per_class"].items()}}


# ---------------------------------------------------------------------- the command


def adapt(bundle: str | Path, data: str | Path, out: str | Path, *, mode: str = "recalibrate",
          with_data: str | Path | None = None, folds: int = DEFAULT_FOLDS, seed: int = 0, n_boot: int = 1000,
          overrides: dict[str, Any] | None = None, runtime: RuntimeSettings | None = None,
          cache_dir: str | Path | None = None, progress: bool = True,
          site_classes: Sequence[str] | None = None, onnx: bool = True) -> AdaptationResult:
    """Estimate by k-fold inside the local sample what adapting ``bundle`` to ``data`` buys, then write the
    child bundle, adapted on all of it, to ``out`` (see the module docstring). ``site_classes``: the
    model's classes that occur at the site (the others are ruled out). Without labels, see
    :func:`chestxray.adapt_unlabeled.adapt_unlabeled`. ``onnx``: export a fine-tuned child to ONNX
    (parity-checked on local X-rays), as ``chestxray adapt --mode finetune`` does."""
    if mode not in MODES:
        raise ChestXrayError(f"unknown adaptation mode {mode!r}: use {' or '.join(MODES)}")
    if with_data is not None and mode != "finetune":
        raise ChestXrayError("--with mixes training data into fine-tuning: it needs --mode finetune")
    if folds < 2:
        raise ChestXrayError(f"the k-fold estimate needs at least 2 folds, not {folds}")
    bundle_dir, out = Path(bundle), Path(out)
    if out.resolve() == bundle_dir.resolve():
        raise ChestXrayError(f"{out}: the child bundle needs its own folder (not the parent's)")
    parent, meta = load_bundle(bundle_dir)
    graphs = _parent_graphs(bundle_dir, meta) if mode == "recalibrate" else {}
    if isinstance(parent, EnsembleNet) and mode == "finetune":
        raise ChestXrayError(f"{bundle_dir}: a cross-validation ensemble can be recalibrated, not fine-tuned")
    absent = site_absent(meta, site_classes)
    local = load_local(meta, data, cache_dir=cache_dir, progress=progress, site_classes=site_classes)
    with_samples = _with_samples(with_data, meta) if with_data is not None else None
    groups = local.samples.groups()
    logits, features = model_outputs(parent, local.images)
    before = meta.logit_transform().probabilities(logits)  # the parent as it is (absent classes included)
    classes, coverage = list(meta.classes), site_coverage(meta)
    console.print(f"estimating by {folds}-fold inside {len(local.images)} local images ({mode})")
    rows = np.arange(len(local.images))
    with tempfile.TemporaryDirectory(prefix="chestxray-adapt-") as work:
        if mode == "recalibrate":
            def fit_fold(items: tuple[np.ndarray, ...], targets: np.ndarray) -> tuple[LogitTransform, ConformalSets]:
                transform = local_transform(items[0], targets, items[1], seed=seed, absent=absent)
                return transform, fit_conformal(transform.probabilities(items[0]), targets, classes,
                                                coverage=coverage, absent=[classes[k] for k in absent])

            def predict_fold(fitted: tuple[LogitTransform, ConformalSets], items: tuple[np.ndarray, ...]) -> np.ndarray:
                probs = fitted[0].probabilities(items[0])
                return np.hstack([probs, fitted[1].sets(probs)])

            outputs, fold_of = cross_fitted((logits, groups), local.targets, groups, folds, seed, fit_fold,
                                            predict_fold)
            child = recalibration(parent, meta, logits, features, local.targets, groups, seed=seed, absent=absent)
        else:
            counter = iter(range(folds + 1))

            def fit_fold(items: tuple[np.ndarray, ...], targets: np.ndarray) -> Adaptation:
                return finetune(bundle_dir, meta, local, items[0], Path(work) / f"fold{next(counter)}",
                                with_samples=with_samples, overrides=overrides, seed=seed, cache_dir=cache_dir,
                                runtime=runtime, absent=absent)

            def predict_fold(fitted: Adaptation, items: tuple[np.ndarray, ...]) -> np.ndarray:
                probs = fitted.probabilities(local.images[items[0]])
                return np.hstack([probs, ConformalSets.from_dict(fitted.calibration.conformal, classes).sets(probs)])

            outputs, fold_of = cross_fitted((rows,), local.targets, groups, folds, seed, fit_fold, predict_fold)
            child = finetune(bundle_dir, meta, local, rows, Path(work) / "all", with_samples=with_samples,
                             overrides=overrides, seed=seed, cache_dir=cache_dir, runtime=runtime, absent=absent)
    after, after_sets = outputs[:, :len(classes)], outputs[:, len(classes):].astype(bool)
    comparison = compare(local.targets, before, after, classes, n_boot=n_boot, seed=seed)
    before_sets = ConformalSets.from_dict(meta.conformal, classes).sets(before) if meta.conformal else None
    comparison["conformal"] = _coverage(local.targets, before_sets, after_sets, classes, coverage, n_boot, seed)
    lineage = _lineage(bundle_dir, meta, local, mode, data, with_data)
    summary = _summary(comparison, child, local, lineage, int(fold_of.max()) + 1, mode)
    child_meta = _child_meta(meta, child, local, lineage, summary, mode)
    with staged_folder(out) as out_dir:  # nothing of the child in --out until all of it is written
        save_bundle(out_dir, child.model, child_meta)
        if mode == "recalibrate":  # same weights: the parent's exported graphs hold (calibration is applied after them)
            _copy_graphs(bundle_dir, graphs, out_dir)
        (out_dir / REPORT_FILE).write_text(json.dumps({**summary, "before_full": comparison["before_full"],
                                                       "after_full": comparison["after_full"]}, indent=2) + "\n")
        _write_report(out_dir / REPORT_HTML, summary, comparison["after_full"], local.targets, after, classes)
        exported = None
        if onnx and mode == "finetune":
            from ..deploy.export import PARITY_IMAGES, export_onnx

            exported = export_onnx(out_dir, parity_images=local.samples.frame["path"].tolist()[:PARITY_IMAGES])
    out_dir = Path(out)
    if exported is not None:
        exported = dataclasses.replace(exported, path=out_dir / exported.path.name)
    return AdaptationResult(out_dir, summary, local, exported)


def _parent_graphs(bundle_dir: Path, meta: BundleMeta) -> dict[str, str]:
    """The parent's exported graphs a recalibrated child inherits, with their sha256, checked against the
    parent's record before any work (a changed one is refused; one the parent never recorded is left
    out, as no loader would run it)."""
    graphs = {}
    for name in (ONNX_FILE, INT8_ONNX_FILE):
        if (bundle_dir / name).is_file():
            try:
                graphs[name] = verify_file(bundle_dir, meta, name)
            except ChangedFileError:
                raise
            except InputError:
                continue
    return graphs


def _copy_graphs(bundle_dir: Path, graphs: dict[str, str], out_dir: Path) -> None:
    """Copy the parent's checked graphs into the child and record their sha256 there."""
    for name, sha in graphs.items():
        shutil.copyfile(bundle_dir / name, out_dir / name)
        if record_file(out_dir, name) != sha:
            (out_dir / name).unlink()
            raise ChangedFileError(bundle_dir / name, "changed while it was copied into the child bundle")


def _with_samples(with_data: str | Path, meta: BundleMeta) -> Samples:
    samples = load_samples(with_data)
    unknown = sorted(set(samples.frame["label"]) - set(meta.classes))
    if unknown:
        raise ChestXrayError(f"{with_data}: class(es) {', '.join(unknown)} are not the bundle's "
                             f"(its classes: {', '.join(meta.classes)})")
    pool = samples.subset(samples.frame["split"] != "test")
    return Samples(pool.frame, list(meta.classes), "multiclass", pool.origin)


def site_lineage(bundle_dir: Path, meta: BundleMeta, mode: str, data: Any, *, fingerprint: str, n_images: int,
                 n_unreadable: int, **fields: Any) -> dict[str, Any]:
    """The lineage a site-adapted child carries (every mode, labelled or not): :func:`lineage_record` with
    the site's data (name, content fingerprint, counts); ``fields`` adds what a mode knows besides
    (class counts, classes ruled out, the data mixed in)."""
    return lineage_record(bundle_dir, meta, mode, data=str(data.origin if isinstance(data, Samples) else data),
                          data_fingerprint=fingerprint, n_images=int(n_images), n_unreadable=int(n_unreadable),
                          **fields)


def _lineage(bundle_dir: Path, meta: BundleMeta, local: LocalSample, mode: str, data: str | Path | Samples,
             with_data: str | Path | None) -> dict[str, Any]:
    return site_lineage(bundle_dir, meta, mode, data, fingerprint=local.fingerprint(), n_images=len(local.images),
                          n_unreadable=len(local.failed), class_counts=local.class_counts(),
                          with_data=str(with_data) if with_data is not None else None)


def _summary(comparison: dict[str, Any], child: Adaptation, local: LocalSample, lineage: dict[str, Any],
             folds: int, mode: str) -> dict[str, Any]:
    before, after = comparison["before"], comparison["after"]
    return {"mode": mode, "folds": folds, "n": len(local.images), "class_counts": local.class_counts(),
            "before": before, "after": after, "difference": comparison["difference"],
            "conformal": comparison["conformal"], "calibration": child.calibration.transform_choice,
            "lineage": lineage, "warnings": local.warnings,
            "unreadable": [{"file": f, "reason": r} for f, r in local.failed],
            "method": (f"stratified, patient-grouped {folds}-fold inside the local sample: each fold was adapted "
                       f"({mode}) on the other {folds - 1} and scored on itself; 'before' is the parent bundle on "
                       "the same images. The child bundle is then adapted on all of them."),
            "ece_worse_after": bool(after["ece"] > before["ece"])}


def _child_meta(meta: BundleMeta, child: Adaptation, local: LocalSample, lineage: dict[str, Any],
                summary: dict[str, Any], mode: str) -> BundleMeta:
    if mode == "recalibrate":  # the local images calibrated the model: judged on them, figures are optimistic
        seen = merge_seen(meta.seen_images, val=local.hashes)
    else:
        seen = merge_seen(meta.seen_images, train=child.seen_train, val=child.seen_val)
    after = summary["after"]
    estimate = f"{summary['folds']}-fold estimate inside {summary['n']} local images ({mode})"
    # the held-out figures the model card and /v1/model show: the honest out-of-fold estimate, not the
    # (in-sample) figures on the images the child was calibrated on
    validation = {"note": f"out-of-fold predictions of the {estimate}",
                  **{k: after[k] for k in ("accuracy", "balanced_accuracy", "macro_auc")},
                  **{f"{k}_ci": after["ci"][k] for k in ("accuracy", "balanced_accuracy", "macro_auc")}}
    extra = {**meta.extra, **child.calibration.extra_fields(), "validation": validation,
             "calibration_choice": child.calibration.transform_choice,
             "adaptation": {k: v for k, v in summary.items() if k != "unreadable"}}
    if child.history:
        extra["history"] = child.history
    if child.trained_on:
        extra["finetuned_on"] = child.trained_on
    metrics = {"accuracy": after["accuracy"], "balanced_accuracy": after["balanced_accuracy"],
               "macro_auc": after["macro_auc"], "ece": after["ece"], "cross_entropy": after["cross_entropy"],
               "evaluated_on": estimate}
    return dataclasses.replace(meta, **child.calibration.bundle_fields(), lineage=lineage, seen_images=seen,
                               metrics=metrics, extra=extra,
                               created=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _write_report(path: Path, summary: dict[str, Any], after_metrics: dict[str, Any], y_true: np.ndarray,
                  probs: np.ndarray, classes: list[str]) -> None:
    from ..inference.report import write_report

    write_report(path, title=f"Site adaptation ({summary['mode']}): out-of-fold estimate", metrics=after_metrics,
                 y_true=y_true, probs=probs, classes=classes, adaptation=summary,
                 notes=[describe_lineage(summary["lineage"]) or "", summary["method"], *summary["warnings"]])


def _coverage_line(conformal: dict[str, Any]) -> str:
    def text(found: dict[str, Any] | None) -> str:
        if found is None:
            return "none (the parent has no prediction sets)"
        low, high = found["coverage_ci"]
        return (f"{100 * found['coverage']:.1f}% ({100 * low:.1f}–{100 * high:.1f}), "
                f"mean size {found['mean_set_size']:.2f}")

    return (f"prediction sets (target coverage {100 * conformal['target']:.0f}%): before {text(conformal['before'])}; "
            f"after {text(conformal['after'])}")


def headline(result: AdaptationResult) -> list[str]:
    """A few lines for the terminal: before/after with intervals, per-class sensitivity, ECE, the transform."""
    s = result.summary
    before, after, diff = s["before"], s["after"], s["difference"]

    def pct(metrics: dict[str, Any], name: str) -> str:
        low, high = metrics["ci"][name]
        return f"{100 * metrics[name]:.1f}% ({100 * low:.1f}–{100 * high:.1f})"

    low, high = diff["accuracy"]["ci"]
    lines = [f"{s['n']} local images ({', '.join(f'{k} {v}' for k, v in s['class_counts'].items())}), "
             f"{len(s['unreadable'])} unreadable; {s['folds']}-fold estimate, mode {s['mode']}",
             f"accuracy: before {pct(before, 'accuracy')}, after {pct(after, 'accuracy')}; "
             f"difference {100 * diff['accuracy']['value']:+.1f} points (95% CI {100 * low:+.1f} to {100 * high:+.1f})",
             f"balanced accuracy: before {pct(before, 'balanced_accuracy')}, after {pct(after, 'balanced_accuracy')}",
             "sensitivity per class (before → after): " + ", ".join(
                 f"{name} {100 * before['sensitivity'][name]:.1f}% → {100 * after['sensitivity'][name]:.1f}%"
                 for name in s["class_counts"]),
             f"ECE: before {before['ece']:.3f}, after {after['ece']:.3f}"
             + (" — adaptation made calibration WORSE on these images" if s["ece_worse_after"] else ""),
             _coverage_line(s["conformal"]),
             f"calibration of the child: {s['calibration']['description']}"]
    return lines + [f"warning: {w}" for w in s["warnings"]]
