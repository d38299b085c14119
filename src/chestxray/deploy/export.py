"""ONNX export of a bundle's model, checked against PyTorch on preprocessed images.

The graph takes ``image`` float (N, 1, S, S) in [0, 1] with a dynamic batch axis and returns
``logits`` (N, C) and ``features`` (N, F) (ARCHITECTURE.md, inference contract). A file is only
left on disk once onnxruntime reproduces PyTorch's calibrated probabilities within
:data:`PROB_TOLERANCE` at batch 1 and at batch 3 or more.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..model.bundle import ONNX_ARCH_KEY, ONNX_FILE, ONNX_WEIGHTS_KEY, BundleMeta, load_bundle, record_file, weights_digest
from ..errors import ChestXrayError, first_line
from ..model.models import ChestXrayNet, EnsembleNet, logits_and_features
from ..inference.predict import Predictor
from ..model.runners import INPUT_NAME, OUTPUT_NAMES, OnnxRunner, TorchRunner

__all__ = ["PARITY_IMAGES", "export_onnx", "ExportResult", "quiet_tools", "DEFAULT_OPSET", "MIN_OPSET", "PROB_TOLERANCE",
           "FEATURE_TOLERANCE"]
DEFAULT_OPSET = 18
"""The opset the dynamo exporter writes natively; other opsets go through the legacy exporter
(converting the dynamo graph fails, e.g. for the Pad of TF-style "same" padding)."""
MIN_OPSET = 17
PROB_TOLERANCE = 1e-4
FEATURE_TOLERANCE = 1e-3
"""Largest feature difference allowed, relative to the largest feature magnitude (at least 1)."""
N_SYNTHETIC = 3


PARITY_IMAGES = 16
"""Real X-rays (validation or site images) on which a model exported after training or adaptation is checked
against PyTorch, beside the synthetic ones."""


@dataclass(frozen=True)
class ExportResult:
    """A written, parity-checked ONNX model."""

    path: Path
    opset: int
    exporter: str
    max_prob_diff: float
    max_feature_diff: float
    n_images: int
    batch_sizes: tuple[int, ...]
    seconds: float

    @property
    def size_bytes(self) -> int:
        """Size of the ONNX file."""
        return self.path.stat().st_size


class _LogitsAndFeatures(nn.Module):
    """The model with the graph's two outputs, from one backbone pass."""

    def __init__(self, model: ChestXrayNet | EnsembleNet) -> None:
        super().__init__()
        self.model = model
        # In-place activations (timm's ReLU6(inplace=True)) make the dynamo exporter decompose hardtanh_
        # through symbolic-shape arithmetic: 17-18 s of a 2-core CPU for Lite0 against 9-11 s out of place.
        # The outputs are the same; the model is the exporter's own copy, loaded from the bundle.
        for module in model.modules():
            if getattr(module, "inplace", False) is True:
                module.inplace = False

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return logits_and_features(self.model, image)


def export_onnx(bundle_dir: str | Path, out: str | Path | None = None, opset: int = DEFAULT_OPSET,
                parity_images: list[str | Path] | None = None) -> ExportResult:
    """Export the bundle's model to ONNX and check it against PyTorch; ``out`` is a file or a folder
    (default: the bundle, as ``model.onnx``).

    Parity runs on :data:`N_SYNTHETIC` synthetic X-rays plus ``parity_images``, preprocessed as
    prediction does (``Predictor.prepare``), comparing calibrated probabilities (bundle temperature)
    and features with the PyTorch runner; on any mismatch no file is left and
    :class:`ChestXrayError` is raised.
    """
    if opset < MIN_OPSET:
        raise ChestXrayError(f"ONNX opset {opset} is too old: use {MIN_OPSET} or newer")
    start = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    model, meta = load_bundle(bundle_dir)
    reference = Predictor(TorchRunner(model), meta, model)
    sources: list[str | Path | bytes] = [*(_synthetic_png(seed) for seed in range(N_SYNTHETIC)), *(parity_images or [])]
    images = np.stack([reference.prepare(source) for source in sources])[:, None].astype(np.float32) / 255.0
    target = Path(out) if out is not None else bundle_dir
    if target.is_dir():
        target = target / ONNX_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        exporter = _export(_LogitsAndFeatures(model).eval(), torch.from_numpy(images[:2]), partial, opset)
        _add_metadata(partial, meta, weights_digest(bundle_dir), opset)
        prob_diff, feature_diff, batch_sizes = _check_parity(reference, OnnxRunner(partial), images)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    if target.resolve() == (bundle_dir / ONNX_FILE).resolve():
        record_file(bundle_dir, ONNX_FILE)  # loaders refuse the graph if it is ever replaced
    return ExportResult(target, opset, exporter, prob_diff, feature_diff, len(images), batch_sizes,
                        time.perf_counter() - start)


