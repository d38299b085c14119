"""Calibration: what a trained model needs besides its weights before its outputs can be trusted,
fitted on images it did not train on.

:func:`calibrate` runs a model (or any runner) on held-out images and returns a :class:`Calibration`:

- ``transform``: the logit transform (none, temperature or vector scaling,
  :class:`chestxray.logit_transform.LogitTransform`) chosen by cross-validated held-out NLL with the
  one-standard-error rule and never sharpening (:func:`~chestxray.logit_transform.choose_logit_transform`),
  applied to every probability the bundle gives; ``transform_choice`` records the evidence;
- ``temperature``: the transform's temperature (1 unless it is a temperature), kept for older readers;
- ``operating_points``: per class, thresholds on the calibrated probability (Youden, 90% and 95%
  sensitivity) chosen on the held-out images (:func:`chestxray.metrics.operating_points`);
- ``ood``: the out-of-distribution guard (:class:`chestxray.ood.OODGuard`, as its dict), fitted on
  the features of the images the model trained on and thresholded on held-out ones;
- ``conformal``: class-conditional conformal prediction sets (:func:`chestxray.conformal.fit_conformal`,
  as its dict) on the calibrated held-out probabilities (multi-class only);
- ``reference``: the held-out predicted-class shares and referral rate, the baseline of serve's drift
  monitor, and ``validation``: held-out accuracy, balanced accuracy and macro AUC with bootstrap
  intervals (both go into the bundle's ``extra``);
- ``scores``: the held-out figures before calibration and ``loss_calibrated`` after it (a record,
  not stored in the bundle).

Training (:func:`chestxray.train.fit`) calibrates on its validation split, cross-validation's
ensemble on the out-of-fold outputs (:func:`calibrate_outputs`), and a deployed bundle can be
recalibrated on a site's own labelled images the same way.

Extending it (a new quantity fitted on held-out outputs, e.g. a logit transform or conformal
thresholds): add a field with a default to :class:`Calibration`, compute it in
:func:`calibrate_outputs`, and, when predictions need it, add it to :meth:`Calibration.bundle_fields`
and to ``BundleMeta`` (in ``bundle._OPTIONAL`` so older bundles still load).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..stats.conformal import DEFAULT_COVERAGE, ConformalSets, fit_conformal, min_calibration_images
from ..constants import MULTILABEL_THRESHOLD
from ..errors import ChestXrayError
from ..stats.logit_transform import TRAIN_KINDS, LogitTransform, choose_logit_transform, per_image_nll
from ..stats.metrics import LogitScores, classification_metrics, logit_scores, operating_points
from ..stats.ood import OODGuard
from .referral import refer_mask
from ..model.runners import DEFAULT_BATCH, Runner, as_runner, run_images

__all__ = ["Calibration", "calibrate", "calibrate_outputs", "fit_guard", "MIN_GUARD_IMAGES"]

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """A model's calibration (see the module docstring). The defaults are an uncalibrated model."""

    temperature: float = 1.0
    operating_points: dict[str, dict[str, float]] = field(default_factory=dict)
    ood: dict[str, Any] | None = None
    conformal: dict[str, Any] | None = None
    reference: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    scores: LogitScores | None = None
    loss_calibrated: float | None = None
    transform: LogitTransform = field(default_factory=LogitTransform)
    transform_choice: dict[str, Any] | None = None
    held_out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, compare=False, repr=False)
    """``(logits, features, targets)`` of the held-out images (from :func:`calibrate`): the bundle keeps
    them (``heldout.npz``) for label-free site adaptation."""

    def bundle_fields(self) -> dict[str, Any]:
        """The ``BundleMeta`` fields this calibration sets: ``BundleMeta(..., **calibration.bundle_fields())``."""
        return {"temperature": float(self.temperature), "operating_points": self.operating_points, "ood": self.ood,
                "conformal": self.conformal, "calibration": self.transform.to_dict()}

    def extra_fields(self) -> dict[str, Any]:
        """What this calibration adds to ``BundleMeta.extra``: the drift reference and the held-out figures."""
        return {"reference": self.reference, "validation": self.validation}


