"""What a site's unlabelled images can teach a model: numpy and scikit-learn on its outputs, no files.

Used by ``chestxray adapt --unlabeled`` (:mod:`chestxray.adapt`), which runs the model and writes the child.

* :func:`centroid_pseudo_labels`: the site's images labelled by their nearest class centroid in the
  model's feature space, the centroids weighted by the model's own probabilities on the site (the
  self-supervised pseudo-labels of SHOT, Liang et al., ICML 2020). Prior correction alone (the EM of
  Saerens et al., 2002) moves only the class shares; at a new site the errors are confusions between
  classes, and the centroids move the boundaries to where the site's images cluster.
* :func:`fit_site_head`: a new linear classifier on the (standardised) features, fitted to those
  pseudo-labels, folded back into the model's classifier layer so that every backend (torch, ONNX)
  and every reader of a bundle runs it unchanged.
* :func:`domain_weights`: the likelihood ratio ``p_site(x) / p_reference(x)`` of the reference
  (validation) images from a domain classifier, for weighted split conformal sets
  (:mod:`chestxray.conformal`, Tibshirani et al., 2019).
* :func:`label_free_summary`: what adaptation changed, measured without a label (agreement with the
  parent, class shares, confidence, set sizes, referrals) and what cannot be checked without labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ChestXrayError
from ..stats.ood import power_normalise

__all__ = ["centroid_pseudo_labels", "SiteHead", "fit_site_head", "domain_weights", "label_free_summary", "choose_for_labelling",
           "choose_head_labels",
           "HEAD_C", "HEAD_CHOICE_FOLDS", "HEAD_CHOICE_REPEATS", "WEIGHT_RANGE"]

HEAD_C = 0.1
"""Inverse L2 penalty of the site head's logistic regression on standardised features (scikit-learn's ``C``)."""
WEIGHT_RANGE = (0.05, 20.0)
"""Likelihood ratios are clipped to this range: a few images the domain classifier is sure of must not
carry a whole class's calibration."""
MIN_SITE_IMAGES = 20
"""Fewest readable site images label-free adaptation runs on: centroids and a domain classifier need them."""

HEAD_CHOICE_FOLDS = 10
"""Most folds of :func:`choose_head_labels`' k-fold choice of the site head's labels."""
HEAD_CHOICE_REPEATS = 3
"""Shuffles of that k-fold, averaged."""


