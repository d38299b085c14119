"""Configuration: every option declared once, with its type, default, constraint, help and group.

Two objects, both plain dataclasses whose fields are declared with :func:`option`:

- :class:`TrainConfig`: what defines a model (architecture, images, optimisation, regularisation,
  split, seed). Saved as the run's ``config.yaml`` and in its bundle; searched by sweeps.
- :class:`RuntimeSettings`: how a run uses the machine (devices, nodes, strategy, precision, data
  workers, memory layout). Never saved in a bundle nor searched by a sweep: the same config
  trains the same model on a laptop or a cluster.

:func:`validate` checks any such object against its declarations (scikit-learn's
parameter-constraint style: an :class:`Interval` or :class:`Choices` per option) and names the
option, the allowed values and the value refused. The command line builds its training options
from the same declarations (``chestxray train --help``). Files written before the split (with
hardware keys in their config) still load: :func:`load_config` leaves those keys to
:func:`load_runtime`.
"""

from __future__ import annotations

import numbers
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..constants import DEFAULT_IMAGE_SIZE
from ..data.decode import CONTRASTS, FIT_MODES, Preprocessing
from ..data.vocabulary import FORMATS, RATER_POLICIES, UNCERTAIN_POLICIES, VIEWS
from ..errors import ChestXrayError
from ..storage import write_text

__all__ = ["Interval", "Choices", "option", "validate", "declared_options", "TrainConfig", "RuntimeSettings",
           "make_config", "load_config", "load_runtime", "save_config"]


@dataclass(frozen=True)
class Interval:
    """Numbers between ``low`` and ``high`` (``None``: unbounded); ``closed`` says which ends belong:
    ``"both"``, ``"left"``, ``"right"`` or ``"neither"``."""

    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            return False
        above = self.low is None or value > self.low or (value == self.low and self.closed in ("both", "left"))
        below = self.high is None or value < self.high or (value == self.high and self.closed in ("both", "right"))
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'at least' if self.closed in ('both', 'left') else 'above'} {self.low}"
        if self.low is None:
            return f"{'at most' if self.closed in ('both', 'right') else 'below'} {self.high}"
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        return f"in {left}{self.low}, {self.high}{right}"


@dataclass(frozen=True)
class Choices:
    """One of ``values``."""

    values: tuple[Any, ...]

    def __contains__(self, value: object) -> bool:
        return value in self.values

    def __str__(self) -> str:
        return "one of " + ", ".join(map(str, self.values))


def option(default: Any, help: str, *, group: str, check: Interval | Choices | None = None) -> Any:
    """Declare a configuration field: its ``default`` (whose type is the option's type), one line of
    ``help``, the ``--help`` panel (``group``) it is shown in and the constraint it must meet."""
    return field(default=default, metadata={"help": help, "group": group, "check": check})


def declared_options(cls: type) -> list[tuple[str, Any, dict[str, Any]]]:
    """``(name, default, metadata)`` of every option of a configuration class, in declaration order."""
    return [(f.name, f.default, dict(f.metadata)) for f in fields(cls) if f.default is not MISSING]


def validate(settings: Any) -> None:
    """Check every option of ``settings`` against its declaration and convert it to the declared type
    (the type of its default: an int is a valid float, a number written as text as in YAML's
    ``1e-4`` is read as one); raise a one-line :class:`ChestXrayError` naming the option, what it
    must be and the value refused."""
    for name, default, meta in declared_options(type(settings)):
        value = _as_declared(getattr(settings, name), type(default), name)
        object.__setattr__(settings, name, value)
        check = meta["check"]
        if check is not None and value not in check:
            raise ChestXrayError(f"{name} must be {check}, not {value!r}")


def _as_declared(value: Any, kind: type, name: str) -> Any:
    if isinstance(value, bool) != (kind is bool):
        raise ChestXrayError(f"{name} must be a {kind.__name__}, not {value!r}")
    if isinstance(value, kind):
        return value
    try:
        if kind is float and isinstance(value, (numbers.Real, str)):
            return float(value)
        if kind is int and isinstance(value, str):
            return int(value)
        if kind is str and isinstance(value, numbers.Integral):
            return str(value)
    except ValueError:
        pass
    raise ChestXrayError(f"{name} must be a {kind.__name__}, not {value!r}")


