"""Conformal prediction sets: the classes a model cannot rule out, with a coverage guarantee.

Split conformal prediction, class-conditional (Mondrian): held-out images of each class calibrate
that class alone, so that for every class, an image of that class gets a set containing it with
probability at least ``coverage`` (default 90%) — provided new images are exchangeable with the
calibration images. On shifted data (another hospital, another population) the guarantee does not
hold, and :func:`set_metrics` measured on such data shows by how much it fails.

The p-values come from ``crepes`` (Boström, 2022-2026): a Mondrian ``ConformalClassifier`` fitted on
the calibration images' non-conformity scores, with their true class as the Mondrian category, and
asked for each candidate class in that class's category. Non-smoothed p-values keep the sets
deterministic (the same image always gets the same set). A class is in the set when its p-value is
above ``1 - coverage``. A class with fewer than :func:`min_calibration_images` calibration images
(9 at 90%) cannot be calibrated alone: sets fitted with ``fallback="pooled"`` (every set fitted since
the site-adaptation work) give it the threshold of all classes' scores pooled (ordinary split
conformal, marginal coverage) and say so in :attr:`ConformalSets.pooled`; older bundles' sets keep
it in every set. A class declared ``absent`` (it does not occur where the model is used) is in no set.

Under a shift between the calibration images and a site's, sets lose their coverage. Weighted split
conformal (Tibshirani et al., 2019) restores it for a covariate shift: each calibration image gets the
likelihood ratio ``w(x) = p_site(x) / p_cal(x)`` (from a domain classifier, :mod:`chestxray.adapt`), and
the threshold is the weighted quantile in which the new image counts with weight ``test_weight``.

Non-conformity scores (``SCORES``), computed from calibrated probabilities:

* ``lac`` (least ambiguous set-valued classifier, Sadinle et al. 2019): ``1 - p_c``; the smallest
  sets on average;
* ``aps`` (adaptive prediction sets, Romano et al. 2020): the probability mass of the classes at
  least as probable as ``c``; larger sets for uncertain images;
* ``raps`` (Angelopoulos et al. 2021): ``aps`` plus ``RAPS_LAMBDA`` per rank beyond ``RAPS_K``.

Everything here works on numpy probabilities and labels: training, cross-validation and site
adaptation all call :func:`fit_conformal` on whatever held-out data they have.
"""

from __future__ import annotations

__all__ = ["SCORES", "DEFAULT_SCORE", "DEFAULT_COVERAGE", "RAPS_LAMBDA", "RAPS_K", "nonconformity", "ConformalSets",
           "check_coverage", "fit_conformal", "min_calibration_images", "set_metrics"]

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ChestXrayError

SCORES = ("lac", "aps", "raps")
DEFAULT_SCORE = "lac"
DEFAULT_COVERAGE = 0.90
RAPS_LAMBDA = 0.05
RAPS_K = 1


