"""INT8 ONNX models: static quantization (QDQ) calibrated on real training images, refused without parity.

The path onnxruntime recommends: the FP32 graph (:func:`~chestxray.export.export_onnx`, itself checked
against PyTorch), ``quant_pre_process`` (shape inference and graph optimisation), then
``quantize_static`` in QDQ format. Calibration images are read through the project's own sources,
decoder and preprocessing cache with the bundle's preprocessing, so they are exactly the model's
inputs; rows of a ``test`` split are never read. The quantized model's labels are then compared with
the FP32 model's on real X-rays it was not calibrated on: when they agree on fewer than
:data:`MIN_AGREEMENT` of them no file is written, and the largest probability difference is reported
either way.

The file records what it is (ONNX metadata, see :data:`QUANTIZATION_KEY`): the bundle weights it
came from, the settings, the calibration data and the parity figures. ``load_model(bundle,
backend="onnx-int8")`` runs it; ``OnnxRunner.quantization`` reads the record back.
"""

from __future__ import annotations

__all__ = ["MIN_AGREEMENT", "DEFAULT_CALIBRATION_IMAGES", "DEFAULT_PARITY_IMAGES", "MIN_CALIBRATION_IMAGES",
           "MIN_PARITY_IMAGES", "CALIBRATION_BATCH", "QuantSettings", "Parity", "QuantizeResult", "quantize_bundle",
           "check_parity", "FP32_PARTS", "fp32_nodes"]

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from ..model.bundle import INT8_ONNX_FILE, BundleMeta, read_meta, record_file
from ..data.cache import build_cache
from ..errors import ChestXrayError, first_line
from .export import DEFAULT_OPSET, export_onnx, quiet_tools
from ..inference.predict import Predictor
from ..model.runners import INPUT_NAME, PRECISION_KEY, QUANTIZATION_KEY, OnnxRunner, Runner
from ..data.sources import load_samples

MIN_AGREEMENT = 0.99
"""Share of real X-rays on which the INT8 model must give the FP32 model's label."""
DEFAULT_CALIBRATION_IMAGES = 256
DEFAULT_PARITY_IMAGES = 500
MIN_CALIBRATION_IMAGES = 8
MIN_PARITY_IMAGES = 20
CALIBRATION_BATCH = 8


