"""Conformal prediction sets: class-conditional coverage, scores, storage, and the set metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax

from chestxray.stats.conformal import (
    SCORES,
    ConformalSets,
    fit_conformal,
    min_calibration_images,
    nonconformity,
    set_metrics,
)
from chestxray.errors import ChestXrayError
from chestxray.stats.metrics import accuracy_at_coverage, risk_coverage

CLASSES = ["a", "b", "c"]


def noisy_model(n: int, seed: int, hard_class: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a model that is good on two classes and poor on ``hard_class``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    strength = np.where(labels == hard_class, 0.5, 3.0)
    logits[np.arange(n), labels] += strength
    return softmax(logits, axis=1), labels


@pytest.mark.parametrize("score", SCORES)
def test_every_class_is_covered_at_the_target_on_exchangeable_data(score):
    probs, labels = noisy_model(1500, seed=1)
    sets = fit_conformal(probs, labels, CLASSES, coverage=0.9, score=score)
    test_probs, test_labels = noisy_model(6000, seed=2)
    found = set_metrics(sets.sets(test_probs), test_labels, CLASSES, coverage=0.9, n_boot=50)
    for name, row in found["per_class"].items():  # class-conditional: the hard class too
        assert row["coverage"] >= 0.87, (name, row)
        if score == "lac":  # continuous scores: not much above the target either (APS ties at 1.0)
            assert row["coverage"] <= 0.94, (name, row)
    if score == "lac":
        assert found["per_class"]["c"]["mean_set_size"] > found["per_class"]["a"]["mean_set_size"]


def test_marginal_conformal_would_undercover_the_hard_class():
    """Why Mondrian: one pooled threshold covers 90% on average, but not on the hard class."""
    probs, labels = noisy_model(1500, seed=1)
    true_class = probs[np.arange(len(labels)), labels][:, None]
    threshold = fit_conformal(true_class, np.zeros_like(labels), ["any"], coverage=0.9).thresholds()["any"]
    test_probs, test_labels = noisy_model(6000, seed=2)
    covered = (1 - test_probs[np.arange(len(test_labels)), test_labels]) <= threshold
    assert covered[test_labels == 2].mean() < 0.85
    mondrian = fit_conformal(probs, labels, CLASSES, coverage=0.9).sets(test_probs)
    assert mondrian[test_labels == 2, 2].mean() >= 0.87


def test_sets_agree_with_the_stored_thresholds_and_grow_with_coverage():
    probs, labels = noisy_model(400, seed=3)
    sets = fit_conformal(probs, labels, CLASSES, coverage=0.9)
    test_probs, _ = noisy_model(300, seed=4)
    thresholds = sets.thresholds()
    by_threshold = np.stack([(1 - test_probs[:, k]) <= thresholds[c] for k, c in enumerate(CLASSES)], axis=1)
    assert (sets.sets(test_probs) == by_threshold).all()
    assert (sets.sets(test_probs) == (sets.p_values(test_probs) > 0.1 + 1e-12)).all()  # crepes' p-values agree
    assert sets.sets(test_probs, coverage=0.95).sum() >= sets.sets(test_probs, coverage=0.8).sum()


def test_a_class_with_too_few_calibration_images_takes_the_pooled_threshold():
    """Before: such a class was in every set, so a site with 8 borrowed COVID-19 images referred 105 of 105."""
    probs, labels = noisy_model(300, seed=5)
    keep = (labels != 1) | (np.cumsum(labels == 1) <= min_calibration_images(0.9) - 1)
    sets = fit_conformal(probs[keep], labels[keep], CLASSES, coverage=0.9)
    assert sets.pooled_classes() == ["b"] and sets.to_dict()["pooled"] == ["b"]
    scores = 1 - probs[keep][np.arange(keep.sum()), labels[keep]]
    assert sets.thresholds()["b"] == pytest.approx(np.sort(scores)[int(np.ceil((len(scores) + 1) * 0.9)) - 1])
    test_probs, test_labels = noisy_model(3000, seed=6)
    inside = sets.sets(test_probs)
    assert not inside[:, 1].all()  # b is ruled out where it is implausible
    assert inside[test_labels == 1, 1].mean() >= 0.85  # and still covered about as promised
    assert min_calibration_images(0.9) == 9 and min_calibration_images(0.95) == 19


def test_sets_of_older_bundles_keep_a_thin_class_in_every_set():
    probs, labels = noisy_model(300, seed=5)
    keep = (labels != 1) | (np.cumsum(labels == 1) <= min_calibration_images(0.9) - 1)
    stored = fit_conformal(probs[keep], labels[keep], CLASSES, coverage=0.9).to_dict()
    for key in ("fallback", "pooled", "absent"):
        stored.pop(key)
    old = ConformalSets.from_dict(stored, CLASSES)
    assert old.thresholds()["b"] is None and old.sets(noisy_model(100, seed=6)[0])[:, 1].all()


def test_an_absent_class_is_in_no_set_and_the_others_keep_their_coverage():
    probs, labels = noisy_model(900, seed=3)
    present = labels != 0
    sets = fit_conformal(probs[present], labels[present], CLASSES, coverage=0.9, absent=["a"])
    again = ConformalSets.from_dict(json.loads(json.dumps(sets.to_dict())), CLASSES)
    test_probs, test_labels = noisy_model(3000, seed=4)
    inside = again.sets(test_probs)
    assert not inside[:, 0].any()
    for k in (1, 2):
        assert inside[test_labels == k, k].mean() >= 0.87
    with pytest.raises(ChestXrayError, match="absent"):
        fit_conformal(probs, labels, CLASSES, absent=["a", "b", "c"])


def test_weighted_sets_follow_a_covariate_shift():
    """Weighted split conformal (Tibshirani et al. 2019): calibration images weighted by the likelihood
    ratio of the new site cover the site; unweighted ones do not."""
    rng = np.random.default_rng(11)
    def draw(n, hard_share):  # the site has more of the hard images of each class
        labels = rng.integers(0, 3, n)
        hard = rng.random(n) < hard_share
        logits = rng.normal(0, 1, (n, 3))
        logits[np.arange(n), labels] += np.where(hard, 0.3, 3.0)
        return softmax(logits, axis=1), labels, hard
    probs, labels, hard = draw(3000, 0.1)
    site_probs, site_labels, site_hard = draw(4000, 0.6)
    ratio = np.where(hard, 0.6 / 0.1, 0.4 / 0.9)  # p_site(x) / p_cal(x)
    plain = fit_conformal(probs, labels, CLASSES, coverage=0.9)
    weighted = fit_conformal(probs, labels, CLASSES, coverage=0.9, weights=ratio, test_weight=float(ratio.max()))
    def covered(sets):
        return sets.sets(site_probs)[np.arange(len(site_labels)), site_labels].mean()
    assert covered(plain) < 0.85 and covered(weighted) >= 0.88
    again = ConformalSets.from_dict(json.loads(json.dumps(weighted.to_dict())), CLASSES)
    assert (again.sets(site_probs) == weighted.sets(site_probs)).all()


def test_round_trip_through_json_gives_the_same_sets():
    probs, labels = noisy_model(200, seed=7)
    sets = fit_conformal(probs, labels, CLASSES, coverage=0.85, score="aps", fitted_on="validation")
    again = ConformalSets.from_dict(json.loads(json.dumps(sets.to_dict())), CLASSES)
    test_probs, _ = noisy_model(100, seed=8)
    assert (again.sets(test_probs) == sets.sets(test_probs)).all()
    assert again.coverage == 0.85 and again.score == "aps" and again.fitted_on == "validation"


def test_scores_order_classes_by_plausibility():
    probs = np.array([[0.7, 0.2, 0.1]])
    for score in SCORES:
        alphas = nonconformity(probs, score)[0]
        assert alphas[0] < alphas[1] < alphas[2]
    assert np.allclose(nonconformity(probs, "aps")[0], [0.7, 0.9, 1.0])


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "0.9", True])
def test_bad_coverage_and_inputs_are_refused_clearly(bad):
    probs, labels = noisy_model(50, seed=9)
    with pytest.raises(ChestXrayError, match="coverage"):
        fit_conformal(probs, labels, CLASSES, coverage=bad)
    with pytest.raises(ChestXrayError, match="score"):
        fit_conformal(probs, labels, CLASSES, score="nope")
    with pytest.raises(ChestXrayError, match="probabilities"):
        fit_conformal(probs[:, :2], labels, CLASSES)


def test_set_metrics_have_intervals_and_shares():
    sets = np.array([[True, False, False], [True, True, False], [False, False, True], [False, False, False]])
    found = set_metrics(sets, np.array([0, 1, 2, 2]), CLASSES, coverage=0.9, n_boot=100)
    assert found["coverage"] == 0.75 and found["mean_set_size"] == 1.0
    assert found["empty_share"] == 0.25 and found["single_class_share"] == 0.5
    low, high = found["coverage_ci"]
    assert low < 0.75 < high
    assert found["per_class"]["c"]["coverage"] == 0.5


def test_risk_coverage_keeps_the_most_confident_first():
    correct = np.array([True, False, True, True])
    confidence = np.array([0.9, 0.95, 0.6, 0.8])
    curve = risk_coverage(correct, confidence)
    assert curve["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert curve["accuracy"] == [0.0, 0.5, 2 / 3, 0.75]
    assert accuracy_at_coverage(correct, confidence, 0.5)["accuracy"] == 0.5
