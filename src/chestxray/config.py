"""Training configuration: defaults, YAML files and command-line overrides (flags win)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .decode import CONTRASTS, FIT_MODES, Preprocessing
from .errors import ChestXrayError
from .storage import write_text

_CHOICES = {
    "optimizer": ("adamw", "adam", "rmsprop", "sgd"),
    "schedule": ("cosine", "plateau", "none"),
    "balance": ("none", "weights", "sampler"),
    "fit_mode": FIT_MODES,
    "contrast": CONTRASTS,
    "weights": None,  # "imagenet", "none" or a path: checked by models.create_model
}


OPTION_HELP = {
    "arch": "timm architecture name",
    "weights": "imagenet, none, or a .safetensors / state-dict file",
    "image_size": "side of the square input, in pixels",
    "resize_start": "progressive resizing: the first epoch trains at this share of --image-size, growing "
                    "linearly to the full size by the last epoch (1 = always full size)",
    "fit_mode": "pad (whole image, black borders) or crop (centre square)",
    "contrast": "none or clahe (adaptive histogram equalisation before resizing)",
    "epochs": "most training epochs (early stopping may end sooner)",
    "batch_size": "images per step",
    "optimizer": "adamw, adam, rmsprop or sgd (with momentum)",
    "lr": "learning rate of the head",
    "backbone_lr_ratio": "backbone learning rate as a share of --lr",
    "weight_decay": "weight decay",
    "momentum": "momentum of sgd and rmsprop",
    "schedule": "cosine, plateau (ReduceLROnPlateau) or none",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "freeze_epochs": "first epochs that train the head on a frozen backbone",
    "label_smoothing": "label smoothing of the cross-entropy",
    "balance": "none, weights (class-weighted loss) or sampler (balanced batches)",
    "augment": "strength of rotation/scale/shift/brightness/contrast augmentation (0 = off)",
    "mixup": "alpha of mixup's Beta(alpha, alpha) blend of image pairs (0 = off)",
    "ema": "decay per step of an exponential moving average of the weights (0 = off)",
    "hflip": "also flip horizontally (off: the heart is on the left)",
    "drop_rate": "dropout before the classifier",
    "val_fraction": "share of the training images held out for validation (patient-grouped)",
    "patience": "epochs without a better validation loss before stopping",
    "seed": "random seed: the same seed repeats a run",
    "channels_last": "channels-last memory layout (faster on CPUs)",
    "precision": "auto (16-mixed on GPU, 32-true on CPU) or any Lightning precision",
    "devices": "auto, a count, or a list of GPUs",
    "num_nodes": "machines of a distributed run",
    "strategy": "Lightning strategy (auto, ddp, ...)",
    "num_workers": "data-loader worker processes",
}
"""One line per :class:`TrainConfig` field, for ``--help``."""


@dataclass
class TrainConfig:
    """Everything that defines a training run. Saved as ``config.yaml`` in the run directory."""

    arch: str = "tf_efficientnet_lite0"
    weights: str = "imagenet"
    image_size: int = 320
    resize_start: float = 1.0
    fit_mode: str = "pad"
    contrast: str = "none"
    epochs: int = 15
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    backbone_lr_ratio: float = 0.3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: int = 1
    freeze_epochs: int = 1
    label_smoothing: float = 0.1
    balance: str = "weights"
    augment: float = 1.0
    mixup: float = 0.2
    ema: float = 0.0
    hflip: bool = False
    drop_rate: float = 0.2
    val_fraction: float = 0.2
    patience: int = 5
    seed: int = 0
    channels_last: bool = True
    precision: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if allowed and value not in allowed:
                raise ChestXrayError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        for name in ("image_size", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ChestXrayError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.lr <= 0:
            raise ChestXrayError(f"lr must be positive, not {self.lr}")
        for name in ("augment", "mixup", "label_smoothing"):
            if getattr(self, name) < 0:
                raise ChestXrayError(f"{name} must be 0 or more, not {getattr(self, name)}")
        if not 0 < self.resize_start <= 1:
            raise ChestXrayError(f"resize_start must be above 0 and at most 1 (a share of image_size), "
                                 f"not {self.resize_start}")
        if not 0 <= self.ema < 1:
            raise ChestXrayError(f"ema must be at least 0 and below 1 (a decay per step; 0 = off), not {self.ema}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for YAML and checkpoints."""
        return asdict(self)

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

    def replace(self, **overrides: Any) -> "TrainConfig":
        """A copy with the non-``None`` ``overrides`` applied (validated)."""
        return make_config({**self.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Build a config from a dict, naming any unknown key."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ChestXrayError(f"unknown config key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return TrainConfig(**values)


def overrides_from_args(args: list[str]) -> dict[str, Any]:
    """Parse command-line flags named after config keys: ``--image-size 224 --hflip --no-hflip``."""
    defaults = TrainConfig().to_dict()
    overrides: dict[str, Any] = {}
    position = 0
    while position < len(args):
        flag, _, inline = args[position].partition("=")
        key = flag[2:].replace("-", "_") if flag.startswith("--") else ""
        negated = key.startswith("no_") and isinstance(defaults.get(key[3:]), bool)
        if negated or isinstance(defaults.get(key), bool):
            overrides[key[3:] if negated else key] = not negated
            position += 1
            continue
        if key not in defaults:
            raise ChestXrayError(f"unknown option {args[position]!r}; training options: "
                                 + ", ".join("--" + k.replace("_", "-") for k in defaults))
        if not inline:
            if position + 1 >= len(args):
                raise ChestXrayError(f"option {flag} needs a value")
            inline = args[position + 1]
            position += 1
        try:
            overrides[key] = type(defaults[key])(inline)
        except ValueError:
            raise ChestXrayError(f"option {flag}: {inline!r} is not a valid {type(defaults[key]).__name__}") from None
        position += 1
    return overrides


def options_help() -> str:
    """The training flags with their defaults and meaning, for ``--help``."""
    lines = [f"--{key.replace('_', '-')} {value}: {OPTION_HELP[key]}" for key, value in TrainConfig().to_dict().items()]
    return "\n\n".join(["Training options, with their defaults (flags win over --config):", *lines])


def load_config(path: str | Path | None, **overrides: Any) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (if any), then non-``None`` ``overrides``."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise ChestXrayError(f"{path}: cannot read config ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise ChestXrayError(f"{path}: malformed YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ChestXrayError(f"{path}: a config file must be a mapping of keys to values")
        values = loaded.get("train", loaded)  # sweep results nest the config under "train"
    return make_config(values).replace(**overrides)


def save_config(config: TrainConfig, path: str | Path) -> Path:
    """Write ``config`` as YAML (atomically: a failure leaves no empty or partial file)."""
    return write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