def calibrate(model: Runner | Any, images: np.ndarray, targets: np.ndarray, *, classes: list[str], task: str | None = None,
              guard_images: np.ndarray | None = None, guard_targets: np.ndarray | None = None,
              batch_size: int = DEFAULT_BATCH, fitted_on: str = "held-out images", seed: int = 0,
              coverage: float = DEFAULT_COVERAGE, groups: np.ndarray | None = None) -> Calibration:
    """Calibrate ``model`` (a ``ChestXrayNet``/``EnsembleNet`` or a runner) on held-out uint8 squares
    ``images`` (N, S, S) with their ``targets`` (class indices, or a 0/1 matrix for multi-label).

    ``task`` defaults to the model's. The OOD guard is fitted on ``guard_images`` (the training
    images, with ``guard_targets``) and thresholded with the held-out ``images`` too; without
    ``guard_images`` there is no guard; ``groups`` as in :func:`calibrate_outputs`.
    """
    task = task or getattr(model, "task", "multiclass")
    runner = as_runner(model)
    guard_features = run_images(runner, guard_images, batch_size)[1] if guard_images is not None else None
    logits, features = run_images(runner, images, batch_size)
    calibration = calibrate_outputs(logits, targets, classes=classes, task=task, features=features,
                                    guard_features=guard_features, guard_targets=guard_targets, fitted_on=fitted_on,
                                    seed=seed, coverage=coverage, groups=groups)
    if task == "multiclass" and len(logits):
        calibration.held_out = (logits, features, np.asarray(targets))
    return calibration


def calibrate_outputs(logits: np.ndarray, targets: np.ndarray, *, classes: list[str], task: str,
                      features: np.ndarray | None = None, guard_features: np.ndarray | None = None,
                      guard_targets: np.ndarray | None = None, fitted_on: str = "held-out images",
                      seed: int = 0, coverage: float = DEFAULT_COVERAGE,
                      ood_flags: np.ndarray | None = None, groups: np.ndarray | None = None,
                      kinds: Sequence[str] = TRAIN_KINDS, sharpen: bool = False,
                      ood: dict[str, Any] | None = None, absent: Sequence[int] = (),
                      weights: np.ndarray | None = None, test_weight: float = 1.0) -> Calibration:
    """:func:`calibrate` from outputs already computed: held-out ``logits`` (N, C) and ``features``,
    and the training ``guard_features`` for the OOD guard (none without them), or ``ood``, a guard
    already fitted (its dict). ``fitted_on`` says which images these are (kept with the conformal
    sets, the reference and the validation figures); ``seed`` drives the folds and the bootstrap of
    the validation intervals. ``ood_flags``: the held-out images' OOD flags from a guard fitted
    elsewhere (a CV ensemble's), for the reference referral rate. ``groups`` (patient of each
    held-out image) keep a patient's images in one fold when the transform is chosen among
    ``kinds``; ``sharpen`` allows scales above 1 (a site's own images, :mod:`chestxray.adapt`; never a
    model's own validation images). ``absent`` (class indices that do not occur where the model is used)
    get probability 0 and no place in a set; ``weights`` and ``test_weight`` make the sets weighted split
    conformal (:mod:`chestxray.conformal`)."""
    calibration = Calibration(ood=ood)
    if guard_features is not None:
        calibration.ood = fit_guard(guard_features, guard_targets, features)
    if not len(logits):
        return calibration
    calibration.reference, calibration.validation = {"n": int(len(logits)), "note": fitted_on}, {"note": fitted_on}
    calibration.scores = logit_scores(logits, targets, task)
    choice = choose_logit_transform(logits, targets, task, kinds=tuple(kinds), sharpen=sharpen, groups=groups,
                                    seed=seed)
    transform = choice.transform.without(absent) if len(absent) else choice.transform
    calibration.transform, calibration.transform_choice = transform, choice.to_dict()
    calibration.temperature = choice.transform.temperature
    calibration.loss_calibrated = float(per_image_nll(logits, targets, task, transform).mean())
    probs = transform.probabilities(logits, task)
    calibration.operating_points = operating_points(targets, probs, classes)
    if ood_flags is None and calibration.ood is not None and features is not None and len(features):
        guard = OODGuard.from_dict(calibration.ood)
        ood_flags = guard.is_ood(guard.score(features))
    _fit_trust(calibration, probs, targets, classes, task, ood_flags=ood_flags, fitted_on=fitted_on, seed=seed,
               coverage=coverage, absent=[classes[k] for k in absent], weights=weights, test_weight=test_weight)
    return calibration


