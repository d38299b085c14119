"""Logit transforms and their cross-validated choice (pure numpy: no model)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from chestxray.stats.logit_transform import (
    KINDS,
    LogitTransform,
    choose_logit_transform,
    fit_logit_transform,
    fold_indices,
    per_image_nll,
)
from chestxray.errors import ChestXrayError


def sampled(n: int = 600, c: int = 3, temperature: float = 1.0, bias: np.ndarray | None = None, seed: int = 0):
    """Logits and labels drawn from softmax(logits / temperature + bias): calibrated when T = 1, bias 0."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, c))
    probs = softmax(logits / temperature + (0 if bias is None else bias), axis=1)
    labels = np.array([rng.choice(c, p=p) for p in probs])
    return logits, labels


def test_temperature_fit_recovers_the_true_temperature() -> None:
    logits, labels = sampled(3000, temperature=2.0)
    transform = fit_logit_transform(logits, labels, "temperature")
    assert transform.temperature == pytest.approx(2.0, rel=0.1)


def test_a_calibrated_model_keeps_none() -> None:
    logits, labels = sampled(600, temperature=1.0, seed=1)
    choice = choose_logit_transform(logits, labels, kinds=KINDS)
    assert choice.transform.kind == "none"
    assert set(choice.held_out_nll) == set(KINDS) and choice.folds == 5


def test_an_overconfident_model_gets_a_softening_transform() -> None:
    logits, labels = sampled(600, temperature=2.5, seed=2)
    choice = choose_logit_transform(logits, labels, kinds=KINDS)
    assert choice.transform.kind != "none"
    after = per_image_nll(logits, labels, transform=choice.transform).mean()
    assert after < per_image_nll(logits, labels).mean()


def test_shifted_class_priors_are_fixed_by_a_bias() -> None:
    logits, labels = sampled(1500, bias=np.array([1.5, -1.0, 0.0]), seed=3)
    choice = choose_logit_transform(logits, labels, kinds=KINDS)
    assert choice.transform.kind in ("bias", "vector")
    assert choice.transform.bias[0] > choice.transform.bias[1]


def test_no_sharpening_when_asked() -> None:
    logits, labels = sampled(600, temperature=0.4, seed=4)  # under-confident: a free fit would sharpen
    assert fit_logit_transform(logits, labels, "temperature").temperature < 1
    for kind in ("temperature", "vector"):
        transform = fit_logit_transform(logits, labels, kind, sharpen=False)
        assert max(transform.scale) <= 1.0
    assert choose_logit_transform(logits, labels, sharpen=False).transform.temperature >= 1.0


def test_transform_round_trip_and_malformed_input() -> None:
    transform = LogitTransform("vector", (0.5, 2.0), (0.1, -0.1))
    assert LogitTransform.from_dict(transform.to_dict(), 2) == transform
    assert LogitTransform.from_dict(None, 2).kind == "none"
    with pytest.raises(ChestXrayError, match="malformed calibration"):
        LogitTransform.from_dict({"kind": "vector", "scale": [1.0], "bias": []}, 2)
    with pytest.raises(ChestXrayError, match="unknown calibration"):
        fit_logit_transform(np.zeros((4, 2)), np.array([0, 1, 0, 1]), "isotonic")
    assert LogitTransform.from_temperature(2.0).temperature == pytest.approx(2.0)


def test_too_few_images_keep_none() -> None:
    choice = choose_logit_transform(np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]]), np.array([0, 1, 0]))
    assert choice.transform.kind == "none" and "too few" in choice.note


def test_multilabel_platt_scaling() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (800, 3))
    labels = (rng.random((800, 3)) < 1 / (1 + np.exp(-logits / 3))).astype(float)  # over-confident logits
    choice = choose_logit_transform(logits, labels, "multilabel", kinds=KINDS)
    assert choice.transform.kind != "none"
    assert per_image_nll(logits, labels, "multilabel", choice.transform).mean() < \
        per_image_nll(logits, labels, "multilabel").mean()


def test_folds_partition_the_rows_and_keep_patients_together() -> None:
    labels = np.repeat([0, 1], 20)
    groups = np.repeat(np.arange(20), 2)
    splits = fold_indices(labels, 5, groups=groups)
    held = np.concatenate([h for _, h in splits])
    assert sorted(held) == list(range(40))
    for fit_rows, held_rows in splits:
        assert not set(fit_rows) & set(held_rows)
        assert not set(groups[fit_rows]) & set(groups[held_rows])


def test_fewer_patients_than_folds_give_fewer_folds_or_none_not_a_traceback() -> None:
    """Before: sklearn's ValueError ("n_splits=2 greater than the number of groups: 1") came out of
    ``chestxray cv`` as a traceback when a fold's validation images were of one patient."""
    labels = np.array([0, 1, 0, 1, 0, 1])
    assert fold_indices(labels, 5, groups=np.zeros(6, dtype=int)) == []  # one patient: no cross-validation
    splits = fold_indices(labels, 5, groups=np.array([0, 0, 0, 1, 1, 1]))
    assert len(splits) == 2  # two patients: two folds
    choice = choose_logit_transform(np.eye(2)[labels] * 2.0, labels, groups=np.zeros(6, dtype=int))
    assert choice.transform.kind == "none" and "too few" in choice.note
