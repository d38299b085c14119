"""Inference with a model bundle: decode, batch, calibrated probabilities, OOD flag and Grad-CAM.

A :class:`Predictor` wraps a *runner* (:mod:`chestxray.runners`: ``TorchRunner`` or ``OnnxRunner``):
a callable taking float images (N, 1, S, S) in [0, 1] and returning ``(logits (N, C), features (N, F))``
as numpy arrays. It holds no per-request state, so one predictor serves many threads.
:func:`predict_paths` predicts files, folders and globs; :func:`sharded_predict` does the same
with every rank of a ``torchrun`` launch.

Labels: the most probable class for multi-class models; for multi-label models every class with a
probability of 0.5 or more, joined by ``|``, or ``"No Finding"`` when none reaches 0.5 (never the
arg-max: a multi-label model may rightly find nothing).

When not to trust a prediction: a prediction is ``refer`` (with its ``reasons``) when its conformal
prediction set holds more or fewer than one class, when the image is out of distribution, or when
its DICOM header says it is not a frontal chest radiograph. ``cautions`` name a predicted class whose
training images came from another source than the others (the bundle's ``source_confound``). A
check that could not run (no conformal sets or OOD guard in the bundle, no DICOM header) is
reported as not checked (``None``), never as passed.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import cv2
import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..console import make_console
from ..constants import DEFAULT_BACKEND, MULTILABEL_THRESHOLD, SET_SEPARATOR
from ..model.bundle import (INT8_ONNX_FILE, ONNX_FILE, BundleMeta, ChangedFileError, check_onnx, load_bundle, read_meta,
                     verify_file)
from ..stats.conformal import ConformalSets, check_coverage
from ..data.decode import NPZ_SEPARATOR, find_images, gray_array
from ..data.dicomcheck import DEFAULT_POLICY, HeaderCheck, HeaderPolicy, inspect_source
from ..errors import ChestXrayError, InputError
from ..launch import local_rank, world_size
from ..trust.lineage import describe_lineage
from ..trust.referral import NOT_FRONTAL, reason_kind, referral_reasons
from ..stats.metrics import (PERCENTILE_DECIMALS, PROBABILITY_DECIMALS, SCORE_DECIMALS, json_number, logits_to_probs,
                      rounded)
from ..stats.ood import OODGuard, typicality
from ..model.runners import DEFAULT_BATCH, OnnxRunner, Runner, TorchRunner, run_images
from ..storage import make_folder, write_bytes
from ..data.sources import NO_FINDING

if TYPE_CHECKING:  # torch, timm and Grad-CAM load with the torch backend only: ONNX predicts without them
    import torch

    from ..model.models import ChestXrayNet, EnsembleNet

__all__ = ["AUDITED", "Predictor", "Prediction", "PredictionRun", "load_model", "predict_files", "predict_paths",
           "predict_inputs", "predictions_table", "sharded_predict", "sharded_predictions", "call_operating_point",
           "expand_inputs", "apply_operating_point", "write_cams", "shard", "resolve_backend",
           "BACKENDS", "TTA_VIEWS"]

Source = str | Path | bytes | np.ndarray
T = TypeVar("T")

ONNX_BACKENDS = {"onnx": ONNX_FILE, "onnx-int8": INT8_ONNX_FILE}
"""The bundle file each onnxruntime backend runs."""
BACKENDS = ("auto", "torch", *ONNX_BACKENDS)
log = logging.getLogger(__name__)
TTA_VIEWS = ((1.0, 0.0, 0.0), (1.05, 0.0, 0.0), (0.95, 0.0, 0.0), (1.0, 0.03, 0.0), (1.0, -0.03, 0.0))
"""Test-time views as (scale, shift x, shift y), shifts in fractions of the side: identity, zoom in
and out by 5%, shifts of 3% left and right. No flip: a mirrored chest is anatomically impossible."""

_DECODE_THREADS = 4
_GLOB_CHARS = re.compile(r"[*?\[]")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


NOT_CHECKED = "not checked"
"""A check that could not run, in a flat row (CSV, tables)."""
AUDITED = ("label", "probabilities", "ood", "ood_percentile")
"""The keys of a prediction's serialised form (:meth:`Prediction.to_dict`) that an inference-log line keeps."""