def nonconformity(probs: np.ndarray, score: str = DEFAULT_SCORE) -> np.ndarray:
    """Non-conformity (N, C) of every class as the answer for each row of ``probs`` (N, C): larger = less plausible."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ChestXrayError(f"conformal: probabilities must be (N, C), got shape {probs.shape}")
    if score == "lac":
        return 1.0 - probs
    if score not in SCORES:
        raise ChestXrayError(f"unknown conformal score {score!r}: use one of {', '.join(SCORES)}")
    # mass of the classes at least as probable as each class (ties count in full: deterministic)
    at_least = (probs[:, None, :] >= probs[:, :, None]).astype(np.float64)
    mass = (at_least * probs[:, None, :]).sum(-1)
    if score == "aps":
        return mass
    rank = at_least.sum(-1)  # 1 for the most probable class
    return mass + RAPS_LAMBDA * np.maximum(0.0, rank - RAPS_K)


@dataclass
class ConformalSets:
    """Fitted class-conditional conformal sets: ``sets(probs)`` gives which classes each image may be.

    ``calibration`` holds, per class, the sorted non-conformity scores of its calibration images
    (stored in the bundle: any coverage can be asked for later without refitting).
    """

    classes: list[str]
    score: str = DEFAULT_SCORE
    coverage: float = DEFAULT_COVERAGE
    calibration: dict[str, np.ndarray] = field(default_factory=dict)
    fitted_on: str = ""
    fallback: str = "always"
    """What a class with too few calibration images gets: ``always`` (in every set) or ``pooled``."""
    absent: tuple[str, ...] = ()
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    """Per class, the weight of each calibration score (aligned with the sorted scores); empty: all 1."""
    test_weight: float = 1.0

    def __post_init__(self) -> None:
        check_coverage(self.coverage)
        if self.score not in SCORES:
            raise ChestXrayError(f"unknown conformal score {self.score!r}: use one of {', '.join(SCORES)}")
        if self.fallback not in ("always", "pooled"):
            raise ChestXrayError(f"unknown conformal fallback {self.fallback!r}: use always or pooled")
        unknown = set(self.absent) - set(self.classes)
        if unknown or len(set(self.absent)) >= len(self.classes):
            raise ChestXrayError(f"conformal: absent classes {sorted(self.absent)} must be some of {self.classes}")
        order = {name: np.argsort(np.asarray(self.calibration.get(name, ()), dtype=np.float64), kind="stable")
                 for name in self.classes}
        self.calibration = {name: np.asarray(self.calibration.get(name, ()), dtype=np.float64)[order[name]]
                            for name in self.classes}
        self.weights = {name: np.asarray(w, dtype=np.float64)[order[name]] for name, w in self.weights.items()}
        self._crepes: Any = None

    def p_values(self, probs: np.ndarray) -> np.ndarray:
        """Class-conditional conformal p-value (N, C) of each class for each probability row (crepes)."""
        alphas = self._alphas(probs)
        if not len(alphas):
            return np.zeros_like(alphas)
        if self._crepes is None:  # imported on first use: it pulls in scikit-learn
            from crepes import ConformalClassifier

            labels = np.concatenate([np.full(len(self.calibration.get(c, ())), k) for k, c in enumerate(self.classes)])
            scores = np.concatenate([np.asarray(self.calibration.get(c, ()), dtype=np.float64) for c in self.classes])
            self._crepes = ConformalClassifier().fit(scores, bins=labels.astype(int))
        return np.stack([self._crepes.predict_p(alphas[:, k], bins=np.full(len(alphas), k), smoothing=False)
                         for k in range(len(self.classes))], axis=1)

    def sets(self, probs: np.ndarray, coverage: float | None = None) -> np.ndarray:
        """Boolean (N, C): the classes in each image's prediction set at ``coverage`` (default: the stored one).

        For unweighted sets whose classes all have enough calibration images, the same decision as
        "p-value above ``1 - coverage``" (tested against crepes' p-values); pooled thresholds, weights and
        absent classes apply here only (:meth:`p_values` stays the plain Mondrian p-value). Taken from
        :meth:`thresholds` with numpy alone, so that prediction stays light.
        """
        alphas = self._alphas(probs)
        limits = np.array([np.inf if t is None else t for t in self.thresholds(coverage).values()])
        inside = alphas <= limits[None, :] + 1e-12
        if self.absent:
            inside[:, [self.classes.index(name) for name in self.absent]] = False
        return inside

    def _alphas(self, probs: np.ndarray) -> np.ndarray:
        alphas = nonconformity(probs, self.score)
        if alphas.shape[1] != len(self.classes):
            raise ChestXrayError(f"conformal: {alphas.shape[1]} probabilities for {len(self.classes)} classes")
        return alphas

    def thresholds(self, coverage: float | None = None) -> dict[str, float | None]:
        """Per class, the largest non-conformity admitted at ``coverage``; ``None``: that class is always in the set."""
        level = check_coverage(self.coverage if coverage is None else coverage)
        out: dict[str, float | None] = {}
        for name in self.classes:
            out[name] = _quantile(self.calibration[name], self.weights.get(name), level, self.test_weight)
        pooled = self.pooled_classes(level)
        if pooled:
            present = [name for name in self.classes if name not in self.absent]
            scores = np.concatenate([self.calibration[name] for name in present])
            weights = np.concatenate([self.weights.get(name, np.ones(len(self.calibration[name]))) for name in present])
            order = np.argsort(scores, kind="stable")
            threshold = _quantile(scores[order], weights[order], level, self.test_weight)
            out.update({name: threshold for name in pooled})
        return out

    def pooled_classes(self, coverage: float | None = None) -> list[str]:
        """The classes too thinly calibrated to stand alone that take the pooled threshold (``fallback="pooled"``)."""
        if self.fallback != "pooled":
            return []
        needed = min_calibration_images(check_coverage(self.coverage if coverage is None else coverage))
        return [name for name in self.classes if name not in self.absent and len(self.calibration[name]) < needed]

    def calibration_counts(self) -> dict[str, int]:
        """Calibration images per class."""
        return {name: len(self.calibration.get(name, ())) for name in self.classes}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, stored in the bundle's ``model.json`` under ``conformal``."""
        return {"method": "split-conformal, class-conditional (Mondrian), crepes", "score": self.score,
                "coverage": self.coverage, "fitted_on": self.fitted_on,
                "counts": self.calibration_counts(),
                "thresholds": self.thresholds(),
                "calibration": {name: [round(float(v), 6) for v in self.calibration[name]] for name in self.classes},
                "fallback": self.fallback, "pooled": self.pooled_classes(), "absent": list(self.absent),
                **({"weights": {name: [round(float(v), 6) for v in w] for name, w in self.weights.items()},
                    "test_weight": self.test_weight} if self.weights else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any], classes: list[str]) -> ConformalSets:
        """Rebuild from :meth:`to_dict`'s output (``classes``: the bundle's class order)."""
        try:
            calibration = {name: np.asarray(data["calibration"].get(name, []), dtype=np.float64) for name in classes}
            weights = {name: np.asarray(w, dtype=np.float64) for name, w in (data.get("weights") or {}).items()}
            if set(weights) - set(classes) or any(len(w) != len(calibration[n]) or not np.all(w >= 0)
                                                  for n, w in weights.items()):
                raise ValueError("weights do not match the calibration scores")
            return cls(list(classes), str(data["score"]), float(data["coverage"]), calibration,
                       str(data.get("fitted_on", "")), str(data.get("fallback", "always")),
                       tuple(data.get("absent") or ()), weights, float(data.get("test_weight", 1.0)))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ChestXrayError(f"malformed conformal sets in the bundle ({type(err).__name__}: {err})") from None


def check_coverage(coverage: float) -> float:
    """``coverage`` if it is a share strictly between 0 and 1, else a clear error."""
    if not isinstance(coverage, (int, float)) or isinstance(coverage, bool) or not 0.0 < float(coverage) < 1.0:
        raise ChestXrayError(f"conformal coverage must be a share between 0 and 1 (e.g. 0.9), not {coverage!r}")
    return float(coverage)


def _quantile(scores: np.ndarray, weights: np.ndarray | None, level: float, test_weight: float) -> float | None:
    """The conformal threshold of sorted ``scores``: the smallest score whose (weighted) share, with the new
    image counted at ``test_weight`` as an infinite score, reaches ``level``; ``None``: no finite one does."""
    if not len(scores):
        return None
    if weights is None:
        rank = int(np.ceil((len(scores) + 1) * level))
        return float(scores[rank - 1]) if rank <= len(scores) else None
    cumulative = np.cumsum(weights)
    k = int(np.searchsorted(cumulative, level * (cumulative[-1] + test_weight) - 1e-12))
    return float(scores[k]) if k < len(scores) else None


def fit_conformal(probs: np.ndarray, labels: np.ndarray, classes: list[str], *,
                  coverage: float = DEFAULT_COVERAGE, score: str = DEFAULT_SCORE,
                  fitted_on: str = "", absent: tuple[str, ...] | list[str] = (),
                  weights: np.ndarray | None = None, test_weight: float = 1.0) -> ConformalSets:
    """Fit class-conditional conformal sets on held-out calibrated probabilities (N, C) and class indices (N,).

    The images must not have trained the model (validation, out-of-fold or a site's own labelled
    images). ``fitted_on`` says which, for the model card. A class with too few images takes the pooled
    threshold; ``absent`` classes are in no set; ``weights`` (N,) and ``test_weight`` give weighted split
    conformal (see the module docstring).
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or probs.shape[1] != len(classes) or labels.shape != (len(probs),):
        raise ChestXrayError(f"conformal: need probabilities (N, {len(classes)}) and one class index each, "
                             f"got {probs.shape} and {labels.shape}")
    if not len(probs):
        raise ChestXrayError("conformal: no held-out images to calibrate on")
    labels = labels.astype(int)
    if labels.min() < 0 or labels.max() >= len(classes):
        raise ChestXrayError(f"conformal: class indices must be in 0..{len(classes) - 1}")
    alphas = nonconformity(probs, score)[np.arange(len(labels)), labels]
    calibration = {name: alphas[labels == k] for k, name in enumerate(classes)}
    by_class = {} if weights is None else {name: np.asarray(weights, dtype=np.float64)[labels == k]
                                           for k, name in enumerate(classes)}
    return ConformalSets(list(classes), score, check_coverage(coverage), calibration, fitted_on, "pooled",
                         tuple(absent), by_class, float(test_weight))


def min_calibration_images(coverage: float) -> int:
    """Fewest calibration images a class needs before it can ever be left out of a set at ``coverage``."""
    level = check_coverage(coverage)
    return int(np.ceil(level / (1.0 - level) - 1e-9))


def set_metrics(sets: np.ndarray, y_true: np.ndarray, classes: list[str], *, coverage: float | None = None,
                n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Empirical coverage and set sizes of prediction ``sets`` (N, C) bool against true class indices (N,).

    Per class: coverage (the share of its images whose set holds it) with a Wilson interval, and the
    mean set size with a bootstrap interval; overall: coverage, mean set size (stratified bootstrap
    interval), the share of single-class and of empty sets. ``coverage`` is the target, for the record.
    """
    from .metrics import bootstrap_ci, proportion_interval

    sets, y_true = np.asarray(sets, dtype=bool), np.asarray(y_true).astype(int)
    if sets.ndim != 2 or sets.shape != (len(y_true), len(classes)):
        raise ChestXrayError(f"conformal: sets must be (N, {len(classes)}) for N labels, got {sets.shape}")
    covered = sets[np.arange(len(y_true)), y_true]
    size = sets.sum(1).astype(float)

    def mean_size(truth: np.ndarray, rows: np.ndarray) -> float:
        return float(rows[:, 0].mean())

    def interval(values: np.ndarray, truth: np.ndarray) -> list[float | None]:
        if len(values) < 2:
            return [None, None]
        low, high = bootstrap_ci(mean_size, truth, values[:, None], n_boot, seed, ci)  # stratified by class
        return [float(low), float(high)]

    per_class = {}
    for k, name in enumerate(classes):
        mine = y_true == k
        share, share_ci = proportion_interval(int(covered[mine].sum()), int(mine.sum()), ci)
        per_class[name] = {"n": int(mine.sum()), "coverage": share, "coverage_ci": share_ci,
                           "mean_set_size": float(size[mine].mean()) if mine.any() else None,
                           "mean_set_size_ci": interval(size[mine], y_true[mine])}
    total, total_ci = proportion_interval(int(covered.sum()), len(covered), ci)
    return {"target_coverage": coverage, "n": int(len(y_true)), "coverage": total, "coverage_ci": total_ci,
            "mean_set_size": float(size.mean()) if len(size) else None,
            "mean_set_size_ci": interval(size, y_true),
            "single_class_share": float((size == 1).mean()) if len(size) else None,
            "empty_share": float((size == 0).mean()) if len(size) else None,
            "ci_level": ci, "per_class": per_class}
