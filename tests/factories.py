"""Factories shared by several test modules (a plain module, not a test module, so that importing it
collects nothing): tiny model bundles, PNG bytes, and the fake Kermany-style data set and the tiny
training configuration used by cross-validation and sweeps.

- :func:`make_bundle`: a tiny timm EfficientNet bundle (``BINARY_CLASSES`` by default, ``SIZE`` px)
  with an OOD guard;
- :func:`build_tiny_bundle`: a random-weights ResNet-18 bundle (``CLASSES``, ``IMAGE_SIZE`` px);
- :func:`png_bytes`: an array, or a synthetic X-ray, encoded as PNG;
- :func:`write_xrays` and ``TINY``: a small patient-named folder data set and a fast ``TrainConfig``.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import torch
from conftest import xray_array
from PIL import Image

from chestxray.bundle import BundleMeta, save_bundle
from chestxray.decode import fit_square
from chestxray.models import create_model
from chestxray.ood import fit_guard

# make_bundle: two classes at 64 px
SIZE = 64
BINARY_CLASSES = ["normal", "pneumonia"]

# build_tiny_bundle: three classes at 64 px
CLASSES = ["normal", "pneumonia", "covid"]
IMAGE_SIZE = 64

# timm's tiny test network: fast even on a busy CPU
TINY = dict(arch="test_efficientnet", weights="none", image_size=32, epochs=1, batch_size=8,
            freeze_epochs=0, warmup_epochs=0, channels_last=False, val_fraction=0.25)


def make_bundle(directory: Path, classes: list[str] = BINARY_CLASSES, *, task: str = "multiclass",
                temperature: float = 1.0, guard: bool = True, seed: int = 0) -> Path:
    """A tiny timm EfficientNet bundle with spread-out logits and, by default, an OOD guard fitted on
    synthetic X-rays."""
    torch.manual_seed(seed)
    model = create_model("test_efficientnet", len(classes), weights="none", task=task).eval()
    torch.nn.init.normal_(model.backbone.get_classifier().weight, std=1.0)
    ood = None
    if guard:
        images = np.stack([fit_square(xray_array(seed=i), SIZE) for i in range(24)])
        ood = fit_guard(model, images, np.arange(24) % len(classes))
    meta = BundleMeta(classes=list(classes), image_size=SIZE, temperature=temperature, ood=ood,
                      extra={"trained_on": {"origin": "synthetic", "n_train": 24, "n_val": 0}})
    return save_bundle(directory, model, meta)


def build_tiny_bundle(directory: Path) -> Path:
    """A random-weights ResNet-18 bundle at 64 px whose logits differ clearly between images (so that
    comparisons of probabilities mean something)."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=len(CLASSES), weights="none").eval()
    torch.nn.init.normal_(model.backbone.get_classifier().weight, std=0.5)
    meta = BundleMeta(classes=CLASSES, image_size=IMAGE_SIZE, temperature=1.5,
                      metrics={"val_acc": 0.5}, extra={"trained_on": {"n_train": 12}})
    return save_bundle(directory, model, meta)


def png_bytes(array: np.ndarray | None = None, seed: int = 0) -> bytes:
    """``array`` encoded as PNG; without one, a 96x80 synthetic X-ray drawn with ``seed``."""
    buffer = io.BytesIO()
    Image.fromarray(xray_array(96, 80, seed) if array is None else array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_xrays(root: Path, patients: int = 6, per_patient: int = 2) -> Path:
    """Dark "normal" vs bright "pneumonia" 40x40 PNGs in ``train/``, named so patients are known
    (Kermany style), plus a ``test/`` split holding a byte copy of one training image, and one
    training image duplicated under other patients."""
    rng = np.random.default_rng(0)
    names = {"normal": "IM-{p:04d}-{i:04d}.png", "pneumonia": "person{p}_bacteria_{i}.png"}
    for split, count in (("train", patients), ("test", 1)):
        for label, base in (("normal", 60), ("pneumonia", 170)):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for p in range(count):
                for i in range(per_patient):
                    pixels = np.clip(rng.normal(base, 20, (40, 40)), 0, 255).astype(np.uint8)
                    patient = p if split == "train" else 100 + p
                    Image.fromarray(pixels).save(folder / names[label].format(p=patient, i=i))
    shutil.copy(root / "train/pneumonia/person0_bacteria_0.png", root / "test/pneumonia/person100_bacteria_9.png")
    for p in range(min(3, patients)):
        shutil.copy(root / f"train/normal/IM-{p:04d}-0000.png", root / f"train/normal/IM-{50 + p:04d}-0000.png")
    return root
