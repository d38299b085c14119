"""Out-of-distribution guard: how far an image's features lie from the training images'.

Method: class-conditional Mahalanobis distance (Lee et al., NeurIPS 2018) on the model's pooled
penultimate features, under a probabilistic-PCA covariance (Tipping & Bishop 1999) shared by the
classes, so that it stays well-posed and small when there are fewer training images than feature
dimensions (Lite0: F = 1280 with a few hundred images):

* features are power-normalised (signed square root), which evens out the heavy right tail of
  pooled ReLU activations;
* each class has its own mean; the within-class scatter is modelled by its top ``k`` principal
  axes (variances ``lambda``) plus an isotropic residual variance ``sigma2`` in the other
  directions; the squared distance to class ``c`` is
  ``sum_i z_i^2 / lambda_i + |residual|^2 / sigma2`` with ``z`` the coordinates of ``x - mu_c``
  on the axes;
* the score is the square root of the smallest squared distance over the classes (for
  multi-label data a single pooled mean).

The residual term carries most of the signal: photos, documents, other modalities, blank or
rotated images excite feature directions that chest X-rays never use. Softmax-based scores (max
probability, energy) fail on this problem: a photo often gets a *more* confident prediction than
an X-ray. The threshold is the ``quantile`` (default 0.99) of the scores of held-out in-distribution
images: out-of-fold training images (5-fold cross-fitting; scores of the images the guard was
fitted on are biased low), pooled with the validation images when given. A 99th percentile of the
validation images alone (about 100 on the course dataset) is close to their maximum and moves
with one image; pooling gives five times as many held-out scores. At 0.99 about 1% of in-distribution
images are flagged by design; a 0.95 threshold flagged 3-10% of real test and other-hospital
X-rays for no gain on the clearly foreign inputs (``bench/bench_ood.py``).

Besides the binary flag, :meth:`OODGuard.percentile` places a score among the held-out scores
("less typical than 97% of held-out training X-rays"), which tells a caller how unusual an image
is before it crosses the threshold; the held-out scores travel with the guard (about 3 KB for 500).

The fitted guard is a JSON-serialisable dict (arrays as base64 float32) stored in the bundle's
``model.json`` under ``ood``; about 0.25 MB for Lite0 with four classes.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import ChestXrayError

__all__ = ["power_normalise", "OODGuard", "cross_fitted_scores", "typicality"]

METHOD = "ppca-mahalanobis"
VERSION = 1
DEFAULT_COMPONENTS = 32
DEFAULT_QUANTILE = 0.99
_FOLDS = 5
_MIN_VARIANCE = 1e-6


def _encode(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array, dtype="<f4")
    return {"shape": list(array.shape), "float32": base64.b64encode(array.tobytes()).decode("ascii")}


def _decode(item: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(item["float32"]), dtype="<f4").reshape(item["shape"]).astype(np.float64)


def typicality(percentile: float | None, quantile: float | None = DEFAULT_QUANTILE) -> str:
    """What an OOD percentile means, in words: ``less typical than 82% of training X-rays: usual``.

    Usual below the 90th percentile, unusual up to the guard's threshold (its ``quantile``), and past it
    unlike the training X-rays (flagged)."""
    if percentile is None or np.isnan(percentile):
        return "not checked (this bundle has no out-of-distribution guard)"
    limit = 100 * (quantile if quantile is not None else DEFAULT_QUANTILE)
    verdict = ("usual" if percentile < 90 else "unusual" if percentile < limit
               else "unlike the training X-rays (flagged)")
    return f"less typical than {percentile:.0f}% of training X-rays: {verdict}"


def power_normalise(features: np.ndarray) -> np.ndarray:
    """Signed square root of the features (float64)."""
    features = np.asarray(features, dtype=np.float64)
    return np.sign(features) * np.sqrt(np.abs(features))


@dataclass
class OODGuard:
    """A fitted guard: ``score(features)`` distances and the ``threshold`` above which an image is flagged."""

    means: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    noise_variance: float
    threshold: float
    quantile: float = DEFAULT_QUANTILE
    held_out: np.ndarray = field(default_factory=lambda: np.empty(0))

    @classmethod
    def fit(cls, features: np.ndarray, targets: np.ndarray | None = None, *,
            val_features: np.ndarray | None = None, n_components: int = DEFAULT_COMPONENTS,
            quantile: float = DEFAULT_QUANTILE) -> OODGuard:
        """Fit on training features (N, F) with class indices (N,) (``None`` or a multi-label 0/1
        matrix: one pooled mean).

        The threshold is the ``quantile`` of the held-out scores: out-of-fold scores of the
        training features, pooled with the scores of ``val_features`` when given.
        """
        features, labels = _fit_labels(features, targets)
        guard = cls._fit_axes(features, labels, n_components)
        held_out = _out_of_fold_scores(features, labels, n_components)
        if val_features is not None and len(val_features):
            held_out = np.concatenate([held_out, guard.score(val_features)])
        if not len(held_out):
            raise ChestXrayError("OOD guard: every class needs two training images, or validation images, "
                                 "to set a threshold")
        guard.quantile = float(quantile)
        guard.threshold = float(np.quantile(held_out, quantile))
        guard.held_out = np.sort(held_out)
        return guard

    @classmethod
    def _fit_axes(cls, features: np.ndarray, labels: np.ndarray, n_components: int) -> OODGuard:
        from sklearn.decomposition import PCA  # fitting only: scoring needs numpy alone

        x = power_normalise(features)
        classes = np.unique(labels)
        if len(x) <= len(classes) + 1:
            raise ChestXrayError(f"OOD guard: {len(x)} images are too few to fit on")
        means = np.stack([x[labels == c].mean(0) for c in classes])
        within = x - means[np.searchsorted(classes, labels)]
        k = max(1, min(n_components, len(x) - len(classes) - 1, x.shape[1] - 1))
        pca = PCA(k, svd_solver="full").fit(within)
        variances = np.maximum(pca.explained_variance_, _MIN_VARIANCE)
        noise = max(float(pca.noise_variance_), _MIN_VARIANCE)
        return cls(means, pca.components_, variances, noise, threshold=float("inf"))

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance (N,) of each feature row to the nearest class; larger = less like the training images."""
        x = power_normalise(features)
        if x.ndim != 2 or x.shape[1] != self.means.shape[1]:
            raise ChestXrayError(f"OOD guard: expected features (N, {self.means.shape[1]}), got {x.shape}")
        squared = np.empty((len(x), len(self.means)))
        for c, mean in enumerate(self.means):
            diff = x - mean
            z = diff @ self.components.T
            residual = np.maximum((diff**2).sum(1) - (z**2).sum(1), 0.0)
            squared[:, c] = (z**2 / self.variances).sum(1) + residual / self.noise_variance
        return np.sqrt(squared.min(1))

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Share (0-100) of the held-out in-distribution scores below each score; NaN without them.

        50 is a typical training X-ray; the threshold sits at ``100 * quantile``.
        """
        scores = np.asarray(scores, dtype=float)
        if not len(self.held_out):
            return np.full(scores.shape, np.nan)
        below = np.searchsorted(self.held_out, scores, side="left") / len(self.held_out)
        return np.where(np.isnan(scores), np.nan, 100 * below)

    def with_reference(self, scores: np.ndarray) -> OODGuard:
        """This guard with ``scores`` of more held-out in-distribution images (e.g. a site's own X-rays)
        pooled into its reference scores, and its threshold set again at its quantile of the pool."""
        scores = np.asarray(scores, dtype=float)
        pooled = np.sort(np.concatenate([self.held_out, scores[np.isfinite(scores)]]))
        if not len(pooled):
            return self
        return replace(self, held_out=pooled, threshold=float(np.quantile(pooled, self.quantile)))

    def is_ood(self, scores: np.ndarray) -> np.ndarray:
        """Boolean flags: the scores above the threshold (NaN scores are not flagged)."""
        return np.asarray(scores, dtype=float) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, stored in the bundle's ``model.json`` under ``ood``."""
        return {"method": METHOD, "version": VERSION, "transform": "signed_sqrt",
                "threshold": self.threshold, "quantile": self.quantile, "noise_variance": self.noise_variance,
                "means": _encode(self.means), "components": _encode(self.components),
                "variances": _encode(self.variances), "held_out": _encode(self.held_out)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OODGuard:
        """Rebuild a guard from :meth:`to_dict`'s output."""
        if data.get("method") != METHOD or data.get("version") != VERSION:
            raise ChestXrayError(f"unknown OOD guard {data.get('method')!r} version {data.get('version')!r} "
                                 f"(this version reads {METHOD} version {VERSION})")
        try:
            held_out = _decode(data["held_out"]) if "held_out" in data else np.empty(0)  # older bundles lack it
            return cls(_decode(data["means"]), _decode(data["components"]), _decode(data["variances"]),
                       float(data["noise_variance"]), float(data["threshold"]), float(data["quantile"]),
                       np.sort(held_out))
        except (KeyError, ValueError, TypeError) as err:
            raise ChestXrayError(f"malformed OOD guard in the bundle ({type(err).__name__}: {err})") from None


def _fit_labels(features: np.ndarray, targets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Features as an array and the class index of each row (all 0 for ``None`` or multi-label targets)."""
    features = np.asarray(features)
    pooled = targets is None or np.asarray(targets).ndim != 1
    labels = np.zeros(len(features), dtype=int) if pooled else np.asarray(targets).astype(int)
    if features.ndim != 2 or labels.shape != (len(features),):
        raise ChestXrayError(f"OOD guard: need features (N, F) and one class index each, got "
                             f"{features.shape} and {labels.shape}")
    return features, labels


def cross_fitted_scores(features: np.ndarray, targets: np.ndarray | None = None, *,
                        n_components: int = DEFAULT_COMPONENTS) -> np.ndarray:
    """The score of each training row (in row order) under a guard fitted without its fold: the
    held-out scores :meth:`OODGuard.fit` sets its threshold on, for data that has no other held-out
    images (a cross-validation ensemble). Empty when a class has a single image."""
    features, labels = _fit_labels(features, targets)
    return _out_of_fold_scores(features, labels, n_components)


def _out_of_fold_scores(features: np.ndarray, labels: np.ndarray, n_components: int) -> np.ndarray:
    """Scores of each training row under a guard fitted without its fold (empty when a class has one image)."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    folds = min(_FOLDS, int(counts[counts > 0].min()))
    if folds < 2:
        return np.empty(0)
    scores = np.empty(len(features))
    for fit_rows, held_rows in StratifiedKFold(folds, shuffle=True, random_state=0).split(features, labels):
        scores[held_rows] = OODGuard._fit_axes(features[fit_rows], labels[fit_rows], n_components).score(
            features[held_rows])
    return scores
