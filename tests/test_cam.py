"""Grad-CAM: the right layer, a heatmap of the input's size in [0, 1], nothing left on the model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from chestxray.model.cam import gradcam, overlay, target_layer, to_png
from chestxray.errors import ChestXrayError
from chestxray.model.models import EnsembleNet, create_model

SIZE = 64  # test_efficientnet reduces 32x: a 2x2 feature map


def tiny(arch: str = "test_efficientnet", seed: int = 0):
    torch.manual_seed(seed)
    return create_model(arch, 3, weights="none").eval()


def image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def layer_name(model, layer) -> str:
    return next(name for name, module in model.named_modules() if module is layer)


@pytest.mark.parametrize(("arch", "expected"), [("test_efficientnet", "backbone.bn2"),
                                                ("test_resnet", "backbone.layer4")])
def test_target_layer_is_the_last_feature_map(arch: str, expected: str) -> None:
    model = tiny(arch)
    assert layer_name(model, target_layer(model)) == expected


def test_heatmap_shape_range_and_model_left_untouched() -> None:
    model = tiny().train()  # even in training mode: no batch-norm statistics may change
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heatmap = gradcam(model, image(), target_class=1)
    assert heatmap.shape == (SIZE, SIZE) and heatmap.dtype == np.float32
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0 and heatmap.max() > 0
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_target_class_matters_and_none_explains_the_prediction() -> None:
    model = tiny()
    x = image(1)
    predicted = int(model(x).argmax())
    other = (predicted + 1) % 3
    np.testing.assert_array_equal(gradcam(model, x, None), gradcam(model, x, predicted))
    assert not np.allclose(gradcam(model, x, predicted), gradcam(model, x, other))


def test_works_with_frozen_parameters_and_ensembles_use_the_first_member() -> None:
    members = [tiny(seed=0), tiny(seed=1)]
    ensemble = EnsembleNet(members).requires_grad_(False)
    np.testing.assert_array_equal(gradcam(ensemble, image(), 0), gradcam(members[0], image(), 0))


def test_bad_requests_are_refused() -> None:
    model = tiny()
    with pytest.raises(ChestXrayError, match="one image"):
        gradcam(model, torch.rand(2, 1, SIZE, SIZE), 0)
    with pytest.raises(ChestXrayError, match="out of range"):
        gradcam(model, image(), 3)


def test_overlay_blends_a_jet_heatmap_and_encodes_to_png() -> None:
    gray = np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8), (SIZE, 1))
    heatmap = np.zeros((SIZE // 4, SIZE // 4), np.float32)
    heatmap[:, -1] = 1.0  # hot on the right: red there, blue (cold) on the left
    rgb = overlay(gray, heatmap)
    assert rgb.shape == (SIZE, SIZE, 3) and rgb.dtype == np.uint8
    red_minus_blue = rgb[..., 0].astype(int) - rgb[..., 2].astype(int)
    assert red_minus_blue[:, -1].mean() > 0 > red_minus_blue[:, 0].mean()
    np.testing.assert_array_equal(overlay(gray, heatmap, alpha=0.0), np.stack([gray] * 3, -1))
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(to_png(rgb), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decoded, rgb)
    with pytest.raises(ChestXrayError, match="uint8"):
        overlay(gray.astype(np.float32), heatmap)
