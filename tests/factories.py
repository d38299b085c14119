"""Factories shared by several test modules (a plain module, not a test module, so that importing it
collects nothing): tiny model bundles, PNG bytes, and the fake Kermany-style data set and the tiny
training configuration used by cross-validation and sweeps.

- :func:`make_bundle`: the one bundle factory (a tiny timm EfficientNet, ``BINARY_CLASSES``,
  ``SIZE`` px, with an OOD guard by default; any architecture, classes, temperature);
- :func:`sets_for`: conformal sets for it;
- :func:`build_tiny_bundle`: its three-class ResNet-18 variant (``CLASSES``, ``IMAGE_SIZE`` px);
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

from chestxray.model.bundle import BundleMeta, save_bundle
from chestxray.stats.conformal import fit_conformal
from chestxray.data.decode import fit_square
from chestxray.model.models import create_model
from chestxray.stats.ood import OODGuard
from chestxray.model.runners import as_runner, run_images

# make_bundle: two classes at 64 px
SIZE = 64
BINARY_CLASSES = ["normal", "pneumonia"]

# build_tiny_bundle: three classes at 64 px
CLASSES = ["normal", "pneumonia", "covid"]
IMAGE_SIZE = 64

# timm's tiny test network: fast even on a busy CPU
TINY = dict(arch="test_efficientnet", weights="none", image_size=32, epochs=1, batch_size=8,
            freeze_epochs=0, warmup_epochs=0, val_fraction=0.25)


def make_bundle(directory: Path, classes: list[str] = BINARY_CLASSES, *, arch: str = "test_efficientnet",
                task: str = "multiclass", temperature: float = 1.0, guard: bool = True, seed: int = 0,
                weight_std: float = 1.0, conformal: dict | None = None,
                source_confound: dict | None = None) -> Path:
    """The one test bundle: a random-weights ``arch`` at ``SIZE`` px whose classifier weights have
    ``weight_std`` (spread-out logits, so comparisons of probabilities mean something) and, with
    ``guard``, an OOD guard fitted on synthetic X-rays; ``conformal`` and ``source_confound`` go into
    the metadata as given."""
    torch.manual_seed(seed)
    model = create_model(arch, len(classes), weights="none", task=task).eval()
    torch.nn.init.normal_(model.backbone.get_classifier().weight, std=weight_std)
    ood = None
    if guard:
        images = np.stack([fit_square(xray_array(seed=i), SIZE) for i in range(24)])
        ood = OODGuard.fit(run_images(as_runner(model), images)[1], np.arange(24) % len(classes)).to_dict()
    meta = BundleMeta(classes=list(classes), image_size=SIZE, temperature=temperature, ood=ood,
                      conformal=conformal, source_confound=source_confound,
                      extra={"trained_on": {"origin": "synthetic", "n_train": 24, "n_val": 0}})
    return save_bundle(directory, model, meta)


def sets_for(probs_first: float, coverage: float = 0.9) -> dict:
    """Conformal sets (as ``model.json`` holds them) for :func:`make_bundle`'s classes, calibrated where
    the true class had probability about ``probs_first``: a class needs a probability above about that
    to be in a set (0.001: both classes in every set, at any coverage)."""
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 2
    p = np.clip(rng.normal(probs_first, 0.02, 200), 0, 1)
    probs = np.where(labels[:, None] == 0, np.stack([p, 1 - p], 1), np.stack([1 - p, p], 1))
    return fit_conformal(probs, labels, BINARY_CLASSES, coverage=coverage, fitted_on="test images").to_dict()


def build_tiny_bundle(directory: Path) -> Path:
    """:func:`make_bundle` as a three-class ResNet-18 at temperature 1.5 without a guard (the export,
    serve and browser tests' model)."""
    return make_bundle(directory, CLASSES, arch="resnet18", temperature=1.5, guard=False, weight_std=0.5)


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
