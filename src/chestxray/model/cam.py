"""Grad-CAM heatmaps (pytorch-grad-cam) and their overlay on the X-ray.

The target layer is the output of the backbone's feature extractor: the last module, in execution
order, whose output is a 4-D map during ``backbone.forward_features`` (found by a dry run). That is
``bn2`` for EfficientNet (the head convolution after its norm and activation), ``layer4`` for ResNet,
``features`` for DenseNet and VGG, the last block for MobileNetV3: the last spatial maps before
global pooling, the usual Grad-CAM choice. For an :class:`EnsembleNet` the first member explains
the ensemble's prediction (members share the architecture and were trained on the same data).

Hooks are registered for one call and always removed, and the gradients of the model's parameters
are reset afterwards: the model is left as found. Calls on one model must not overlap in time (the
hooks fire on any forward pass): :class:`~chestxray.predict.Predictor` keeps a private copy of the
model for explanations behind a lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import cv2
import numpy as np
import torch
from torch import nn

from ..errors import ChestXrayError
from .models import ChestXrayNet, EnsembleNet

__all__ = ["explained_member", "target_layer", "gradcam", "overlay", "to_png"]

DEFAULT_ALPHA = 0.4
_PROBE_SIZE = 64


def explained_member(model: ChestXrayNet | EnsembleNet) -> ChestXrayNet:
    """The network Grad-CAM runs on: the model itself, or an ensemble's first member."""
    return model.members[0] if isinstance(model, EnsembleNet) else model


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the block (no batch-norm statistics updated), then the mode as found."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def target_layer(model: ChestXrayNet) -> nn.Module:
    """The backbone module whose output is the last 4-D feature map before global pooling."""
    found: list[nn.Module] = []

    def record(module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            found.append(module)

    handles = [m.register_forward_hook(record) for m in model.backbone.modules() if m is not model.backbone]
    try:
        with torch.no_grad(), _eval_mode(model):
            probe = torch.zeros(1, 1, _PROBE_SIZE, _PROBE_SIZE, device=next(model.parameters()).device)
            model.backbone.forward_features((probe - model.mean) / model.std)
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        raise ChestXrayError(f"Grad-CAM: '{model.arch}' has no convolutional feature map to explain")
    return found[-1]


def gradcam(model: ChestXrayNet | EnsembleNet, image: torch.Tensor, target_class: int | None = None, *,
            layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM heatmap (S, S) in [0, 1] of ``image`` (1, 1, S, S) floats in [0, 1] for ``target_class``.

    ``None`` explains the predicted class. ``layer`` saves the search for :func:`target_layer` on
    repeated calls. Works with frozen parameters (only the input needs a gradient).
    """
    from pytorch_grad_cam import GradCAM  # imported on first use: it pulls in matplotlib and scikit-learn
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if image.ndim != 4 or image.shape[:2] != (1, 1):
        raise ChestXrayError(f"Grad-CAM takes one image (1, 1, S, S), got {tuple(image.shape)}")
    network = explained_member(model)
    if target_class is not None and not 0 <= target_class < network.num_classes:
        raise ChestXrayError(f"Grad-CAM: class index {target_class} out of range 0..{network.num_classes - 1}")
    targets = None if target_class is None else [ClassifierOutputTarget(int(target_class))]
    x = image.detach().clone().requires_grad_(True)
    with _eval_mode(network):
        cam = GradCAM(network, [layer or target_layer(network)])
        try:
            with torch.enable_grad():
                heatmap = cam(x, targets)[0]
        finally:
            cam.activations_and_grads.release()
            network.zero_grad(set_to_none=True)
    return np.clip(np.nan_to_num(heatmap.astype(np.float32)), 0.0, 1.0)


def overlay(gray: np.ndarray, heatmap: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """RGB uint8 (H, W, 3): the gray image blended with the jet-coloured heatmap (weight ``alpha``)."""
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ChestXrayError(f"overlay needs a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    if heatmap.shape != gray.shape:
        heatmap = cv2.resize(heatmap.astype(np.float32), gray.shape[::-1], interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap(np.uint8(np.clip(heatmap, 0, 1) * 255), cv2.COLORMAP_JET)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(cv2.addWeighted(colours, alpha, base, 1 - alpha, 0), cv2.COLOR_BGR2RGB)


LABELLED_MIN_SIDE = 320
"""Labelled overlays are scaled up to at least this side, so that their text stays legible."""


def labelled_overlay(gray: np.ndarray, heatmap: np.ndarray, title: str, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """RGB uint8: :func:`overlay` with ``title`` above it and a colour bar (low to high) beside it."""
    rgb = overlay(gray, heatmap, alpha)
    side = max(LABELLED_MIN_SIDE, rgb.shape[0])
    if rgb.shape[0] != side:
        rgb = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_LINEAR)
    banner, bar, margin = 28, 16, 44
    canvas = np.full((side + banner, side + bar + margin, 3), 255, np.uint8)
    canvas[banner:, :side] = rgb
    ramp = np.linspace(255, 0, side).astype(np.uint8)[:, None].repeat(bar, 1)  # top = high
    canvas[banner:, side + 2:side + 2 + bar] = cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET),
                                                           cv2.COLOR_BGR2RGB)
    font, ink = cv2.FONT_HERSHEY_SIMPLEX, (20, 20, 20)
    scale = 0.5
    while cv2.getTextSize(title, font, scale, 1)[0][0] > canvas.shape[1] - 8 and scale > 0.3:
        scale -= 0.05
    cv2.putText(canvas, title, (4, 19), font, scale, ink, 1, cv2.LINE_AA)
    cv2.putText(canvas, "high", (side + bar + 6, banner + 12), font, 0.4, ink, 1, cv2.LINE_AA)
    cv2.putText(canvas, "low", (side + bar + 6, banner + side - 4), font, 0.4, ink, 1, cv2.LINE_AA)
    return canvas


def to_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ChestXrayError("could not encode the overlay as PNG")
    return encoded.tobytes()