@dataclass
class Prediction:
    """The model's answer for one input; ``error`` is set (and the rest empty) when it could not be read.

    :meth:`to_dict` is the one serialised form of a prediction (CLI JSON, REST API, audit trail);
    :meth:`to_row` flattens it for CSV and tables (CLI, worklist).
    """

    file: str
    label: str
    probabilities: dict[str, float]
    ood: bool
    ood_score: float | None
    ood_percentile: float | None = None
    error: str | None = None
    prediction_set: list[str] | None = None
    """The classes the conformal sets cannot rule out at the bundle's coverage; ``None``: not checked."""
    refer: bool = False
    """Do not act on ``label``: a reader should look (see ``reasons``)."""
    reasons: list[str] = field(default_factory=list)
    cautions: list[str] = field(default_factory=list)
    header: dict[str, str] | None = None
    """The DICOM header fields the check read; ``None``: no DICOM header (not checked)."""
    coverage: float | None = None
    """Coverage of ``prediction_set``; ``None`` when the sets were not checked."""
    model_id: str = ""
    """``<arch>@<first 12 hex digits of the weights' sha256>``: which weights answered."""
    adaptation: str | None = None
    """The site adaptation that answered (``None``: the model as trained)."""
    called: list[str] | None = None
    """The classes at or above their threshold at an operating point; ``None``: none was asked for."""
    typicality: str | None = None
    """What ``ood_percentile`` means, in words (:func:`chestxray.ood.typicality`); ``None``: not checked."""

    @property
    def header_reasons(self) -> list[str]:
        """The reasons to refer that come from the DICOM header check (``not_frontal_cxr: ...``)."""
        return [reason for reason in self.reasons if reason_kind(reason) == NOT_FRONTAL]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: lists for the set, reasons and cautions, an object (or ``null``) for the header,
        probabilities to :data:`PROBABILITY_DECIMALS`, percentiles to :data:`PERCENTILE_DECIMALS`.
        ``called`` only when an operating point was applied."""
        found = {"file": self.file, "label": self.label,
                 "probabilities": {c: rounded(p, PROBABILITY_DECIMALS) for c, p in self.probabilities.items()},
                 "prediction_set": None if self.prediction_set is None else list(self.prediction_set),
                 "coverage": self.coverage, "refer": self.refer, "reasons": list(self.reasons),
                 "cautions": list(self.cautions), "ood": self.ood, "ood_score": rounded(self.ood_score, SCORE_DECIMALS),
                 "ood_percentile": rounded(self.ood_percentile, PERCENTILE_DECIMALS), "typicality": self.typicality,
                 "header": None if self.header is None else dict(self.header), "error": self.error,
                 "model_id": self.model_id, "adaptation": self.adaptation}
        if self.called is not None:
            found["called"] = list(self.called)
        return found

    def to_audit(self) -> dict[str, Any]:
        """The ``result`` of an inference-log line (no pixels, no file name): the :data:`AUDITED` keys as
        :meth:`to_dict` serialises them, or the error."""
        if self.error:
            return {"error": self.error}
        data = self.to_dict()
        return {key: data[key] for key in AUDITED}

    def to_row(self) -> dict[str, Any]:
        """:meth:`to_dict` flattened for a CSV row: one column per class probability; the set and ``called``
        joined by ``|`` (the set :data:`NOT_CHECKED` when it was not checked), reasons and cautions by
        ``; ``, the header as its JSON object (empty when there is none)."""
        data = self.to_dict()
        failed = bool(self.error)
        row = {"file": data["file"], "label": data["label"]}
        if self.called is not None:
            row["called"] = "" if failed else SET_SEPARATOR.join(self.called)
        row.update({
            "prediction_set": "" if failed else NOT_CHECKED if self.prediction_set is None
            else SET_SEPARATOR.join(self.prediction_set),
            "refer": data["refer"], "reasons": "; ".join(data["reasons"]), "cautions": "; ".join(data["cautions"]),
            **data["probabilities"], "ood": data["ood"], "ood_score": data["ood_score"],
            "ood_percentile": data["ood_percentile"],
            "header": "" if data["header"] is None else json.dumps(data["header"], separators=(",", ":")),
            "error": data["error"], "model_id": data["model_id"]})
        if self.adaptation:
            row["adaptation"] = self.adaptation
        return row


class Predictor:
    """A loaded model: ``predict`` inputs, score arrays, explain with Grad-CAM (torch backend)."""

    def __init__(self, runner: Runner, meta: BundleMeta, model: ChestXrayNet | EnsembleNet | None = None, *,
                 header_policy: HeaderPolicy | None = DEFAULT_POLICY, coverage: float | None = None) -> None:
        self.runner = runner
        self.meta = meta
        self.model = model
        self.classes: list[str] = list(meta.classes)
        self.preprocessing = meta.preprocessing()
        self.guard = OODGuard.from_dict(meta.ood) if meta.ood else None
        self.conformal = (ConformalSets.from_dict(meta.conformal, self.classes)
                          if meta.conformal and meta.task == "multiclass" else None)
        self.coverage = self.conformal.coverage if self.conformal else None
        """Coverage of the prediction sets (default: the bundle's; ``None`` without conformal sets)."""
        if coverage is not None:
            check_coverage(coverage)
            if self.conformal is None:
                log.warning("coverage %g ignored: this bundle has no conformal prediction sets", coverage)
            else:
                self.coverage = float(coverage)
        self.header_policy = header_policy
        """What a DICOM header must say (``dicomcheck.HeaderPolicy``); ``None`` skips the check."""
        self.confounded = confounded_classes(meta.source_confound)
        self.calibration = meta.logit_transform()
        self.adaptation = describe_lineage(meta.lineage)
        self._cam_model: ChestXrayNet | None = None
        self._cam_layer: torch.nn.Module | None = None
        self._cam_lock = threading.Lock()

    @property
    def backend(self) -> str:
        """The runner's backend name: ``"torch"``, ``"onnx"``, ``"onnx-int8"`` (or ``"custom"`` for another runner)."""
        return getattr(self.runner, "backend", "custom")

    @property
    def image_size(self) -> int:
        """Side of the model's input square."""
        return self.preprocessing.size

    # ------------------------------------------------------------------ arrays

    def prepare(self, source: Source, name: str | None = None) -> np.ndarray:
        """The model's input square (S, S) uint8 of a path, raw bytes or an image array."""
        if isinstance(source, np.ndarray):
            return self.preprocessing.apply(gray_array(source, name or "<array>"))
        return self.preprocessing.load(source, name)

    def forward_arrays(self, images: np.ndarray, batch_size: int = DEFAULT_BATCH) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``(logits (N, C), features (N, F))`` of uint8 squares (N, S, S), batched."""
        if not len(images):
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, 0), np.float32)
        return run_images(self.runner, images, batch_size)

    def probabilities(self, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """Softmax (multi-class) or sigmoid (multi-label) of the logits, through the bundle's calibration
        (``meta.logit_transform()``) unless ``calibrated`` is false."""
        if not calibrated:
            return logits_to_probs(logits, self.meta.task)
        return self.calibration.probabilities(logits, self.meta.task)

    def ood_scores(self, features: np.ndarray) -> np.ndarray:
        """OOD guard scores (N,); NaN when the bundle has no guard."""
        if self.guard is None:
            return np.full(len(features), np.nan)
        return self.guard.score(features)

    def ood_percentiles(self, scores: np.ndarray) -> np.ndarray:
        """Share (0-100) of held-out training X-rays less unusual than each score; NaN without a guard."""
        if self.guard is None:
            return np.full(np.shape(scores), np.nan)
        return self.guard.percentile(scores)

    def predict_arrays(self, images: np.ndarray, *, tta: bool = False,
                       batch_size: int = DEFAULT_BATCH) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (N, C) and OOD scores (N,) of uint8 squares (N, S, S).

        With ``tta`` the probabilities are averaged over :data:`TTA_VIEWS`; the OOD score always
        comes from the unaltered image (the guard was fitted on unaltered images).
        """
        images = np.asarray(images, dtype=np.uint8)
        if not len(images):
            return np.zeros((0, len(self.classes))), np.zeros(0)
        views = [_affine_view(images, *view) for view in TTA_VIEWS] if tta else [images]
        logits, features = self.forward_arrays(np.concatenate(views), batch_size)
        n = len(images)
        probs = np.mean([self.probabilities(logits[i * n:(i + 1) * n]) for i in range(len(views))], axis=0)
        return probs, self.ood_scores(features[:n])

    def label(self, probs: np.ndarray) -> str:
        """The label of one probability row (see the module docstring)."""
        if self.meta.task == "multilabel":
            found = [c for c, p in zip(self.classes, probs) if p >= MULTILABEL_THRESHOLD]
            return SET_SEPARATOR.join(found) or NO_FINDING
        return self.classes[int(np.argmax(probs))]

    # ------------------------------------------------------------------ inputs

    def predict(self, x: Source | Sequence[Source], *, tta: bool = False, batch_size: int = DEFAULT_BATCH,
                names: str | Sequence[str] | None = None) -> Prediction | list[Prediction]:
        """Predict one input (path, bytes, image array) or a list of them (-> a list, same order).

        An unreadable input gives a :class:`Prediction` with ``error`` set; the others are still
        predicted. ``names`` label bytes and arrays in the results and in error messages.
        """
        single = not isinstance(x, (list, tuple))
        sources = [x] if single else list(x)
        labels = [names] if isinstance(names, str) else list(names or [])
        labels += [_default_name(s, i, single) for i, s in enumerate(sources)][len(labels):]
        decoded = (self._decode(source, name) for source, name in zip(sources, labels))
        results = list(self._predict_decoded(decoded, tta=tta, batch_size=batch_size))
        return results[0] if single else results

    def inspect_header(self, source: Source, name: str | None = None) -> HeaderCheck | None:
        """The DICOM header check of a path or raw bytes under :attr:`header_policy`; ``None`` when the
        input has no DICOM header or the check is off."""
        if self.header_policy is None or isinstance(source, np.ndarray) or (
                isinstance(source, (str, Path)) and NPZ_SEPARATOR in str(source)):
            return None
        return inspect_source(source, self.header_policy, name)

    def _decode(self, source: Source, name: str) -> tuple[str, np.ndarray | None, str | None, HeaderCheck | None]:
        try:
            return name, self.prepare(source, name), None, self.inspect_header(source, name)
        except InputError as err:
            return name, None, err.reason, None
        except Exception as err:  # a decoder bug on one input must not lose the others
            return name, None, f"{type(err).__name__}: {err}", None

    def prediction_sets(self, probs: np.ndarray) -> np.ndarray | None:
        """Boolean (N, C) conformal prediction sets at :attr:`coverage`; ``None`` without conformal sets."""
        if self.conformal is None:
            return None
        return self.conformal.sets(probs, self.coverage)

    def _predict_decoded(self, decoded: Iterable[tuple[str, np.ndarray | None, str | None, HeaderCheck | None]],
                         *, tta: bool, batch_size: int) -> Iterator[Prediction]:
        """Predictions of ``(name, image or None, error, header check)``, run in batches, in order."""
        for chunk in _chunks(decoded, batch_size):
            good = [image for _, image, _, _ in chunk if image is not None]
            probs, scores = self.predict_arrays(np.stack(good), tta=tta, batch_size=batch_size) if good else ([], [])
            sets = self.prediction_sets(np.asarray(probs)) if good else None
            rows = iter(range(len(good)))
            for name, image, error, header in chunk:
                if image is None:
                    yield Prediction(name, "", {}, False, None, None, error, model_id=self.meta.model_id,
                                     adaptation=self.adaptation or None)
                    continue
                i = next(rows)
                p, score = probs[i], scores[i]
                flagged = bool(self.guard.is_ood(score)) if self.guard is not None else False
                label = self.label(p)
                percentile = json_number(self.ood_percentiles(score))
                prediction = Prediction(
                    name, label, {c: float(v) for c, v in zip(self.classes, p)}, flagged, json_number(score),
                    percentile,
                    prediction_set=None if sets is None else [c for c, inside in zip(self.classes, sets[i]) if inside],
                    cautions=self.cautions(label), coverage=None if sets is None else self.coverage,
                    model_id=self.meta.model_id, adaptation=self.adaptation or None,
                    typicality=None if percentile is None else typicality(percentile, self.guard.quantile))
                yield self.with_header(prediction, header)

    def cautions(self, label: str) -> list[str]:
        """The source-confound cautions for a predicted label (see the module docstring)."""
        how = (self.meta.source_confound or {}).get("differences") or {}
        return [source_caution(name, self.confounded[name], how.get(name)) for name in label.split(SET_SEPARATOR)
                if name in self.confounded]

    def with_header(self, prediction: Prediction, header: HeaderCheck | None) -> Prediction:
        """``prediction`` with the DICOM header check and its referral decided (see :func:`referral_reasons`)."""
        reasons = referral_reasons(prediction, header, self.coverage, self.guard)
        return replace(prediction, header=None if header is None else dict(header.fields),
                       refer=bool(reasons), reasons=reasons)

    # ------------------------------------------------------------------ Grad-CAM

    def gradcam(self, x: Source, target: str | int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """``(input square uint8 (S, S), heatmap (S, S) in [0, 1], explained class index)``.

        ``target`` is a class name or index; ``None`` explains the most probable class.
        """
        if self.model is None:
            raise ChestXrayError("Grad-CAM needs the torch backend (load_model(path, backend='torch'))")
        import torch

        from ..model.cam import explained_member, gradcam, target_layer

        image = self.prepare(x)
        if target is None:
            probs, _ = self.predict_arrays(image[None])
            index = int(np.argmax(probs[0]))
        else:
            index = self._class_index(target)
        with self._cam_lock:
            if self._cam_model is None:  # a private copy: hooks never touch the model serving predictions
                self._cam_model = copy.deepcopy(explained_member(self.model)).requires_grad_(False)
                self._cam_layer = target_layer(self._cam_model)
            device = next(self._cam_model.parameters()).device
            tensor = torch.from_numpy(image).float().div(255.0)[None, None].to(device)
            heatmap = gradcam(self._cam_model, tensor, index, layer=self._cam_layer)
        return image, heatmap, index

    def gradcam_png(self, x: Source, target: str | int | None = None) -> bytes:
        """PNG of the Grad-CAM heatmap over the model's input square (see :meth:`gradcam`), titled with the
        explained class and its probability, with a colour bar."""
        from ..model.cam import labelled_overlay, to_png

        image, heatmap, index = self.gradcam(x, target)
        probability = float(self.predict_arrays(image[None])[0][0, index])
        title = f"Grad-CAM for {self.classes[index]} (p = {probability:.3f}): red = raised its score most"
        return to_png(labelled_overlay(image, heatmap, title))

    def _class_index(self, target: str | int) -> int:
        if isinstance(target, str) and target in self.classes:
            return self.classes.index(target)
        if isinstance(target, (int, np.integer)) and 0 <= target < len(self.classes):
            return int(target)
        raise ChestXrayError(f"unknown class {target!r}: the model's classes are {', '.join(self.classes)}")


def resolve_backend(path: str | Path, backend: str) -> str:
    """The backend ``load_model(path, backend)`` runs: ``"auto"`` is ``"onnx"`` when the bundle holds
    ``model.onnx`` (written by ``chestxray export`` after its parity check), else ``"torch"``."""
    if backend != "auto":
        return backend
    directory = Path(path)
    return "onnx" if (directory.parent if directory.is_file() else directory).joinpath(ONNX_FILE).is_file() else "torch"


def load_model(path: str | Path, backend: str = "torch", *, device: str | None = None,
               threads: int | None = None, header_policy: HeaderPolicy | None = DEFAULT_POLICY,
               coverage: float | None = None) -> Predictor:
    """Load a bundle folder (or a file in it) as a :class:`Predictor`.

    ``backend="onnx"`` runs the bundle's ``model.onnx`` (made by ``chestxray export``; refused when
    exported from other weights) with onnxruntime, with ``threads`` intra-op threads (see
    ``OnnxRunner``), and never imports torch: the fastest start. Grad-CAM then is not available.
    ``backend="onnx-int8"`` runs ``model.int8.onnx`` (``chestxray export --quantize int8``) the same
    way, refused likewise. Every file is checked against the sha256 ``model.json`` records
    (``bundle.verify_file``). ``backend="auto"`` takes ONNX when the bundle has it (and torch, with a warning, when that
    file was exported from other weights or not recorded; a graph changed after it was recorded is refused). ``device`` (torch only): default CUDA when available.
    ``header_policy``: what a DICOM header must say for an image not to be referred (``None``: no check);
    ``coverage``: of the conformal prediction sets (default: the bundle's). Every command that predicts
    (predict, its sharded and PACS paths, serve, listen) sets both here.
    """
    trust = {"header_policy": header_policy, "coverage": coverage}
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    if backend == "auto":
        if resolve_backend(directory, backend) == "onnx":
            try:
                return load_model(directory, "onnx", threads=threads, **trust)
            except ChangedFileError:
                raise  # a replaced graph is refused, never worked around
            except InputError as err:
                log.warning("%s; using the torch backend", err)
        return load_model(directory, "torch", device=device, threads=threads, **trust)
    if backend == "torch":
        import torch

        model, meta = load_bundle(directory)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return Predictor(TorchRunner(model), meta, model, **trust)
    if backend in ONNX_BACKENDS:
        meta = read_meta(directory)
        onnx_path = directory / ONNX_BACKENDS[backend]
        if not onnx_path.is_file():
            how = " --quantize int8 --calibration-data DATA" if backend == "onnx-int8" else ""
            raise ChestXrayError(f"{directory}: no {onnx_path.name} in the bundle; create it with "
                                 f"`chestxray export {directory} --format onnx{how}` or use the torch backend")
        verify_file(directory, meta, onnx_path.name)  # before onnxruntime parses a byte of it
        runner = OnnxRunner(onnx_path, threads)
        check_onnx(directory, runner.metadata, onnx_path, meta)
        if runner.n_outputs is not None and runner.n_outputs != len(meta.classes):
            raise InputError(onnx_path, f"the graph gives {runner.n_outputs} class scores but model.json declares "
                                        f"{len(meta.classes)} classes; export it again with "
                                        f"`chestxray export {directory} --format onnx`")
        return Predictor(runner, meta, **trust)
    raise ChestXrayError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------- files, folders, globs


def expand_inputs(inputs: Sequence[str | Path]) -> list[tuple[str, str | None]]:
    """``(file, error or None)`` for every file named, found in a folder (recursively) or matched by a glob.

    A folder without images, a glob matching nothing or a missing file gives one entry with an error.
    """
    entries: list[tuple[str, str | None]] = []
    for item in map(str, inputs):
        path = Path(item).expanduser()
        if path.is_dir():
            files, unreadable = find_images(path)
            entries += [(f, None) for f in files] + unreadable
            if not files and not unreadable:
                entries.append((item, "no image files in this folder"))
        elif path.is_file() or NPZ_SEPARATOR in item:
            entries.append((str(path) if path.is_file() else item, None))
        elif _GLOB_CHARS.search(item):
            files = sorted(f for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
            entries += [(f, None) for f in files] or [(item, "no file matches this pattern")]
        else:
            entries.append((item, "no such file or folder"))
    return entries


def predict_inputs(predictor: Predictor, inputs: Sequence[str | Path], batch_size: int = DEFAULT_BATCH,
                   progress: bool = True, *, tta: bool = False) -> list[Prediction]:
    """A :class:`Prediction` for every file that files, folders and globs name, in order; unreadable
    files (and patterns that match nothing) get an ``error``.

    Files are decoded by a few threads while the model runs.
    """
    entries = expand_inputs(inputs)
    predictions: list[Prediction] = []
    with _progress(progress) as bar, ThreadPoolExecutor(_DECODE_THREADS) as pool:
        task = bar.add_task("predicting", total=len(entries))

        def decode(entry: tuple[str, str | None]) -> tuple[str, np.ndarray | None, str | None, HeaderCheck | None]:
            file, error = entry
            return (file, None, error, None) if error else predictor._decode(file, file)

        decoded = _map_ahead(pool, decode, entries, ahead=2 * batch_size)
        for result in predictor._predict_decoded(decoded, tta=tta, batch_size=batch_size):
            predictions.append(result)
            bar.advance(task)
    return predictions


def predictions_table(predictions: Sequence[Prediction], classes: Sequence[str]) -> pd.DataFrame:
    """One row per prediction (:meth:`Prediction.to_row`): ``file, label, [called,] prediction_set, refer,
    reasons, cautions, <class>..., ood, ood_score, ood_percentile, header, error, model_id`` (and
    ``adaptation`` for a site-adapted bundle)."""
    rows = [prediction.to_row() for prediction in predictions]
    called = any(prediction.called is not None for prediction in predictions)
    columns = ["file", "label", *(["called"] if called else []), "prediction_set", "refer", "reasons", "cautions",
               *classes, "ood", "ood_score", "ood_percentile", "header", "error", "model_id"]
    if any("adaptation" in row for row in rows):
        columns.append("adaptation")
    return pd.DataFrame(rows, columns=columns)


def predict_paths(predictor: Predictor, inputs: Sequence[str | Path], batch_size: int = DEFAULT_BATCH,
                  progress: bool = True, *, tta: bool = False) -> pd.DataFrame:
    """:func:`predict_inputs` as a table (:func:`predictions_table`)."""
    table = predictions_table(predict_inputs(predictor, inputs, batch_size, progress, tta=tta), predictor.classes)
    table["model_id"] = predictor.meta.model_id  # also on an empty table
    return table


def shard(items: Sequence[T], rank: int, world: int, block: int = 1) -> Sequence[T]:
    """Rank ``rank``'s contiguous share of ``items`` in whole blocks of ``block`` items, as even as can be.

    The shards of ranks ``0 .. world - 1``, concatenated, are ``items``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    blocks = -(-len(items) // block)
    return items[blocks * rank // world * block: blocks * (rank + 1) // world * block]


def sharded_predict(model: str | Path, inputs: Sequence[str | Path], *, backend: str = "torch",
                    batch_size: int = DEFAULT_BATCH, progress: bool = True, tta: bool = False,
                    coverage: float | None = None,
                    header_policy: HeaderPolicy | None = DEFAULT_POLICY) -> pd.DataFrame | None:
    """:func:`sharded_predictions` as a table (:func:`predictions_table`) on rank 0, ``None`` on the others."""
    found = sharded_predictions(model, inputs, backend=backend, batch_size=batch_size, progress=progress, tta=tta,
                                coverage=coverage, header_policy=header_policy)
    if found is None:
        return None
    predictions, classes = found
    return predictions_table(predictions, classes)


def sharded_predictions(model: str | Path, inputs: Sequence[str | Path], *, backend: str = "torch",
                        batch_size: int = DEFAULT_BATCH, progress: bool = True, tta: bool = False,
                        coverage: float | None = None, header_policy: HeaderPolicy | None = DEFAULT_POLICY
                        ) -> tuple[list[Prediction], list[str]] | None:
    """:func:`predict_inputs` over files, folders and globs, with every rank of a ``torchrun`` launch.

    Rank 0 expands the inputs once and sends the list to every rank; each rank predicts a contiguous
    shard of whole batches, so every image is predicted in the same batch as in one process (on CPUs
    the figures equal those of one process with as many threads as each rank); rank 0 gathers the
    predictions in input order. Returns them (and the classes) on rank 0 and ``None`` on the others; outside a
    distributed launch it runs in this process. Each rank uses the GPU of its local rank if any.
    ``coverage`` and ``header_policy`` as for :func:`load_model`, on every rank.
    """
    import torch.distributed as dist

    import torch

    cuda = resolve_backend(model, backend) == "torch" and torch.cuda.is_available()
    predictor = load_model(model, backend, device=f"cuda:{local_rank()}" if cuda else None, coverage=coverage,
                           header_policy=header_policy)
    if world_size() == 1:
        return predict_inputs(predictor, inputs, batch_size, progress, tta=tta), predictor.classes
    if not dist.is_initialized():  # kept for the life of the process: a group made again after
        dist.init_process_group("gloo")  # destroy_process_group can hang on torchrun's store
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")  # only Python objects travel
    rank, world = dist.get_rank(), dist.get_world_size()
    entries = [expand_inputs(inputs) if rank == 0 else None]
    dist.broadcast_object_list(entries, src=0, group=group)
    files = [file for file, _ in shard(entries[0], rank, world, block=batch_size)]
    mine = predict_inputs(predictor, files, batch_size, progress and rank == 0, tta=tta)
    parts: list[list[Prediction] | None] | None = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0, group=group)
    if parts is None:
        return None
    return [prediction for part in parts for prediction in part or []], predictor.classes


@dataclass
class PredictionRun:
    """What :func:`predict_files` produced: the predictions, their table (:func:`predictions_table`) and
    the Grad-CAM files."""

    predictions: list[Prediction]
    table: pd.DataFrame
    cams: list[Path]

    @property
    def failed(self) -> list[tuple[str, str]]:
        """``(file, error)`` of every input that could not be predicted."""
        return [(p.file, p.error) for p in self.predictions if p.error]


def predict_files(bundle: str | Path, inputs: Sequence[str | Path], *, backend: str = DEFAULT_BACKEND,
                  batch_size: int = DEFAULT_BATCH, tta: bool = False, operating_point: str | None = None,
                  cam_dir: str | Path | None = None, progress: bool = False, coverage: float | None = None,
                  header_check: bool = True) -> PredictionRun | None:
    """Everything ``chestxray predict`` does: predict files, folders and globs with ``bundle``, call the
    classes at ``operating_point`` (:func:`call_operating_point`), write Grad-CAM overlays into
    ``cam_dir`` (:func:`write_cams`). ``coverage``: of the conformal prediction sets (default: the
    bundle's); ``header_check``: refer DICOMs whose header says they are not frontal chest radiographs.

    Under ``torchrun`` every rank predicts its shard (:func:`sharded_predictions`); rank 0 gets the
    result and the others ``None`` (Grad-CAM runs on rank 0 alone).
    """
    predictor = None
    trust = {"coverage": coverage, "header_policy": DEFAULT_POLICY if header_check else None}
    if world_size() > 1:
        found = sharded_predictions(bundle, inputs, backend=backend, batch_size=batch_size, progress=progress,
                                    tta=tta, **trust)
        if found is None:  # a rank other than 0
            return None
        predictions, classes = found
    else:
        predictor = load_model(bundle, backend=backend, **trust)
        predictions, classes = predict_inputs(predictor, inputs, batch_size, progress, tta=tta), predictor.classes
    if operating_point:
        meta = predictor.meta if predictor is not None else read_meta(bundle)  # a sharded run loads none here
        predictions = call_operating_point(predictions, meta.operating_points, operating_point)
    cams: list[Path] = []
    if cam_dir is not None:
        explainer = predictor if predictor is not None and predictor.model is not None else load_model(bundle)
        cams = write_cams(explainer, inputs, cam_dir, progress=progress)
    return PredictionRun(predictions, predictions_table(predictions, classes), cams)


def confounded_classes(source_confound: dict[str, Any] | None) -> dict[str, float]:
    """The classes a bundle's ``source_confound`` flags, with their metadata-only AUC."""
    if not source_confound:
        return {}
    auc = source_confound.get("auc") or {}
    return {name: float(auc[name]) for name in source_confound.get("flagged", []) if auc.get(name) is not None}


def source_caution(name: str, auc: float, how: str | None = None) -> str:
    """The caution on a prediction of a class whose training images are separable by their source, in
    words a clinician-researcher reads at once; ``how``: what the audit found (``source_confound.differences``)."""
    found = f" ({how})" if how else ""
    return (f"caution: this model's {name} training images came from a different source than its other images"
            f"{found}, so it may have learned to recognise that source rather than the disease: an X-ray from "
            f"another hospital or population (adults rather than children, say) may be called {name} for that "
            f"reason alone (file metadata tells the {name} images apart with AUC {auc:.2f})")


def operating_thresholds(points: dict[str, dict[str, float]], point: str) -> dict[str, float]:
    """Each class's threshold at ``point`` (see ``BundleMeta.operating_points``); refuses a point the bundle lacks."""
    available = sorted({name for thresholds in points.values() for name in thresholds})
    if point not in available:
        raise ChestXrayError(f"operating point {point!r} is not in this bundle "
                             f"(it has: {', '.join(available) or 'none; retrain to get them'})")
    return {name: by_point[point] for name, by_point in points.items() if point in by_point}


def call_operating_point(predictions: Sequence[Prediction], points: dict[str, dict[str, float]],
                         point: str) -> list[Prediction]:
    """``predictions`` with ``called`` set: the classes whose probability is at or above their ``point``
    threshold (empty for an unreadable input)."""
    thresholds = operating_thresholds(points, point)
    return [replace(p, called=[] if p.error else [name for name, t in thresholds.items()
                                                  if p.probabilities.get(name, -1.0) >= t])
            for p in predictions]


def apply_operating_point(table: pd.DataFrame, points: dict[str, dict[str, float]], point: str) -> pd.DataFrame:
    """``table`` (from :func:`predict_paths`) with a ``called`` column after ``label``, as
    :func:`call_operating_point` decides it, joined by '|'."""
    thresholds = operating_thresholds(points, point)
    called = ["" if isinstance(row.get("error"), str) and row["error"] else
              SET_SEPARATOR.join(name for name, t in thresholds.items() if row[name] >= t)
              for row in table.to_dict("records")]
    table = table.copy()
    table.insert(table.columns.get_loc("label") + 1, "called", called)
    return table


def write_cams(predictor: Predictor, inputs: Sequence[str | Path], out_dir: str | Path, *,
               target: str | int | None = None, progress: bool = True) -> list[Path]:
    """Write ``<stem>_cam.png`` Grad-CAM overlays for the inputs (as :func:`predict_paths` expands them)
    into ``out_dir``; unreadable inputs are skipped. Returns the files written."""
    out_dir = make_folder(out_dir, "Grad-CAM folder")  # a folder that cannot be made or written: one line
    written: list[Path] = []
    used: set[str] = set()
    entries = [file for file, error in expand_inputs(inputs) if error is None]
    with _progress(progress) as bar:
        task = bar.add_task("Grad-CAM", total=len(entries))
        for file in entries:
            bar.advance(task)
            try:
                png = predictor.gradcam_png(file, target)
            except InputError:
                continue
            stem = _unique(_safe_stem(file), used)
            written.append(write_bytes(out_dir / f"{stem}_cam.png", png))
    return written


# ---------------------------------------------------------------------- helpers


def _default_name(source: Source, index: int, single: bool) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    kind = "<upload" if isinstance(source, bytes) else "<array"
    return f"{kind}>" if single else f"{kind} {index}>"


def _affine_view(images: np.ndarray, scale: float, shift_x: float, shift_y: float) -> np.ndarray:
    """Every image zoomed by ``scale`` about its centre and shifted; borders black."""
    size = images.shape[-1]
    centre = (size - 1) / 2
    matrix = np.array([[scale, 0.0, (1 - scale) * centre + shift_x * size],
                       [0.0, scale, (1 - scale) * centre + shift_y * size]])
    return np.stack([cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
                     for image in images])


def _map_ahead(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """``map(fn, items)`` in order on ``pool``, with at most ``ahead`` calls in flight (bounded memory)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _safe_stem(file: str) -> str:
    """A file-name stem for ``file``; MedMNIST references keep their split and index."""
    npz, _, key = file.rpartition(NPZ_SEPARATOR)
    stem = f"{Path(npz).stem}_{key}" if npz else Path(file).stem
    return _UNSAFE_NAME.sub("_", stem).strip("._") or "image"


def _unique(stem: str, used: set[str]) -> str:
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate


def _progress(enabled: bool) -> Progress:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=make_console(stderr=True), disable=not enabled, transient=True)