@dataclass
class TrainConfig:
    """Everything that defines a training run. Saved as ``config.yaml`` in the run directory."""

    data_format: str = option("auto", "how DATA is read: auto (detected from its files and columns), folder, manifest, "
                                      "medmnist, or a public data set: nih, chexpert, mimic, padchest, rsna, vindr",
                              group="Data", check=Choices(FORMATS))
    uncertain: str = option("ones", "CheXpert and MIMIC-CXR findings marked uncertain (-1): ones (present), zeros "
                                    "(absent) or ignore (the image is left out)", group="Data",
                            check=Choices(UNCERTAIN_POLICIES))
    views: str = option("frontal", "public data sets' views kept: frontal (PA or AP), pa, ap, lateral or all",
                        group="Data", check=Choices(VIEWS))
    raters: str = option("majority", "VinDr-CXR: a finding counts when a majority of the image's radiologists marked "
                                     "it, or any of them", group="Data", check=Choices(RATER_POLICIES))
    arch: str = option("tf_efficientnet_lite0", "timm architecture name", group="Model")
    weights: str = option("imagenet", "imagenet, none, a .safetensors / state-dict file, or txrv:NAME (torchxrayvision's "
                                      "chest X-ray weights, e.g. txrv:densenet121-res224-all with --arch densenet121)",
                          group="Model")
    init: str = option("", "warm start from this bundle folder: its architecture, image size, fit mode, contrast and "
                           "weights (the classifier too when the classes are the bundle's)", group="Model")
    image_size: int = option(DEFAULT_IMAGE_SIZE, "side of the square input, in pixels", group="Images", check=Interval(1))
    resize_start: float = option(
        1.0, "progressive resizing: the first epoch trains at this share of --image-size, growing linearly to the "
             "full size by the last epoch (1 = always full size)", group="Images", check=Interval(0, 1, "right"))
    fit_mode: str = option("pad", "pad (whole image, black borders) or crop (centre square)", group="Images",
                           check=Choices(FIT_MODES))
    contrast: str = option("none", "none or clahe (adaptive histogram equalisation before resizing)",
                           group="Images", check=Choices(CONTRASTS))
    epochs: int = option(13, "most training epochs (early stopping may end sooner)", group="Optimisation",
                         check=Interval(1))
    batch_size: int = option(32, "images per step", group="Optimisation", check=Interval(1))
    optimizer: str = option("adamw", "adamw, adam, rmsprop or sgd (with momentum)", group="Optimisation",
                            check=Choices(("adamw", "adam", "rmsprop", "sgd")))
    lr: float = option(1e-3, "learning rate of the head", group="Optimisation", check=Interval(0, None, "neither"))
    backbone_lr_ratio: float = option(0.3, "backbone learning rate as a share of --lr", group="Optimisation",
                                      check=Interval(0))
    weight_decay: float = option(1e-4, "weight decay", group="Optimisation", check=Interval(0))
    momentum: float = option(0.9, "momentum of sgd and rmsprop", group="Optimisation", check=Interval(0, 1))
    schedule: str = option("cosine", "cosine, plateau (ReduceLROnPlateau) or none", group="Optimisation",
                           check=Choices(("cosine", "plateau", "none")))
    warmup_epochs: int = option(1, "epochs of linear learning-rate warm-up", group="Optimisation", check=Interval(0))
    freeze_epochs: int = option(1, "first epochs that train the head on a frozen backbone", group="Optimisation",
                                check=Interval(0))
    frozen_stride: int = option(
        8, "backbone stages down-sampling up to this factor (2, 4, 8, 16) stay frozen for the whole run, so their "
           "backward pass, the costliest at full resolution, is skipped (0 = fine-tune every stage)",
        group="Optimisation", check=Choices((0, 2, 4, 8, 16)))
    batch_norm: str = option(
        "auto", "the backbone's batch-norm statistics: 'frozen' keeps the pretrained ones for the whole run (their "
                "scale and shift still learn), 'train' re-estimates them from the training batches after the frozen "
                "epochs; 'auto' is 'frozen' for pretrained or warm-started weights and 'train' for --weights none",
        group="Optimisation", check=Choices(("auto", "frozen", "train")))
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy", group="Regularisation",
                                    check=Interval(0, 1, "left"))
    balance: str = option("weights", "none, weights (class-weighted loss) or sampler (balanced batches)",
                          group="Regularisation", check=Choices(("none", "weights", "sampler")))
    augment: float = option(1.0, "strength of rotation/scale/shift/brightness/contrast augmentation (0 = off)",
                            group="Regularisation", check=Interval(0))
    photometric: float = option(0.0, "strength of gamma/blur/noise augmentation, how a scanner and an export change "
                                     "an image (0 = off)", group="Regularisation", check=Interval(0))
    mixup: float = option(0.2, "alpha of mixup's Beta(alpha, alpha) blend of image pairs (0 = off)",
                          group="Regularisation", check=Interval(0))
    ema: float = option(0.0, "decay per step of an exponential moving average of the weights (0 = off)",
                        group="Regularisation", check=Interval(0, 1, "left"))
    hflip: bool = option(False, "also flip horizontally (off: the heart is on the left)", group="Regularisation")
    drop_rate: float = option(0.2, "dropout before the classifier", group="Model", check=Interval(0, 1, "left"))
    val_fraction: float = option(0.2, "share of the training images held out for validation (patient-grouped)",
                                 group="Split and seed", check=Interval(0, 1, "left"))
    patience: int = option(5, "epochs without a better validation loss before stopping", group="Optimisation",
                           check=Interval(0))
    seed: int = option(0, "random seed: the same seed repeats a run", group="Split and seed")

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for YAML and checkpoints."""
        return asdict(self)

    def source_options(self) -> dict[str, str]:
        """How DATA is read: :func:`~chestxray.data.sources.load_samples`'s keyword arguments."""
        return {"format": self.data_format, "uncertain": self.uncertain, "views": self.views, "raters": self.raters}

    def preprocessing(self) -> Preprocessing:
        """The image options a bundle must repeat at prediction time."""
        return Preprocessing(self.image_size, self.fit_mode, self.contrast)

    def train_size(self, epoch: int) -> int:
        """Side of the training images at ``epoch`` (0-based): ``image_size`` unless resizing progressively.

        Grows linearly from ``resize_start * image_size`` at the first epoch to ``image_size`` at the
        last, in steps of 32 pixels (the backbones' stride), never above ``image_size``.
        """
        if self.resize_start >= 1 or self.epochs < 2:
            return self.image_size
        start = self.resize_start * self.image_size
        side = start + (self.image_size - start) * min(epoch, self.epochs - 1) / (self.epochs - 1)
        return min(self.image_size, max(32, 32 * round(side / 32)))

    def replace(self, **overrides: Any) -> TrainConfig:
        """A copy with the non-``None`` ``overrides`` applied (validated)."""
        return make_config({**self.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class RuntimeSettings:
    """How a run uses the machine; changes speed, not the model (not saved in bundles, not searched)."""

    devices: str = option("auto", "auto, a count, or a list of GPUs", group="Hardware")
    num_nodes: int = option(1, "machines of a distributed run", group="Hardware", check=Interval(1))
    strategy: str = option("auto", "Lightning strategy (auto, ddp, ...)", group="Hardware")
    precision: str = option("auto", "auto (16-mixed on GPU, 32-true on CPU) or any Lightning precision",
                            group="Hardware")
    num_workers: int = option(0, "data-loader worker processes", group="Hardware", check=Interval(0))
    channels_last: bool = option(True, "channels-last memory layout (faster on CPUs)", group="Hardware")
    logger: str = option("csv", "Lightning logger of every logged value and every parameter group's learning "
                                "rate, in the run's logs/ folder (tensorboard and mlflow need their package)",
                         group="Hardware", check=Choices(("csv", "tensorboard", "mlflow", "none")))

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **overrides: Any) -> RuntimeSettings:
        """A copy with the non-``None`` ``overrides`` applied (validated)."""
        return RuntimeSettings(**{**asdict(self), **{k: v for k, v in overrides.items() if v is not None}})


TRAIN_KEYS = frozenset(f.name for f in fields(TrainConfig))
RUNTIME_KEYS = frozenset(f.name for f in fields(RuntimeSettings))


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Build a config from a dict, naming any unknown key (hardware keys of older files are ignored:
    :func:`load_runtime` reads them)."""
    unknown = sorted(set(values) - TRAIN_KEYS - RUNTIME_KEYS)
    if unknown:
        raise ChestXrayError(f"unknown config key(s): {', '.join(unknown)} (known: {', '.join(sorted(TRAIN_KEYS))})")
    return TrainConfig(**{key: value for key, value in values.items() if key in TRAIN_KEYS})


def _read_values(path: str | Path | None) -> dict[str, Any]:
    """The config mapping of a YAML file (a sweep's ``best.yaml`` nests it under ``train:``)."""
    if path is None:
        return {}
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ChestXrayError(f"{path}: cannot read config ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ChestXrayError(f"{path}: malformed YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ChestXrayError(f"{path}: a config file must be a mapping of keys to values")
    values = loaded.get("train", loaded)
    if not isinstance(values, dict):
        raise ChestXrayError(f"{path}: train: must be a mapping of keys to values")
    return values


def load_config(path: str | Path | None, **overrides: Any) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (if any), then non-``None`` ``overrides``."""
    return make_config(_read_values(path)).replace(**overrides)


def load_runtime(path: str | Path | None = None, **overrides: Any) -> RuntimeSettings:
    """Defaults, then the hardware keys of an (older) YAML config at ``path``, then non-``None`` ``overrides``."""
    values = {key: value for key, value in _read_values(path).items() if key in RUNTIME_KEYS}
    return RuntimeSettings(**values).replace(**overrides)


def save_config(config: TrainConfig, path: str | Path, comments: dict[str, str] | None = None) -> Path:
    """Write ``config`` as YAML (atomically: a failure leaves no empty or partial file); ``comments``
    (``{key: text}``) end the lines of those keys as ``# text``, which loading ignores."""
    lines = yaml.safe_dump(config.to_dict(), sort_keys=False).splitlines()
    for key, text in (comments or {}).items():
        lines = [f"{line}  # {' '.join(text.split())}" if line.startswith(f"{key}: ") else line for line in lines]
    return write_text(path, "\n".join(lines) + "\n")
