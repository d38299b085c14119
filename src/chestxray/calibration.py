"""Calibration: what a trained model needs besides its weights before its outputs can be trusted,
fitted on images it did not train on.

:func:`calibrate` runs a model (or any runner) on held-out images and returns a :class:`Calibration`:

- ``temperature``: the temperature minimising the held-out cross-entropy (multi-class; 1 for
  multi-label models), applied to every probability the bundle gives;
- ``operating_points``: per class, thresholds on the calibrated probability (Youden, 90% and 95%
  sensitivity) chosen on the held-out images (:func:`chestxray.metrics.operating_points`);
- ``ood``: the out-of-distribution guard (:class:`chestxray.ood.OODGuard`, as its dict), fitted on
  the features of the images the model trained on and thresholded on held-out ones;
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ChestXrayError
from .metrics import LogitScores, fit_temperature, logit_scores, logits_to_probs, operating_points
from .ood import OODGuard
from .runners import Runner, as_runner, run_images

__all__ = ["Calibration", "calibrate", "calibrate_outputs", "SCORING_BATCH"]

log = logging.getLogger(__name__)

SCORING_BATCH = 64
"""Images per runner call when training scores and calibrates (prediction uses ``runners.DEFAULT_BATCH``)."""


@dataclass
class Calibration:
    """A model's calibration (see the module docstring). The defaults are an uncalibrated model."""

    temperature: float = 1.0
    operating_points: dict[str, dict[str, float]] = field(default_factory=dict)
    ood: dict[str, Any] | None = None
    scores: LogitScores | None = None
    loss_calibrated: float | None = None

    def bundle_fields(self) -> dict[str, Any]:
        """The ``BundleMeta`` fields this calibration sets: ``BundleMeta(..., **calibration.bundle_fields())``."""
        return {"temperature": float(self.temperature), "operating_points": self.operating_points, "ood": self.ood}


def calibrate(model: Runner | Any, images: np.ndarray, targets: np.ndarray, *, classes: list[str], task: str | None = None,
              guard_images: np.ndarray | None = None, guard_targets: np.ndarray | None = None,
              batch_size: int = SCORING_BATCH) -> Calibration:
    """Calibrate ``model`` (a ``ChestXrayNet``/``EnsembleNet`` or a runner) on held-out uint8 squares
    ``images`` (N, S, S) with their ``targets`` (class indices, or a 0/1 matrix for multi-label).

    ``task`` defaults to the model's. The OOD guard is fitted on ``guard_images`` (the training
    images, with ``guard_targets``) and thresholded with the held-out ``images`` too; without
    ``guard_images`` there is no guard.
    """
    task = task or getattr(model, "task", "multiclass")
    runner = as_runner(model)
    guard_features = run_images(runner, guard_images, batch_size)[1] if guard_images is not None else None
    logits, features = run_images(runner, images, batch_size)
    return calibrate_outputs(logits, targets, classes=classes, task=task, features=features,
                             guard_features=guard_features, guard_targets=guard_targets)


def calibrate_outputs(logits: np.ndarray, targets: np.ndarray, *, classes: list[str], task: str,
                      features: np.ndarray | None = None, guard_features: np.ndarray | None = None,
                      guard_targets: np.ndarray | None = None) -> Calibration:
    """:func:`calibrate` from outputs already computed: held-out ``logits`` (N, C) and ``features``,
    and the training ``guard_features`` for the OOD guard (none without them)."""
    calibration = Calibration()
    if guard_features is not None:
        calibration.ood = _fit_guard(guard_features, guard_targets, features)
    if not len(logits):
        return calibration
    calibration.scores = logit_scores(logits, targets, task)
    if task == "multiclass":
        calibration.temperature = fit_temperature(logits, targets)
        calibration.loss_calibrated = logit_scores(logits / calibration.temperature, targets, task).loss
    probs = logits_to_probs(logits, task, calibration.temperature)
    calibration.operating_points = operating_points(targets, probs, classes)
    return calibration


def _fit_guard(features: np.ndarray, targets: np.ndarray | None, held_out: np.ndarray | None) -> dict[str, Any] | None:
    """The OOD guard's dict, or ``None`` (logged) when the data are too few to fit one."""
    try:
        return OODGuard.fit(features, targets, val_features=held_out).to_dict()
    except ChestXrayError as err:  # e.g. too few images in a tiny run
        log.warning("no out-of-distribution guard: %s", err)
        return None
