"""Model bundle: a folder with ``model.safetensors`` (state dict), ``model.json`` (metadata) and,
after ``chestxray export``, ``model.onnx``. Never unpickles.

This module owns the bundle's file names, the sha256 of each file that ``model.json`` records
(``files``) and the one check of a file against that record (:func:`verify_file`, which every
loader calls), and the check that an exported graph holds the bundle's weights
(:func:`weights_digest`, :func:`check_onnx`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError, safe_open

from chestxray import __version__
from chestxray.stats.logit_transform import LogitTransform
from chestxray.data.decode import Preprocessing
from chestxray.errors import ChestXrayError, InputError
from chestxray.model.modelcard import CARD_FILE, render_model_card
from chestxray.provenance import describe, file_sha256, model_id
from chestxray.storage import atomic_path, make_folder, write_text

if TYPE_CHECKING:  # torch and timm load only when a model is built: reading model.json stays light
    from chestxray.model.models import ChestXrayNet, EnsembleNet

FORMAT = 1
SCHEMA_VERSION = 2
"""The version of ``model.json``'s schema, written in it as ``schema_version``. A model.json without one was
written before the version existed and reads as version 1 (the same fields); one newer than this code
reads is refused in one line."""
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"
"""The INT8 graph written by ``chestxray export --quantize int8`` (``quantize.py``)."""
ONNX_WEIGHTS_KEY = "chestxray.weights_sha256"
"""The ONNX metadata entry holding :func:`weights_digest` of the weights the graph was exported from."""
ONNX_ARCH_KEY = "chestxray.arch"
"""The ONNX metadata entry holding the architecture the graph was exported from."""
HELD_OUT_FILE = "heldout.npz"
"""The bundle's held-out (validation) images as the model saw them: logits (N, C), pooled features (N, F,
float16) and class indices (N,). Label-free site adaptation refits the prediction sets on them, weighted
towards the site (``chestxray adapt --unlabeled``). No pixels and no file names: about 0.3 MB for 100 images."""
RECORDED_FILES = (WEIGHTS_FILE, ONNX_FILE, INT8_ONNX_FILE, HELD_OUT_FILE)
"""The files a bundle loads for inference, whose sha256 ``model.json`` records in ``files``."""
ARCH_PATTERN = r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_-]+)?$"
"""What a model registry name looks like (timm's: ``name`` or ``name.pretrained_tag``): never a path."""

MAX_IMAGE_SIZE = 2048
"""Largest input side a bundle may declare (its model is built at that size for every image)."""
MAX_MEMBERS = 32
"""Most ensemble members a bundle may declare (each is a whole model in memory)."""
MAX_CLASSES = 10_000
MAX_META_BYTES = 64 * 2**20
"""Largest ``model.json`` read (64 MiB; a bundle's is tens of kB, its calibration scores included)."""

__all__ = ["SCHEMA_VERSION", "BundleMeta", "BundleSchema", "save_bundle", "load_bundle", "read_meta", "weights_digest", "check_onnx",
           "verify_file", "record_file", "ChangedFileError", "WEIGHTS_FILE", "META_FILE", "ONNX_FILE",
           "INT8_ONNX_FILE", "ONNX_WEIGHTS_KEY", "ONNX_ARCH_KEY", "RECORDED_FILES", "HELD_OUT_FILE", "HeldOut",
           "save_held_out", "load_held_out"]


class ChangedFileError(InputError):
    """A bundle file whose sha256 differs from the one ``model.json`` records: changed or swapped
    after it was written. Never worked around (the auto backend does not fall back on it)."""


class _Extra(BaseModel):
    """The parts of ``extra`` the code reads; anything else is kept as is."""

    model_config = ConfigDict(strict=True, extra="allow")
    members: int | None = Field(None, ge=1, le=MAX_MEMBERS)
    trained_on: dict[str, Any] | None = None


class _Calibration(BaseModel):
    """The logit transform (:class:`~chestxray.logit_transform.LogitTransform`); sizes checked by ``read_meta``."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    kind: Literal["none", "temperature", "bias", "vector"]
    scale: list[float] = Field(default=[], max_length=MAX_CLASSES)
    bias: list[float] = Field(default=[], max_length=MAX_CLASSES)


class _SeenImages(BaseModel):
    """Content hashes of the training and validation images (:mod:`chestxray.lineage`), base64."""

    model_config = ConfigDict(strict=True, extra="allow")
    hash: str
    train: str
    val: str
    n_train: int = Field(0, ge=0)
    n_val: int = Field(0, ge=0)


class _Lineage(BaseModel):
    """Where a site-adapted (or warm-started) bundle came from."""

    model_config = ConfigDict(strict=True, extra="allow")
    mode: str
    parent_id: str
    parent_weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    date: str
    data_fingerprint: str | None = None
    class_counts: dict[str, int] | None = None
    n_images: int | None = Field(None, ge=0)


class BundleSchema(BaseModel):
    """What ``model.json`` must hold, checked before any model is built: types, ranges and sizes.
    Fields with a default may be absent (bundles written before they existed); every field of
    :class:`BundleMeta` has one here (a test keeps them in step)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    format: Literal[1]
    schema_version: int = Field(1, ge=1)
    classes: list[str] = Field(min_length=1, max_length=MAX_CLASSES)
    image_size: int = Field(ge=8, le=MAX_IMAGE_SIZE)
    arch: str = Field(min_length=1, max_length=200)
    task: Literal["multiclass", "multilabel"]
    channels: Literal[1]
    mean: float
    std: float = Field(gt=0)
    preprocess: dict[str, str]
    temperature: float = Field(gt=0)
    operating_points: dict[str, dict[str, float]] = {}
    ood: dict[str, Any] | None
    conformal: dict[str, Any] | None = None
    source_confound: dict[str, Any] | None = None
    train_fingerprint: str
    metrics: dict[str, Any]
    package_version: str
    created: str
    extra: _Extra = _Extra()
    provenance: dict[str, Any] = {}
    calibration: _Calibration | dict[str, Any] = {}
    seen_images: _SeenImages | None = None
    lineage: _Lineage | None = None
    files: dict[Literal[RECORDED_FILES], Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = {}

    @field_validator("arch")
    @classmethod
    def _registry_name(cls, arch: str) -> str:
        if not re.fullmatch(ARCH_PATTERN, arch):
            raise ValueError(f"{arch[:60]!r} is not a model registry name (such as tf_efficientnet_lite0)")
        return arch

    @field_validator("classes")
    @classmethod
    def _distinct_names(cls, classes: list[str]) -> list[str]:
        if any(not name for name in classes) or len(set(classes)) != len(classes):
            raise ValueError("class names must be distinct and not empty")
        return classes


@dataclass
class BundleMeta:
    """Everything needed to rebuild and use a model (ARCHITECTURE.md, bundle contract).

    ``arch``, ``task``, ``mean``, ``std`` (and ``extra["members"]`` for ensembles) are taken from the
    model by ``save_bundle``; ``extra`` holds anything else (history, fold scores...).
    ``calibration`` is the logit transform (:class:`~chestxray.logit_transform.LogitTransform` as a dict;
    empty: ``temperature`` alone), ``seen_images`` the content hashes of the training and validation
    images (:mod:`chestxray.lineage`), ``lineage`` the parent and local data of a site-adapted bundle.
    """

    classes: list[str]
    image_size: int
    arch: str = ""
    task: str = "multiclass"
    mean: float = 0.0
    std: float = 1.0
    preprocess: dict[str, Any] = field(default_factory=lambda: {"mode": "pad"})
    temperature: float = 1.0
    operating_points: dict[str, dict[str, float]] = field(default_factory=dict)
    ood: dict[str, Any] | None = None
    conformal: dict[str, Any] | None = None
    """Class-conditional conformal sets (``conformal.ConformalSets.to_dict``); ``None``: not fitted."""
    source_confound: dict[str, Any] | None = None
    """Per class, how well file metadata alone tells its training images from the others
    (``audit.source_confound``); ``None``: not measured."""
    train_fingerprint: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    package_version: str = __version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    format: int = FORMAT
    schema_version: int = SCHEMA_VERSION
    """As read (1: written before the version existed); every write stamps :data:`SCHEMA_VERSION`."""
    channels: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    """``weights_sha256``, ``package_version``, ``torch_version``, ``timm_version``, ``python_version``
    and ``git_commit`` (see :func:`chestxray.provenance.describe`); filled by ``save_bundle``."""
    calibration: dict[str, Any] = field(default_factory=dict)
    seen_images: dict[str, Any] | None = None
    lineage: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    """sha256 (hex) of the bundle's files by name (:data:`RECORDED_FILES`): the weights (``save_bundle``)
    and each graph exported into the bundle (:func:`record_file`); checked by :func:`verify_file` on
    every load. Empty in bundles written before it existed (their older checks still apply)."""

    @property
    def model_id(self) -> str:
        """``<arch>@<weights sha256 prefix>``, the id every result names (older bundles without a
        recorded hash: ``arch:fingerprint:created``)."""
        sha = self.provenance.get("weights_sha256")
        if sha:
            return model_id(self.arch, sha)
        return ":".join(part for part in (self.arch, self.train_fingerprint[:12], self.created) if part)

    def logit_transform(self) -> LogitTransform:
        """The calibration applied to the logits: ``calibration``, else the bare ``temperature``."""
        if self.calibration:
            return LogitTransform.from_dict(self.calibration, len(self.classes))
        return LogitTransform.from_temperature(self.temperature)

    def preprocessing(self) -> Preprocessing:
        """How an image becomes this model's input: ``image_size`` with the ``preprocess`` options."""
        return Preprocessing.from_options(self.image_size, self.preprocess)


def save_bundle(directory: str | Path, model: ChestXrayNet | EnsembleNet, meta: BundleMeta) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into `directory` (created if needed); return the folder."""
    from safetensors.torch import save_file

    from chestxray.model.models import EnsembleNet

    directory = Path(directory)
    if len(meta.classes) != model.num_classes:
        raise InputError(directory, f"{len(meta.classes)} class names for a model with {model.num_classes} outputs")
    extra = dict(meta.extra)
    if isinstance(model, EnsembleNet):
        extra["members"] = len(model.members)
    else:
        extra.pop("members", None)
    meta = dataclasses.replace(
        meta, arch=model.arch, task=model.task, mean=float(model.mean), std=float(model.std), extra=extra
    )
    make_folder(directory, "bundle folder")
    with atomic_path(directory / WEIGHTS_FILE) as tmp:  # each file appears complete or not at all
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
        except SafetensorError as err:  # its I/O errors (a full disk) are not OSErrors
            raise ChestXrayError(f"{directory / WEIGHTS_FILE}: cannot write the weights ({err})") from None
    provenance = describe(directory / WEIGHTS_FILE)
    meta = dataclasses.replace(meta, provenance=provenance, files={WEIGHTS_FILE: provenance["weights_sha256"]})
    return write_meta(directory, meta)


def write_meta(directory: str | Path, meta: BundleMeta, keep: dict[str, Any] | None = None) -> Path:
    """(Re)write a bundle's ``model.json`` and its ``MODEL_CARD.md`` (generated from it); return the folder.
    ``keep``: entries of the ``model.json`` being rewritten that ``meta`` does not hold, kept as they are."""
    directory = Path(directory)
    data = {**(keep or {}), **dataclasses.asdict(meta), "schema_version": SCHEMA_VERSION}
    write_text(directory / META_FILE, json.dumps(data, indent=2) + "\n")
    write_text(directory / CARD_FILE, render_model_card(data))
    return directory


def read_meta(directory: str | Path) -> BundleMeta:
    """The bundle's ``model.json``, validated against :class:`BundleSchema` (one-line
    :class:`InputError` naming the fields on failure)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "bundle folder not found")
    path = directory / META_FILE
    if not path.is_file():
        raise InputError(path, "missing: not a chestxray bundle")
    try:
        if path.stat().st_size > MAX_META_BYTES:
            raise InputError(path, f"{path.stat().st_size:,} bytes exceeds the limit of {MAX_META_BYTES:,} bytes "
                                   "for model.json")
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(path, f"not valid JSON ({err})") from None
    except RecursionError:
        raise InputError(path, "not a model.json: nested too deeply") from None
    except OSError as err:
        raise InputError(path, f"cannot read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise InputError(path, "not a JSON object")
    if data.get("format") != FORMAT:
        raise InputError(path, f"unknown bundle format {data.get('format')!r} (this version reads format {FORMAT})")
    version = data.setdefault("schema_version", 1)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise InputError(path, f"schema version {version} is newer than this chestxray reads ({SCHEMA_VERSION}): "
                               "upgrade chestxray")
    try:
        BundleSchema.model_validate(data)
    except ValidationError as err:
        raise InputError(path, f"invalid model.json: {_problems(err)}") from None
    except RecursionError:
        raise InputError(path, "invalid model.json: nested too deeply") from None
    names = [f.name for f in dataclasses.fields(BundleMeta)]
    meta = BundleMeta(**{name: data[name] for name in names if name in data})
    try:
        meta.preprocessing()
    except (TypeError, ValueError) as err:
        raise InputError(path, f"bad preprocessing options: {err}") from None
    if not set(meta.operating_points) <= set(meta.classes):
        raise InputError(path, "bad operating_points: expected {class name: {point name: threshold}}")
    try:
        meta.logit_transform()
    except ChestXrayError as err:
        raise InputError(path, str(err)) from None
    return meta


def _problems(err: ValidationError, shown: int = 3) -> str:
    """pydantic's findings on one line: ``field.path: message`` for the first few."""
    found = [f"{'.'.join(map(str, e['loc'])) or 'model.json'}: {e['msg']}" for e in err.errors()]
    return "; ".join(found[:shown]) + (f" (and {len(found) - shown} more)" if len(found) > shown else "")


def _check_weight_shapes(meta: BundleMeta, path: Path) -> None:
    """Compare the weights file's tensor names and shapes (read from its header, no tensor loaded)
    with those of the declared architecture, built on the meta device (no memory, no time)."""
    import torch

    from chestxray.model.models import create_model

    try:
        with safe_open(path, framework="pt") as weights:
            stored = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except (SafetensorError, OSError) as err:
        raise InputError(path, f"cannot read weights ({err})") from None
    with torch.device("meta"):
        member = create_model(meta.arch, len(meta.classes), weights="none", task=meta.task)
    one = {key: tuple(value.shape) for key, value in member.state_dict().items()}
    members = meta.extra.get("members")
    expected = {f"member{i}.{key}": shape for i in range(members) for key, shape in one.items()} if members else one
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    misshaped = sorted(k for k in expected.keys() & stored.keys() if expected[k] != stored[k])
    problems = [f"{len(keys)} {kind} (e.g. {keys[0]})" for kind, keys in
                (("missing", missing), ("unexpected", unexpected), ("with another shape", misshaped)) if keys]
    if problems:
        what = f"{members} x {meta.arch}" if members else meta.arch
        raise InputError(path, f"weights do not match the {what} declared in {META_FILE}: {'; '.join(problems)}")


def verify_file(directory: str | Path, meta: BundleMeta, name: str) -> str:
    """The sha256 of the bundle file ``name`` once it matches what ``model.json`` records; the one
    rule every loader applies before using a bundle file (weights, ``model.onnx``, the INT8 graph).

    A file whose sha256 differs from its record raises :class:`ChangedFileError` (for the weights, the
    record is ``files`` or, in bundles written before ``files`` existed, ``provenance.weights_sha256``);
    a file absent from a ``files`` record that lists others was not written into this bundle by
    chestxray and raises :class:`InputError`. Bundles without ``files`` keep their older checks
    (:func:`check_onnx` for graphs)."""
    path = Path(directory) / name
    try:
        sha = file_sha256(path)
    except OSError as err:
        raise InputError(path, f"cannot read ({err.strerror or err})") from None
    recorded = [value for value in (meta.files.get(name),
                                    meta.provenance.get("weights_sha256") if name == WEIGHTS_FILE else None) if value]
    for value in recorded:
        if value != sha:
            raise ChangedFileError(path, f"sha256 {sha[:12]}... differs from the {value[:12]}... recorded in "
                                         f"{META_FILE}: the file was changed or replaced after it was written")
    if meta.files and name not in meta.files:
        again = "" if name == WEIGHTS_FILE else f"; export it again with `chestxray export {directory} --format onnx" + (
            " --quantize int8 --calibration-data DATA`" if name == INT8_ONNX_FILE else "`")
        raise InputError(path, f"not recorded in {META_FILE}: not written into this bundle by chestxray{again}")
    return sha


def record_file(directory: str | Path, name: str) -> str:
    """Record the sha256 of the bundle file ``name`` (one of :data:`RECORDED_FILES`, just written into
    the bundle) in ``model.json``, with the weights' when the bundle predates ``files``; every other
    entry of ``model.json`` is kept as it is. Returns the recorded sha256."""
    if name not in RECORDED_FILES:
        raise ValueError(f"{name} is not a bundle file whose hash is recorded")
    directory = Path(directory)
    meta = read_meta(directory)
    files = dict(meta.files)
    if WEIGHTS_FILE not in files and name != WEIGHTS_FILE:
        files[WEIGHTS_FILE] = verify_file(directory, meta, WEIGHTS_FILE)
    files[name] = file_sha256(directory / name)
    data = json.loads((directory / META_FILE).read_text())
    write_meta(directory, dataclasses.replace(meta, files=files), keep=data)
    return files[name]


def load_bundle(directory: str | Path) -> tuple[ChestXrayNet | EnsembleNet, BundleMeta]:
    """Rebuild the model of a bundle in eval mode, with its metadata."""
    from safetensors.torch import load_file

    from chestxray.model.models import EnsembleNet, create_model, load_state_strict

    meta = read_meta(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise InputError(path, "missing: the bundle has no weights")
    _check_weight_shapes(meta, path)
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as err:
        raise InputError(path, f"cannot read weights ({err})") from err
    sha = verify_file(directory, meta, WEIGHTS_FILE)  # hashed after the read: the bytes loaded are the bytes checked
    if not meta.provenance.get("weights_sha256"):  # a bundle older than provenance: recorded in memory
        meta = dataclasses.replace(meta, provenance={**meta.provenance, "weights_sha256": sha})

    def build() -> ChestXrayNet:
        return create_model(meta.arch, len(meta.classes), weights="none", task=meta.task)

    members = meta.extra.get("members")
    model = EnsembleNet([build() for _ in range(members)]) if members else build()
    load_state_strict(model, state, path)
    return model.eval(), meta


def weights_digest(directory: str | Path) -> str:
    """The sha256 of the bundle's weights file (hex)."""
    return file_sha256(Path(directory) / WEIGHTS_FILE)


def check_onnx(directory: str | Path, metadata: dict[str, str], onnx_path: str | Path | None = None,
               meta: BundleMeta | None = None) -> None:
    """Refuse an ONNX graph (its custom ``metadata``) exported from other weights than the bundle's, or
    (given the bundle's ``meta``) from another architecture than the one ``model.json`` declares."""
    path = Path(onnx_path or Path(directory) / ONNX_FILE)
    again = " --quantize int8 --calibration-data DATA" if path.name == INT8_ONNX_FILE else ""
    if metadata.get(ONNX_WEIGHTS_KEY) != weights_digest(directory):
        raise InputError(path, "exported from other weights than the bundle's; export it again "
                               f"with `chestxray export BUNDLE --format onnx{again}`")
    graph_arch = metadata.get(ONNX_ARCH_KEY)
    if meta is not None and graph_arch is not None and graph_arch != meta.arch:
        raise InputError(path, f"the graph is a {graph_arch} but {META_FILE} declares arch {meta.arch!r}")



@dataclasses.dataclass
class HeldOut:
    logits: np.ndarray
    features: np.ndarray
    targets: np.ndarray


def save_held_out(directory: str | Path, logits: np.ndarray, features: np.ndarray, targets: np.ndarray) -> Path:
    """Write :data:`HELD_OUT_FILE` into a bundle folder."""
    path = Path(directory) / HELD_OUT_FILE
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, logits=np.asarray(logits, np.float32), features=np.asarray(features, np.float16),
                                targets=np.asarray(targets))
    record_file(directory, HELD_OUT_FILE)
    return path


def load_held_out(directory: str | Path, meta: BundleMeta) -> HeldOut | None:
    """The bundle's held-out reference, or ``None`` when it has none (older bundles, CV ensembles);
    a damaged or mismatched file is a one-line error."""
    path = Path(directory) / HELD_OUT_FILE
    if not path.is_file():
        return None
    verify_file(directory, meta, HELD_OUT_FILE)
    try:
        with np.load(path, allow_pickle=False) as data:
            held = HeldOut(data["logits"].astype(np.float64), data["features"].astype(np.float64),
                           data["targets"].astype(np.int64))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(path, f"damaged held-out reference ({type(err).__name__})") from None
    n = len(held.targets)
    if held.logits.shape != (n, len(meta.classes)) or held.features.ndim != 2 or len(held.features) != n \
            or (n and not 0 <= held.targets.min() <= held.targets.max() < len(meta.classes)):
        raise InputError(path, f"held-out reference does not match the bundle's {len(meta.classes)} classes")
    return held