def _fit_trust(calibration: Calibration, probs: np.ndarray, targets: np.ndarray, classes: list[str], task: str, *,
               ood_flags: np.ndarray | None, fitted_on: str, seed: int, coverage: float, absent: Sequence[str] = (),
               weights: np.ndarray | None = None, test_weight: float = 1.0) -> None:
    """Fill ``calibration``'s conformal sets, drift reference and validation figures from the calibrated
    held-out ``probs`` (non-empty); ``ood_flags``: the held-out images' OOD flags, for the referral rate."""
    if task == "multiclass":
        sets = fit_conformal(probs, targets, classes, coverage=coverage, fitted_on=fitted_on, absent=absent,
                             weights=weights, test_weight=test_weight)
        small = sets.pooled_classes()
        if small:
            log.warning("conformal sets: %s ha%s fewer than %d held-out images; %s the threshold of all classes "
                        "pooled (coverage over all images, not per class)", ", ".join(small),
                        "s" if len(small) == 1 else "ve", min_calibration_images(coverage),
                        "it takes" if len(small) == 1 else "they take")
        calibration.conformal = sets.to_dict()
        # as a loaded bundle's sets (scores stored rounded) refer these images: set not one class, or OOD
        refer = refer_mask(ConformalSets.from_dict(calibration.conformal, classes).sets(probs), ood_flags)
        calibration.reference["referral_rate"] = float(refer.mean())
        found = classification_metrics(targets, probs, classes, n_boot=1000, seed=seed)
        for name in ("accuracy", "balanced_accuracy", "macro_auc"):
            calibration.validation.update({name: found[name], f"{name}_ci": found["ci"][name]})
    # multi-label: the share of images each label is called for
    called = np.eye(len(classes), dtype=bool)[probs.argmax(1)] if task == "multiclass" else probs >= MULTILABEL_THRESHOLD
    calibration.reference["predicted_shares"] = {name: float(called[:, k].mean()) for k, name in enumerate(classes)}


MIN_GUARD_IMAGES = 100
"""Fewest training images the OOD guard is fitted on. Below this, the out-of-fold fits that set its threshold
see so few images that their principal axes span all of the within-class scatter and the residual variance
is estimated near zero: a 60-image bundle got a threshold of 9390.7 while real X-rays scored 15-45, and a
screenshot of a web page was not flagged. No guard is better than one that never fires."""


def fit_guard(features: np.ndarray, targets: np.ndarray | None, held_out: np.ndarray | None = None) -> dict[str, Any] | None:
    """The OOD guard's dict, or ``None`` (logged) when the data are too few to fit one (fewer than
    :data:`MIN_GUARD_IMAGES` training images, or a class too small)."""
    if len(features) < MIN_GUARD_IMAGES:
        log.warning("no out-of-distribution guard: %d training images are too few to fit one (it needs at least %d); "
                    "this bundle will not flag images unlike its training X-rays (photos, documents, other body parts)",
                    len(features), MIN_GUARD_IMAGES)
        return None
    try:
        return OODGuard.fit(features, targets, val_features=held_out).to_dict()
    except ChestXrayError as err:  # e.g. too few images in a tiny run
        log.warning("no out-of-distribution guard: %s", err)
        return None