def _export(wrapper: nn.Module, example: Tensor, path: Path, opset: int) -> str:
    """Write the graph with the dynamo exporter, or the legacy one for another opset or when dynamo
    fails; returns the exporter's name."""
    if opset == DEFAULT_OPSET:
        try:
            with quiet_tools():
                torch.onnx.export(wrapper, (example,), str(path), input_names=[INPUT_NAME],
                                  output_names=list(OUTPUT_NAMES), opset_version=opset, dynamo=True,
                                  external_data=False, verbose=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
            return "dynamo"
        except Exception as err:  # noqa: BLE001 - the legacy exporter is the documented fallback
            logging.getLogger(__name__).info("dynamo ONNX export failed (%s); using the legacy exporter", err)
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    try:
        with quiet_tools():
            torch.onnx.export(wrapper, (example,), str(path), input_names=[INPUT_NAME],
                              output_names=list(OUTPUT_NAMES), opset_version=opset, dynamo=False,
                              dynamic_axes=axes)
    except Exception as err:
        raise ChestXrayError(f"ONNX export of {type(wrapper.model).__name__} failed: {first_line(err)}") from err
    return "legacy"


def _add_metadata(path: Path, meta: BundleMeta, digest: str, opset: int) -> None:
    """Check the written opset and record which bundle weights the graph holds (to detect a stale export)."""
    import onnx

    proto = onnx.load(str(path))
    written = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ChestXrayError(f"ONNX export: the exporter wrote opset {written} instead of {opset}")
    entries = {ONNX_WEIGHTS_KEY: digest, ONNX_ARCH_KEY: meta.arch,
               "chestxray.classes": ",".join(meta.classes), "chestxray.image_size": str(meta.image_size)}
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def _synthetic_png(seed: int, height: int = 300, width: int = 240) -> bytes:
    """A portrait picture with a gradient, two dark 'lungs' and noise, encoded as PNG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = 90 + 80 * yy / height + rng.normal(0, 12, (height, width))
    for cx in (0.3 * width, 0.7 * width):
        image -= 60 * np.exp(-(((xx - cx) / (0.14 * width)) ** 2 + ((yy - 0.45 * height) / (0.3 * height)) ** 2))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_parity(reference: Predictor, runner: OnnxRunner, images: np.ndarray) -> tuple[float, float, tuple[int, ...]]:
    """Compare onnxruntime with the PyTorch runner on the first image alone and on the whole batch."""
    expected_logits, expected_features = reference.runner(images)
    expected = reference.probabilities(expected_logits)
    prob_diff = feature_diff = 0.0
    batch_sizes = (1, len(images))
    for size in batch_sizes:
        logits, features = runner(images[:size])
        if logits.shape != expected_logits[:size].shape or features.shape != expected_features[:size].shape:
            raise ChestXrayError(f"ONNX export: batch of {size} gave outputs {logits.shape} and {features.shape}, "
                                 f"expected {expected_logits[:size].shape} and {expected_features[:size].shape}")
        prob_diff = max(prob_diff, float(np.abs(reference.probabilities(logits) - expected[:size]).max()))
        feature_diff = max(feature_diff, float(np.abs(features - expected_features[:size]).max()))
    feature_limit = FEATURE_TOLERANCE * max(1.0, float(np.abs(expected_features).max()))
    if not prob_diff < PROB_TOLERANCE or not feature_diff <= feature_limit:
        raise ChestXrayError(f"ONNX export failed the parity check: probabilities differ by up to {prob_diff:.2e} "
                             f"(limit {PROB_TOLERANCE:.0e}), features by {feature_diff:.2e} (limit "
                             f"{feature_limit:.2e}); no file written")
    return prob_diff, feature_diff, batch_sizes


@contextlib.contextmanager
def quiet_tools():
    """Silence the exporters' and onnxruntime's quantization tools' progress lines, warnings and
    converter tracebacks (the latter log on the root logger)."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "torch.onnx", "torch.export", "")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