@dataclass(frozen=True)
class QuantSettings:
    """onnxruntime static-quantization settings (QDQ format, unsigned 8-bit activations, signed weights).

    ``reduce_range`` keeps weights to 7 bits: onnxruntime's u8s8 kernels on AVX2 CPUs without VNNI add
    pairs of 8-bit products in 16 bits, which saturates with full-range weights. ``per_channel``
    gives every output channel of a convolution its own weight scale (depthwise convolutions vary
    a lot between channels). Activation ranges are the calibration images' min and max
    (onnxruntime's histogram methods keep every activation of every calibration image in memory:
    gigabytes for a few hundred images at 320 px).
    """

    per_channel: bool = True
    reduce_range: bool = True
    keep_fp32: tuple[str, ...] = ()
    """Parts left in FP32 (not quantized): ``stem`` (the first convolution), ``head`` (the classifier layer),
    ``depthwise`` (every depthwise convolution), ``se`` (squeeze-and-excitation gates, if any); see
    :data:`FP32_PARTS`."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.keep_fp32) - set(FP32_PARTS))
        if unknown:
            raise ChestXrayError(f"--keep-fp32: unknown part(s) {', '.join(unknown)} (choose from {', '.join(FP32_PARTS)})")


FP32_PARTS = ("stem", "head", "depthwise", "se")


@dataclass(frozen=True)
class Parity:
    """INT8 against FP32 on real X-rays: label agreement, probability and OOD-flag differences."""

    n_images: int
    label_agreement: float
    max_prob_diff: float
    mean_prob_diff: float
    ood_flag_agreement: float | None
    """Share of images flagged out-of-distribution alike (None: the bundle has no guard)."""


@dataclass(frozen=True)
class QuantizeResult:
    """A written INT8 model and how it was made and checked."""

    path: Path
    settings: QuantSettings
    calibration_data: str
    n_calibration: int
    parity: Parity
    min_agreement: float
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """Calibration or parity images that could not be read: ``(file, reason)``."""

    @property
    def size_bytes(self) -> int:
        """Size of the INT8 ONNX file."""
        return self.path.stat().st_size


def quantize_bundle(bundle_dir: str | Path, calibration_data: str | Path, out: str | Path | None = None, *,
                    n_calibration: int = DEFAULT_CALIBRATION_IMAGES, parity_data: str | Path | None = None,
                    n_parity: int = DEFAULT_PARITY_IMAGES, min_agreement: float = MIN_AGREEMENT,
                    settings: QuantSettings = QuantSettings(), seed: int = 0, cache_dir: str | Path | None = None,
                    opset: int = DEFAULT_OPSET, parity_images: list[str | Path] | None = None,
                    progress: bool = False) -> QuantizeResult:
    """Write the bundle's model as a static INT8 ONNX model (``out``: a file or a folder, default the
    bundle, as :data:`~chestxray.bundle.INT8_ONNX_FILE`) once it passes parity.

    ``calibration_data`` is anything :func:`~chestxray.sources.load_samples` reads (its ``test``
    split is never read): ``n_calibration`` of its images (at most half of them), drawn with
    ``seed``, calibrate the activation ranges, and up to ``n_parity`` of the others are the parity
    images; or, when ``parity_data`` names other images, up to ``n_calibration`` calibrate and up to
    ``n_parity`` of ``parity_data`` check. The model is refused
    (:class:`ChestXrayError`, no file left) when its labels agree with the FP32 model's on fewer than
    ``min_agreement`` of the parity images. ``opset`` and ``parity_images`` go to the FP32 export
    (:func:`~chestxray.export.export_onnx`), checked against PyTorch first.
    """
    start = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    meta = read_meta(bundle_dir)
    if not 0.0 < min_agreement <= 1.0:
        raise ChestXrayError(f"the required label agreement must be in (0, 1], not {min_agreement}")
    if n_calibration < MIN_CALIBRATION_IMAGES or n_parity < MIN_PARITY_IMAGES:
        raise ChestXrayError(f"use at least {MIN_CALIBRATION_IMAGES} calibration and {MIN_PARITY_IMAGES} "
                             f"parity images, not {n_calibration} and {n_parity}")
    calibration, parity_set, skipped = _calibration_and_parity_images(
        meta, calibration_data, parity_data, n_calibration, n_parity, seed, cache_dir, progress)
    target = Path(out) if out is not None else bundle_dir
    if target.is_dir():
        target = target / INT8_ONNX_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with tempfile.TemporaryDirectory(prefix="chestxray-int8-") as scratch:
        fp32 = export_onnx(bundle_dir, Path(scratch) / "fp32.onnx", opset, parity_images).path
        prepared = Path(scratch) / "prepared.onnx"
        try:
            _quantize(fp32, prepared, partial, calibration, settings)
            parity = check_parity(meta, OnnxRunner(fp32), OnnxRunner(partial), parity_set)
            if parity.label_agreement < min_agreement:
                raise ChestXrayError(
                    f"INT8 model refused: its labels agree with the FP32 model's on {parity.label_agreement:.1%} of "
                    f"{parity.n_images} real X-rays (needs {100 * min_agreement:g}%); largest probability difference "
                    f"{parity.max_prob_diff:.3f}; no file written")
            record = {"format": "QDQ", "activations": "uint8", "weights": "int8", "ranges": "minmax",
                      **asdict(settings),
                      "calibration": {"data": str(calibration_data), "images": len(calibration), "seed": seed},
                      "parity": {**asdict(parity), "min_agreement": min_agreement,
                                 "data": str(parity_data or calibration_data), "reference": "fp32 onnx"},
                      "onnxruntime": _ort_version()}
            _record(fp32, partial, record)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    if target.resolve() == (bundle_dir / INT8_ONNX_FILE).resolve():
        record_file(bundle_dir, INT8_ONNX_FILE)  # loaders refuse the graph if it is ever replaced
    return QuantizeResult(target, settings, str(calibration_data), len(calibration), parity, min_agreement,
                          time.perf_counter() - start, skipped)


def check_parity(meta: BundleMeta, reference: Runner, candidate: Runner, images: np.ndarray) -> Parity:
    """``candidate`` against ``reference``, two runners of one bundle, on uint8 squares (N, S, S): labels,
    calibrated probabilities and OOD flags as :class:`~chestxray.predict.Predictor` computes them."""
    expected, compared = Predictor(reference, meta), Predictor(candidate, meta)
    probs, scores = expected.predict_arrays(images)
    other_probs, other_scores = compared.predict_arrays(images)
    same = [expected.label(a) == expected.label(b) for a, b in zip(probs, other_probs)]
    diff = np.abs(other_probs - probs)
    flags = None
    if expected.guard is not None:
        flags = float(np.mean(expected.guard.is_ood(scores) == expected.guard.is_ood(other_scores)))
    return Parity(len(images), float(np.mean(same)), float(diff.max()), float(diff.mean()), flags)


def _calibration_and_parity_images(meta: BundleMeta, calibration_data: str | Path, parity_data: str | Path | None,
                                   n_calibration: int, n_parity: int, seed: int, cache_dir: str | Path | None,
                                   progress: bool) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Calibration and parity squares (uint8 (N, S, S)), disjoint, in the bundle's preprocessing."""
    pool, skipped = _read_images(meta, calibration_data, cache_dir, progress, drop_test=True)
    order = np.random.default_rng(seed).permutation(len(pool))
    if parity_data is None:
        if len(pool) < MIN_CALIBRATION_IMAGES + MIN_PARITY_IMAGES:
            raise ChestXrayError(f"{calibration_data}: {len(pool)} readable training images; calibration and "
                                 f"parity need at least {MIN_CALIBRATION_IMAGES + MIN_PARITY_IMAGES}")
        used = min(n_calibration, max(MIN_CALIBRATION_IMAGES, len(pool) // 2))
        return pool[order[:used]], pool[order[used:used + n_parity]], skipped
    if len(pool) < MIN_CALIBRATION_IMAGES:
        raise ChestXrayError(f"{calibration_data}: {len(pool)} readable training images; calibration needs "
                             f"at least {MIN_CALIBRATION_IMAGES}")
    parity, parity_skipped = _read_images(meta, parity_data, cache_dir, progress, drop_test=False)
    if len(parity) < MIN_PARITY_IMAGES:
        raise ChestXrayError(f"{parity_data}: {len(parity)} readable images; the parity check needs at least "
                             f"{MIN_PARITY_IMAGES}")
    chosen = np.random.default_rng(seed + 1).permutation(len(parity))[:n_parity]
    return pool[order[:n_calibration]], parity[np.sort(chosen)], skipped + parity_skipped


def _read_images(meta: BundleMeta, data: str | Path, cache_dir: str | Path | None, progress: bool,
                 drop_test: bool) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """The readable images of ``data`` as model inputs (uint8 squares), and the unreadable ones."""
    samples = load_samples(data)
    if drop_test:
        samples = samples.subset(samples.frame["split"] != "test")
        if not len(samples):
            raise ChestXrayError(f"{data}: every image is in the test split; name training images for calibration")
    cache = build_cache(samples, meta.preprocessing(), cache_dir=cache_dir, progress=progress)
    paths = samples.frame["path"].tolist()
    return np.asarray(cache.images)[cache.ok], [(paths[row], reason) for row, reason in sorted(cache.failed.items())]


class _Batches:
    """onnxruntime's ``CalibrationDataReader`` protocol over uint8 squares, as float model inputs in [0, 1]."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self.input_name = input_name
        self.images = images
        self.at = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.at >= len(self.images):
            return None
        batch = self.images[self.at:self.at + CALIBRATION_BATCH]
        self.at += CALIBRATION_BATCH
        return {self.input_name: batch[:, None].astype(np.float32) / 255.0}


def _quantize(fp32: Path, prepared: Path, out: Path, images: np.ndarray, settings: QuantSettings) -> None:
    """``quant_pre_process`` then ``quantize_static`` (QDQ, u8 activations, s8 weights) into ``out``."""
    try:
        with quiet_tools():
            quant_pre_process(str(fp32), str(prepared))
            quantize_static(str(prepared), str(out), _Batches(INPUT_NAME, images), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                            calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=fp32_nodes(prepared, settings.keep_fp32))
    except Exception as err:  # onnxruntime's tools raise many types; the user needs one line
        raise ChestXrayError(f"INT8 quantization failed: {first_line(err)}") from err


def fp32_nodes(graph: Path, parts: tuple[str, ...]) -> list[str]:
    """Names of the nodes of the ONNX ``graph`` that make up ``parts`` (:data:`FP32_PARTS`)."""
    if not parts:
        return []
    import onnx

    nodes = list(onnx.load(str(graph), load_external_data=False).graph.node)
    convs = [n for n in nodes if n.op_type == "Conv"]
    chosen: list[str] = []
    if "stem" in parts and convs:
        chosen.append(convs[0].name)
    if "head" in parts:
        chosen += [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")][-1:]
    if "depthwise" in parts:
        chosen += [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    if "se" in parts:  # the gate of squeeze-and-excitation: a Conv on a pooled (1x1) map, then a sigmoid
        chosen += [n.name for n in nodes if n.op_type in ("Sigmoid", "HardSigmoid")]
    return list(dict.fromkeys(chosen))


def _record(fp32: Path, quantized: Path, record: dict[str, Any]) -> None:
    """Copy the FP32 model's chestxray metadata (the weights digest among it) into the quantized one,
    with its precision and how it was made."""
    import onnx

    source = {entry.key: entry.value for entry in onnx.load(str(fp32), load_external_data=False).metadata_props}
    proto = onnx.load(str(quantized))
    kept = {entry.key: entry.value for entry in proto.metadata_props if not entry.key.startswith("chestxray.")}
    entries = {**kept, **{k: v for k, v in source.items() if k.startswith("chestxray.")},
               PRECISION_KEY: "int8", QUANTIZATION_KEY: json.dumps(record)}
    del proto.metadata_props[:]
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(quantized))


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
