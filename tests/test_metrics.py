"""Metrics against scikit-learn, the bootstrap against a naive loop, and calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    log_loss,
    recall_score,
    roc_auc_score,
)

from chestxray.errors import ChestXrayError
from chestxray.stats.metrics import (
    accuracy_interval_text,
    bootstrap_ci,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    at_operating_points,
    multilabel_metrics,
    operating_points,
    reliability_curve,
)

CLASSES = ["normal", "pneumonia", "covid"]


def make_example(n: int, n_classes: int = 3, signal: float = 1.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities that carry some signal about the labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += signal
    return y, softmax(logits, axis=1)


def accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    return accuracy_score(y, probs.argmax(1))


def test_metrics_equal_scikit_learn() -> None:
    y, probs = make_example(120)
    pred = probs.argmax(1)
    m = classification_metrics(y, probs, CLASSES, n_boot=20)
    assert m["n"] == 120
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["cross_entropy"] == pytest.approx(log_loss(y, probs))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    for k, name in enumerate(CLASSES):
        row = m["per_class"][name]
        assert row["sensitivity"] == pytest.approx(recall_score(y == k, pred == k))
        assert row["specificity"] == pytest.approx(recall_score(y != k, pred != k))
        assert row["pr_auc"] == pytest.approx(average_precision_score(y == k, probs[:, k]))
        assert row["support"] == int((y == k).sum())
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == 120 and np.trace(cm) == (pred == y).sum()
    assert cm[1, 2] == ((y == 1) & (pred == 2)).sum()  # rows are the truth
    json.dumps(m, allow_nan=False)


def test_bootstrap_ci_equals_naive_loop() -> None:
    y, probs = make_example(40, seed=3)
    n_boot, seed = 200, 7
    rng = np.random.default_rng(seed)
    accuracies = []
    for _ in range(n_boot):
        indices: list[int] = []
        for c in sorted(set(y.tolist())):
            members = [i for i in range(len(y)) if y[i] == c]
            draws = rng.integers(0, len(members), len(members))
            indices += [members[d] for d in draws]
        accuracies.append(sum(int(probs[i].argmax() == y[i]) for i in indices) / len(indices))
    expected = np.percentile(accuracies, [2.5, 97.5])
    assert bootstrap_ci(accuracy, y, probs, n_boot=n_boot, seed=seed, ci=0.95) == (expected[0], expected[1])


def test_vectorised_intervals_equal_generic_bootstrap() -> None:
    y, probs = make_example(80, seed=4)
    m = classification_metrics(y, probs, CLASSES, n_boot=100, seed=5)
    reference = {
        "accuracy": accuracy,
        "balanced_accuracy": lambda t, p: balanced_accuracy_score(t, p.argmax(1)),
        "macro_f1": lambda t, p: f1_score(t, p.argmax(1), labels=[0, 1, 2], average="macro", zero_division=0),
        "macro_auc": lambda t, p: roc_auc_score(t, p, multi_class="ovr"),
    }
    for name, fn in reference.items():
        assert m["ci"][name] == pytest.approx(bootstrap_ci(fn, y, probs, n_boot=100, seed=5), abs=1e-12), name


def test_interval_contains_estimate_and_narrows_with_more_samples() -> None:
    widths = []
    for n in (60, 1500):
        y, probs = make_example(n, seed=n)
        m = classification_metrics(y, probs, CLASSES, n_boot=300)
        for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
            low, high = m["ci"][name]
            assert low <= m[name] <= high, name
        widths.append(m["ci"]["accuracy"][1] - m["ci"]["accuracy"][0])
        assert accuracy_interval_text(m).startswith(f"{100 * m['accuracy']:.1f}% (95% CI ")
    assert widths[1] < widths[0] / 2


def test_absent_class_gives_none_auc() -> None:
    y, probs = make_example(60, seed=2)
    y[y == 2] = 0
    m = classification_metrics(y, probs, CLASSES, n_boot=50)
    assert m["per_class"]["covid"]["roc_auc"] is None
    assert m["per_class"]["covid"]["support"] == 0
    present_aucs = [roc_auc_score(y == k, probs[:, k]) for k in (0, 1)]
    assert m["macro_auc"] == pytest.approx(np.mean(present_aucs))
    assert None not in m["ci"]["macro_auc"]
    json.dumps(m, allow_nan=False)


def test_bad_shapes_raise() -> None:
    y, probs = make_example(10)
    with pytest.raises(ChestXrayError):
        classification_metrics(y[:5], probs, CLASSES)
    with pytest.raises(ChestXrayError):
        classification_metrics(y, probs, CLASSES[:2])


def test_multilabel_metrics() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < 0.3).astype(int)
    y[:, 2] = 0  # a label with no positives
    probs = np.clip(0.4 * y + 0.6 * rng.random(y.shape), 0, 1)
    m = multilabel_metrics(y, probs, CLASSES, n_boot=100)
    for k in (0, 1):
        row = m["per_label"][CLASSES[k]]
        assert row["roc_auc"] == pytest.approx(roc_auc_score(y[:, k], probs[:, k]))
        assert row["pr_auc"] == pytest.approx(average_precision_score(y[:, k], probs[:, k]))
        assert row["f1"] == pytest.approx(f1_score(y[:, k], probs[:, k] >= 0.5))
    assert m["per_label"]["covid"]["roc_auc"] is None
    assert m["mean_auc"] == pytest.approx(roc_auc_score(y[:, :2], probs[:, :2], average="macro"))
    low, high = m["ci"]["mean_auc"]
    assert low <= m["mean_auc"] <= high
    json.dumps(m, allow_nan=False)


def calibrated_binary(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels drawn with exactly the probability the model states."""
    p = rng.random(n)
    y = (rng.random(n) < p).astype(int)
    return y, np.stack([1 - p, p], axis=1)


