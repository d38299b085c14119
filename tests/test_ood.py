"""The OOD guard: separates far-away features, catches departures outside the training subspace,
sets its threshold on held-out scores and survives a JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from chestxray.errors import ChestXrayError
from chestxray.stats.ood import OODGuard

N_CLASSES, DIM = 3, 40


def blobs(n_per_class: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class clusters of positive features (like pooled ReLU activations)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).uniform(2, 4, (N_CLASSES, DIM))
    labels = np.repeat(np.arange(N_CLASSES), n_per_class)
    features = centres[labels] + rng.normal(0, 0.3, (len(labels), DIM)) + shift
    return np.abs(features), labels


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    return roc_auc_score(np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))], np.r_[in_scores, out_scores])


def test_far_features_score_higher_and_are_flagged() -> None:
    train, labels = blobs(60, seed=0)
    held_out, _ = blobs(40, seed=1)
    far, _ = blobs(40, seed=2, shift=3.0)
    guard = OODGuard.fit(train, labels, n_components=8)
    assert auroc(guard.score(held_out), guard.score(far)) > 0.99
    assert guard.is_ood(guard.score(far)).mean() > 0.9
    assert guard.is_ood(guard.score(held_out)).mean() < 0.1


def test_departure_outside_the_training_subspace_is_caught() -> None:
    # in-distribution features live near a 4-D subspace; OOD ones move as far (norm 2) but leave it
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0]
    inside, outside = basis[:, :4], basis[:, 4:]

    def sample(n: int, axes: np.ndarray) -> np.ndarray:
        return 5 + rng.normal(size=(n, axes.shape[1])) @ axes.T + rng.normal(0, 0.05, (n, DIM))

    train, held_out = sample(200, inside), sample(50, inside)
    offsets = rng.normal(size=(50, 4))
    foreign = 5 + 2 * (offsets / np.linalg.norm(offsets, axis=1, keepdims=True)) @ outside[:, :4].T
    guard = OODGuard.fit(train, None, n_components=4)
    assert auroc(guard.score(held_out), guard.score(foreign)) > 0.99


def test_threshold_is_the_quantile_of_held_out_scores() -> None:
    train, labels = blobs(50, seed=0)
    val, _ = blobs(30, seed=1)
    # without validation features: out-of-fold scores, higher than the in-sample ones
    cross_fitted = OODGuard.fit(train, labels, quantile=0.9)
    assert cross_fitted.threshold > np.quantile(cross_fitted.score(train), 0.9)
    # with them: the validation scores join the out-of-fold ones (the guard itself is the same)
    with_val = OODGuard.fit(train, labels, val_features=val, quantile=0.9)
    np.testing.assert_allclose(with_val.score(val), cross_fitted.score(val))
    assert with_val.threshold != cross_fitted.threshold
    lowest, highest = sorted([cross_fitted.threshold, np.quantile(with_val.score(val), 0.9)])
    assert lowest <= with_val.threshold <= highest


def test_threshold_flags_about_the_nominal_share_of_new_in_distribution_images() -> None:
    train, labels = blobs(40, seed=0)
    val, _ = blobs(10, seed=1)
    fresh, _ = blobs(1000, seed=2)
    for quantile in (0.9, 0.99):
        guard = OODGuard.fit(train, labels, val_features=val, n_components=8, quantile=quantile)
        assert guard.is_ood(guard.score(fresh)).mean() == pytest.approx(1 - quantile, abs=0.5 * (1 - quantile) + 0.005)


def test_percentile_places_a_score_among_held_out_in_distribution_scores() -> None:
    train, labels = blobs(40, seed=0)
    val, _ = blobs(10, seed=1)
    fresh, _ = blobs(1000, seed=2)
    far, _ = blobs(20, seed=3, shift=3.0)
    guard = OODGuard.fit(train, labels, val_features=val, n_components=8, quantile=0.9)
    assert len(guard.held_out) == len(train) + len(val)
    percentiles = guard.percentile(guard.score(fresh))
    # fresh in-distribution images spread evenly over 0-100; far ones sit at the top
    assert np.median(percentiles) == pytest.approx(50, abs=12)
    assert (percentiles >= 90).mean() == pytest.approx(0.1, abs=0.06)
    assert guard.percentile(guard.score(far)).min() == 100
    assert guard.percentile(np.array([guard.threshold])) == pytest.approx(90, abs=100 / len(guard.held_out) + 1e-9)
    assert np.isnan(guard.percentile(np.array([np.nan]))).all()
    older = {k: v for k, v in guard.to_dict().items() if k != "held_out"}  # bundles written before percentiles
    assert np.isnan(OODGuard.from_dict(older).percentile(np.array([1.0]))).all()


def test_validation_images_set_the_threshold_when_a_class_has_one_training_image() -> None:
    features, labels = blobs(20, seed=0)
    keep = (labels != 0) | (np.arange(len(labels)) == 0)
    val, _ = blobs(5, seed=1)
    guard = OODGuard.fit(features[keep], labels[keep], val_features=val, quantile=0.5)
    assert guard.threshold == pytest.approx(np.quantile(guard.score(val), 0.5))
    with pytest.raises(ChestXrayError, match="two training images, or validation images"):
        OODGuard.fit(features[keep], labels[keep])


def test_json_round_trip_keeps_scores() -> None:
    train, labels = blobs(40, seed=0)
    guard = OODGuard.fit(train, labels)
    text = json.dumps(guard.to_dict())
    restored = OODGuard.from_dict(json.loads(text))
    probe, _ = blobs(10, seed=3, shift=1.0)
    np.testing.assert_allclose(restored.score(probe), guard.score(probe), rtol=1e-4)
    assert restored.threshold == guard.threshold
    np.testing.assert_allclose(restored.percentile(guard.score(probe)), guard.percentile(guard.score(probe)))
    assert len(text) < 4 * 4 * (DIM * (N_CLASSES + 32) + len(train))  # base64 float32, not a list of decimals


def test_bad_guards_and_features_are_refused() -> None:
    train, labels = blobs(20, seed=0)
    data = OODGuard.fit(train, labels).to_dict()
    with pytest.raises(ChestXrayError, match="unknown OOD guard"):
        OODGuard.from_dict({**data, "method": "energy"})
    with pytest.raises(ChestXrayError, match="malformed"):
        OODGuard.from_dict({k: v for k, v in data.items() if k != "means"})
    with pytest.raises(ChestXrayError, match="expected features"):
        OODGuard.from_dict(data).score(np.ones((2, DIM + 1)))
    with pytest.raises(ChestXrayError, match="too few"):
        OODGuard.fit(train[:3], labels[:3])


def test_nan_scores_are_not_flagged() -> None:
    guard = OODGuard.fit(*blobs(20, seed=0))
    assert guard.is_ood(np.array([np.nan, guard.threshold + 1])).tolist() == [False, True]