def _directions(features: np.ndarray) -> np.ndarray:
    """Power-normalised features scaled to unit length (their direction: cosine geometry)."""
    x = power_normalise(features)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def centroid_pseudo_labels(probs: np.ndarray, features: np.ndarray, present: np.ndarray,
                           known: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(labels (N,), centroids (C, F))``: each image's nearest class centroid (cosine) among the
    ``present`` classes (a boolean (C,)), the centroids averaged over the images weighted by ``probs``.
    ``known`` (N,): a label where a person gave one, -1 elsewhere; those images count for their own class
    only and keep their label.

    One round, as SHOT's pseudo-labelling: more rounds let large classes absorb neighbours.
    """
    probs, present = np.array(probs, dtype=np.float64), np.asarray(present, dtype=bool)
    labelled = None
    if known is not None:
        known = np.asarray(known)
        labelled = known >= 0
        probs[labelled] = np.eye(probs.shape[1])[known[labelled]]
    if probs.ndim != 2 or probs.shape[0] != len(features) or probs.shape[1] != len(present):
        raise ChestXrayError(f"pseudo-labels: probabilities {probs.shape} do not match features {np.shape(features)}")
    x = _directions(features)
    mass = probs.sum(0)
    centroids = (probs.T @ x) / np.maximum(mass[:, None], 1e-12)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    similarity = x @ centroids.T
    similarity[:, ~present] = -np.inf
    labels = similarity.argmax(1)
    if labelled is not None:
        labels[labelled] = known[labelled]
    return labels, centroids


@dataclass
class SiteHead:
    """A linear classifier on raw features: ``logits = features @ weight.T + bias``, (C, F) and (C,)."""

    weight: np.ndarray
    bias: np.ndarray

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ self.weight.T + self.bias


def fit_site_head(features: np.ndarray, labels: np.ndarray, n_classes: int, *, c: float = HEAD_C,
                  seed: int = 0) -> SiteHead:
    """Multinomial logistic regression of ``labels`` on standardised ``features``, returned on raw features
    (the standardisation folded in). Classes without a label get a logit far below the others."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    found = np.unique(labels)
    if len(found) < 2:
        raise ChestXrayError("label-free adaptation: the pseudo-labels name fewer than two classes; the site's "
                             "images look alike to the model, and a head cannot be fitted")
    mean, scale = x.mean(0), x.std(0) + 1e-6
    model = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit((x - mean) / scale, labels)
    coef = model.coef_ if len(found) > 2 else np.vstack([-model.coef_[0] / 2, model.coef_[0] / 2])
    intercept = model.intercept_ if len(found) > 2 else np.array([-model.intercept_[0] / 2, model.intercept_[0] / 2])
    weight = np.zeros((n_classes, x.shape[1]))
    bias = np.full(n_classes, -1e4)
    weight[found] = coef / scale
    bias[found] = intercept - (coef / scale) @ mean
    return SiteHead(weight, bias)


def domain_weights(reference: np.ndarray, site: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(reference weights (R,), site weights (S,), facts)``: the likelihood ratio ``p_site / p_reference``
    of each image, from a logistic-regression domain classifier on the feature directions, cross-fitted
    (5 folds) so that no image weighs itself; clipped to :data:`WEIGHT_RANGE`. ``facts`` holds the
    classifier's cross-validated AUC (0.5: the site's images look like the reference's)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x = np.vstack([_directions(reference), _directions(site)])
    y = np.r_[np.zeros(len(reference)), np.ones(len(site))]
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    share = cross_val_predict(LogisticRegression(C=HEAD_C, max_iter=5000), x, y, cv=folds, method="predict_proba")[:, 1]
    share = np.clip(share, 1e-6, 1 - 1e-6)
    ratio = np.clip(share / (1 - share) * len(reference) / len(site), *WEIGHT_RANGE)
    facts = {"method": "logistic regression on feature directions, 5-fold cross-fitted, likelihood ratio clipped "
                       f"to {WEIGHT_RANGE[0]}..{WEIGHT_RANGE[1]}",
             "domain_auc": round(float(roc_auc_score(y, share)), 4),
             "reference_weight_median": round(float(np.median(ratio[:len(reference)])), 4),
             "site_weight_q90": round(float(np.quantile(ratio[len(reference):], 0.9)), 4)}
    return ratio[:len(reference)], ratio[len(reference):], facts


def label_free_summary(before: np.ndarray, after: np.ndarray, classes: list[str], *,
                       before_sets: np.ndarray | None, after_sets: np.ndarray | None,
                       before_ood: np.ndarray | None, after_ood: np.ndarray | None) -> dict[str, Any]:
    """What label-free adaptation changed on the site's images, measured without a label."""
    def shares(probs: np.ndarray) -> dict[str, float]:
        called = np.bincount(probs.argmax(1), minlength=len(classes)) / max(len(probs), 1)
        return {name: round(float(v), 4) for name, v in zip(classes, called)}

    def side(probs: np.ndarray, sets: np.ndarray | None, ood: np.ndarray | None) -> dict[str, Any]:
        out: dict[str, Any] = {"predicted_shares": shares(probs),
                               "mean_confidence": round(float(probs.max(1).mean()), 4)}
        if sets is not None:
            refer = sets.sum(1) != 1
            if ood is not None:
                refer = refer | ood
            out.update(mean_set_size=round(float(sets.sum(1).mean()), 4), referred_share=round(float(refer.mean()), 4))
        if ood is not None:
            out["ood_share"] = round(float(np.mean(ood)), 4)
        return out

    return {"n": int(len(before)), "changed_label_share": round(float(np.mean(before.argmax(1) != after.argmax(1))), 4),
            "before": side(before, before_sets, before_ood), "after": side(after, after_sets, after_ood),
            "unchecked": "accuracy, per-class sensitivity and the sets' coverage at this site cannot be measured "
                         "without labels: label a sample (chestxray adapt --suggest N writes the images worth "
                         "labelling) and run chestxray evaluate on it"}


def choose_for_labelling(probs: np.ndarray, features: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """The ``n`` images whose labels would teach the most: k-means (``n`` clusters) on the feature
    directions for diversity, and in each cluster the image the model is least sure of (highest entropy of
    ``probs``) for uncertainty. Returns row indices, most uncertain first."""
    from sklearn.cluster import KMeans

    probs = np.asarray(probs, dtype=np.float64)
    if not 1 <= n <= len(probs):
        raise ChestXrayError(f"--suggest needs between 1 and {len(probs)} images (the readable ones), not {n}")
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(1)
    if n == len(probs):
        return np.argsort(-entropy, kind="stable")
    clusters = KMeans(n, n_init=3, random_state=seed).fit_predict(_directions(features))
    chosen = [int(np.flatnonzero(clusters == c)[np.argmax(entropy[clusters == c])]) for c in np.unique(clusters)]
    if len(chosen) < n:  # k-means left clusters empty: fill with the most uncertain of the rest
        rest = [i for i in np.argsort(-entropy, kind="stable") if i not in set(chosen)]
        chosen += rest[:n - len(chosen)]
    chosen = np.array(chosen)
    return chosen[np.argsort(-entropy[chosen], kind="stable")]


def choose_head_labels(probs: np.ndarray, features: np.ndarray, present: np.ndarray, known: np.ndarray,
                       pseudo: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(rows, labels, facts)`` the site head is fitted on when a person labelled some images (``known``:
    a label, or -1): the labelled images alone, or every image with ``pseudo`` (the labels of
    :func:`centroid_pseudo_labels` with ``known``) for the unlabelled ones, whichever predicts the held-out
    labelled images better in a stratified k-fold on them (folds: up to :data:`HEAD_CHOICE_FOLDS`, as the
    smallest labelled class allows; too few labels for two folds: pseudo-labels; a tie: pseudo-labels).

    The k-fold lets each site's own labels decide instead of a count fixed on one site. Its folds are many
    because the choice is biased otherwise: the head on labelled images alone learns from the labels it is
    given, so a fold that trains it on 80% of them (5 folds) underrates it against the pseudo-labels, which
    use every image in every fold; 10 folds train it on 90%. The k-fold is repeated
    (:data:`HEAD_CHOICE_REPEATS` shuffles) because one shuffle is noisy where the two options are close:
    measured at the new site with 100 suggested labels, one 10-fold read 75% and 76%, and other
    shuffles 77% and 76%."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    known = np.asarray(known)
    labelled = np.flatnonzero(known >= 0)
    every = np.arange(len(known))
    counts = np.bincount(known[labelled], minlength=len(present))[np.unique(known[labelled])]
    folds = int(min(HEAD_CHOICE_FOLDS, counts.min())) if len(counts) >= 2 else 0
    facts: dict[str, Any] = {"labelled": int(len(labelled)), "folds": folds, "repeats": HEAD_CHOICE_REPEATS}
    if folds < 2:
        return every, pseudo, {**facts, "chosen": "pseudo-labels (too few labels for a k-fold choice)"}
    scores = {"labelled images alone": [], "labels and pseudo-labels": []}
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=HEAD_CHOICE_REPEATS, random_state=seed)
    for fit_at, held_at in splitter.split(labelled, known[labelled]):
        train_rows, held_rows = labelled[fit_at], labelled[held_at]
        fold_known = known.copy()
        fold_known[held_rows] = -1
        fold_pseudo, _ = centroid_pseudo_labels(probs, features, present, fold_known)
        for name, (rows, labels) in {"labelled images alone": (train_rows, known[train_rows]),
                                     "labels and pseudo-labels": (every, fold_pseudo)}.items():
            if len(np.unique(labels)) < 2:
                scores[name].append(0.0)
                continue
            head = fit_site_head(features[rows], labels, len(present), seed=seed)
            scores[name].append(float(np.mean(head.logits(features[held_rows]).argmax(1) == known[held_rows])))
    means = {name: round(float(np.mean(v)), 4) for name, v in scores.items()}
    chosen = max(means, key=lambda name: (means[name], name == "labels and pseudo-labels"))
    facts.update(cross_validated_accuracy=means, chosen=chosen)
    if chosen == "labelled images alone":
        return labelled, known[labelled], facts
    return every, pseudo, facts