def test_ece_small_when_calibrated_large_when_overconfident() -> None:
    rng = np.random.default_rng(0)
    y, probs = calibrated_binary(20000, rng)
    assert expected_calibration_error(y, probs) < 0.02
    overconfident = softmax(4 * np.log(probs), axis=1)
    assert expected_calibration_error(y, overconfident) > 0.1
    curve = reliability_curve(y, probs, n_bins=10)
    assert sum(curve["bin_count"]) == 20000
    assert curve["bin_count"][:4] == [0] * 4  # max probability of two classes is at least 0.5
    assert curve["bin_confidence"][0] is None


def test_fit_temperature_recovers_two() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=2.0, size=(8000, 4))
    cumulative = softmax(true_logits, axis=1).cumsum(1)
    y = (rng.random((8000, 1)) > cumulative).sum(1)
    assert fit_temperature(true_logits * 2, y) == pytest.approx(2.0, abs=0.3)
    assert fit_temperature(true_logits, y) == pytest.approx(1.0, abs=0.15)


def test_operating_points_reach_their_sensitivity_where_chosen_and_are_judged_elsewhere() -> None:
    y_val, p_val = make_example(150, seed=1)
    y_test, p_test = make_example(2000, seed=2)
    points = operating_points(y_val, p_val, CLASSES)
    assert set(points) == set(CLASSES)
    on_val = at_operating_points(y_val, p_val, CLASSES, points)
    for name, k in zip(CLASSES, range(3)):
        assert set(points[name]) == {"youden", "sensitivity_90", "sensitivity_95"}
        assert on_val[name]["sensitivity_95"]["sensitivity"] >= 0.95
        assert on_val[name]["sensitivity_90"]["sensitivity"] >= 0.90
        assert points[name]["sensitivity_95"] <= points[name]["sensitivity_90"]  # more sensitive, lower
        # the highest such threshold: one notch higher loses the target
        positives = np.sort(p_val[y_val == k, k])
        assert (positives > points[name]["sensitivity_95"]).mean() < 0.95
        youden = on_val[name]["youden"]
        assert youden["sensitivity"] + youden["specificity"] == pytest.approx(
            max(on_val[name][p]["sensitivity"] + on_val[name][p]["specificity"] for p in on_val[name]))
    on_test = at_operating_points(y_test, p_test, CLASSES, points)
    for name, k in zip(CLASSES, range(3)):
        row = on_test[name]["sensitivity_90"]
        called = p_test[:, k] >= row["threshold"]
        assert row["sensitivity"] == pytest.approx(called[y_test == k].mean())
        assert row["specificity"] == pytest.approx((~called[y_test != k]).mean())
        low, high = row["sensitivity_ci"]
        assert low < row["sensitivity"] < high and high - low < 0.07  # Wilson interval, about 670 positives
        assert row["positives"] == int((y_test == k).sum())


def test_operating_points_skip_a_class_without_negatives_and_take_multilabel_truth() -> None:
    probs = np.array([[0.9, 0.2], [0.7, 0.6], [0.8, 0.1]])
    assert set(operating_points(np.array([[1, 0], [1, 1], [1, 0]]), probs, ["a", "b"])) == {"b"}
    assert operating_points(np.array([0, 0, 0]), probs, ["a", "b"]) == {}


def test_a_multilabel_probability_of_exactly_the_threshold_is_called_as_everywhere_else() -> None:
    """``>=`` MULTILABEL_THRESHOLD, as the labels, the drift reference and the evaluation call a class."""
    from chestxray.constants import MULTILABEL_THRESHOLD
    from chestxray.stats.metrics import logit_scores

    assert MULTILABEL_THRESHOLD == 0.5
    logits = np.zeros((2, 2), dtype=np.float32)  # sigmoid(0) = 0.5 exactly
    assert logit_scores(logits, np.ones((2, 2), dtype=np.float32), "multilabel").accuracy == 1.0
    assert logit_scores(logits, np.zeros((2, 2), dtype=np.float32), "multilabel").accuracy == 0.0


def test_logit_auc_averages_the_classes_present_without_a_warning() -> None:
    import warnings

    from chestxray.stats.metrics import logit_scores

    logits = np.array([[0.0, 2.0, 0.1], [0.0, 1.5, 0.2], [0.0, 0.1, 2.0], [0.0, 0.3, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a class with no image here (ruled out at a site) must not warn
        scores = logit_scores(logits, np.array([1, 1, 2, 2]), "multiclass")
    assert scores.macro_auc == 1.0
