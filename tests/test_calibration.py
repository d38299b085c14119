"""Calibration: one step fits the logit transform, the operating points and the OOD guard on held-out images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chestxray.trust.calibration import MIN_GUARD_IMAGES, Calibration, calibrate, calibrate_outputs
from chestxray.stats.logit_transform import TRAIN_KINDS, choose_logit_transform, per_image_nll
from chestxray.stats.metrics import logit_scores
from chestxray.model.models import create_model
from chestxray.stats.ood import OODGuard
from chestxray.model.runners import as_runner, run_images


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = create_model("test_efficientnet", 2, weights="none").eval()
    torch.nn.init.normal_(net.backbone.get_classifier().weight, std=1.0)
    return net


def test_calibrate_fits_every_part_on_the_images_it_is_given(model: torch.nn.Module) -> None:
    rng = np.random.default_rng(0)
    n = MIN_GUARD_IMAGES
    train, held = rng.integers(0, 256, (n, 32, 32), dtype=np.uint8), rng.integers(0, 256, (8, 32, 32), dtype=np.uint8)
    targets = np.arange(8) % 2
    calibration = calibrate(model, held, targets, classes=["a", "b"], guard_images=train,
                            guard_targets=np.arange(n) % 2)
    logits = run_images(as_runner(model), held)[0]
    # the transform is the cross-validated, never-sharpening choice on these held-out images
    expected = choose_logit_transform(logits, targets, "multiclass", kinds=TRAIN_KINDS, sharpen=False).transform
    assert calibration.transform == expected and calibration.temperature == pytest.approx(expected.temperature)
    assert calibration.transform_choice["chosen"] == expected.kind
    assert all(scale <= 1 + 1e-9 for scale in calibration.transform.scale)
    assert calibration.scores == logit_scores(logits, targets, "multiclass")
    assert calibration.loss_calibrated == pytest.approx(per_image_nll(logits, targets, "multiclass", expected).mean())
    assert set(calibration.operating_points) == {"a", "b"}
    guard = OODGuard.from_dict(json.loads(json.dumps(calibration.ood)))
    assert guard.means.shape == (2, 256) and len(guard.held_out) == n + 8  # out-of-fold training + held-out
    assert set(calibration.bundle_fields()) == {"temperature", "operating_points", "ood", "conformal", "calibration"}
    assert calibration.bundle_fields()["calibration"] == expected.to_dict()
    assert calibration.conformal["counts"] == {"a": 4, "b": 4}  # conformal sets fitted on the same held-out images
    assert calibration.reference["n"] == 8 and set(calibration.reference["predicted_shares"]) == {"a", "b"}
    assert set(calibration.extra_fields()) == {"reference", "validation"}


def test_multilabel_and_guardless_calibration(model: torch.nn.Module) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 32, 32), dtype=np.uint8)
    truth = np.eye(2, dtype=int)[np.arange(12) % 2]
    guard_images = rng.integers(0, 256, (MIN_GUARD_IMAGES, 32, 32), dtype=np.uint8)
    multilabel = calibrate(model, images, truth, classes=["a", "b"], task="multilabel", guard_images=guard_images,
                           guard_targets=np.eye(2, dtype=int)[np.arange(MIN_GUARD_IMAGES) % 2])
    assert multilabel.temperature == 1.0 and multilabel.transform.kind in ("none", "vector")
    assert OODGuard.from_dict(multilabel.ood).means.shape == (1, 256)  # one pooled mean
    logits = run_images(as_runner(model), images)[0]
    assert calibrate_outputs(logits, np.arange(12) % 2, classes=["a", "b"], task="multiclass").ood is None
    assert calibrate_outputs(logits[:0], np.arange(0), classes=["a", "b"], task="multiclass") == Calibration()


def test_too_few_images_give_no_guard_and_a_warning(model: torch.nn.Module, caplog: pytest.LogCaptureFixture) -> None:
    images = np.zeros((2, 32, 32), np.uint8)
    calibration = calibrate(model, images, np.array([0, 1]), classes=["a", "b"], guard_images=images,
                            guard_targets=np.array([0, 1]))
    assert calibration.ood is None and "no out-of-distribution guard" in caplog.text


def test_a_small_training_set_gets_no_guard_that_never_fires(caplog: pytest.LogCaptureFixture) -> None:
    """Before: a 60-image bundle got a threshold of 9390.7 while real X-rays scored 15-45, so nothing was
    ever flagged. Now: no guard, and one warning saying why and what it means."""
    rng = np.random.default_rng(2)
    features = np.abs(rng.normal(0, 1, (60, 64)))
    assert calibrate_outputs(rng.normal(0, 1, (20, 2)), np.arange(20) % 2, classes=["a", "b"], task="multiclass",
                             features=features[:20], guard_features=features,
                             guard_targets=np.arange(60) % 2).ood is None
    message = caplog.text
    assert "60 training images are too few" in message and f"at least {MIN_GUARD_IMAGES}" in message
    assert "will not flag images unlike its training X-rays" in message
