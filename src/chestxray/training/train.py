"""Training on Lightning: fine-tune a pretrained backbone on cached images and write a run directory.

The steps, each public, that :func:`fit` composes (and cross-validation and sweeps reuse in memory):
:func:`prepare_data` (samples, cache, train/validation split) -> :func:`train_model` (the model at
its best epoch and the per-epoch history) -> :func:`calibrate_on_validation` (temperature, operating
points, OOD guard: :mod:`chestxray.calibration`) -> :func:`bundle_meta` and ``bundle.save_bundle``.

``runs/<name>/`` holds ``config.yaml``, ``split.csv``, ``environment.json``, ``metrics.csv`` (one row
per epoch), ``checkpoints/`` (best and last, for ``--resume``), ``curves.png`` and the model ``bundle/``;
after :func:`find_lr` (``train --lr auto``) also ``lr_find.json`` and ``lr_find.png``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import hashlib
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import lightning.pytorch as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import (Callback, EarlyStopping, EMAWeightAveraging, LearningRateMonitor,
                                         ModelCheckpoint)
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.tuner import lr_finder as lightning_lr_finder
from torch.utils.data import DataLoader

from ..console import make_console
from ..allocator import active_allocator, system_allocator_note
from ..model.bundle import BundleMeta, load_bundle, read_meta, save_bundle, save_held_out
from ..data.cache import ImageCache, build_cache
from ..trust.calibration import Calibration, calibrate
from .config import RuntimeSettings, TrainConfig, load_config, save_config
from ..data.dataset import (CachedDataset, EpochSampler, augment_batch, epoch_seed, mix_batch, photometric_batch,
                            to_model_input)
from ..data.decode import content_hash
from ..errors import ChestXrayError, InputError
from ..data.audit import source_confound
from ..trust.lineage import lineage_record, seen_images_record
from ..launch import gather_in_order, is_first_process, trainer_layout, world_size
from ..stats.metrics import logit_scores
from ..model.models import TXRV_PREFIX, ChestXrayNet, create_model, load_state_strict, txrv_input_size, weights_source
from ..inference.report import plot_lr_find, plot_training_curves
from ..model.runners import DEFAULT_BATCH
from ..data.sources import Samples, load_samples
from ..data.vocabulary import PUBLIC_FORMATS, SourceOptions, label_mapping
from ..data.splits import load_split, save_split, split_files, train_val_split
from ..storage import atomic_path, make_folder, temporary_name, write_error, write_text

__all__ = ["fit", "train_model", "prepare_data", "run_directory", "calibrate_on_validation", "bundle_meta", "model_meta",
           "drop_test_copies",
           "warm_start_config", "pretrained_config", "initial_model", "build_module", "make_loaders", "training_inputs",
           "find_lr", "smoothed_losses", "suggest_lr",
           "PreparedData", "RunResult", "ClassifierModule", "LRSearch", "LRFinding", "MONITOR"]

if TYPE_CHECKING:
    from ..deploy.export import ExportResult

RUN_ENTRIES = frozenset({"config.yaml", "split.csv", "environment.json", "metrics.csv", "curves.png", "checkpoints",
                         "bundle", "logs", "cv.csv", "cv.json", "oof.csv", "trials", "trials.csv", "best.yaml",
                         "lr_find.json", "lr_find.png"})
"""What training, cross-validation and sweeps write into a run folder (and ``fold<i>/`` folders)."""
_FOLD = re.compile(r"fold\d+")

MONITOR = "val_loss"
"""The validation figure (minimised) that picks the best epoch, stops training early and prunes sweep trials."""

console = make_console(stderr=True)
for _logger in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_logger).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*(LeafSpec|litlogger|does not have many workers|sync_dist=True).*")


@dataclass
class PreparedData:
    """The training pool (every sample not marked ``test``), its cache and its split."""

    samples: Samples
    cache: ImageCache
    targets: np.ndarray
    train_rows: np.ndarray
    val_rows: np.ndarray


@dataclass
class RunResult:
    """What a finished training run produced."""

    run_dir: Path
    bundle_dir: Path
    metrics: dict[str, Any]
    history: pd.DataFrame
    calibration: Calibration | None = None
    onnx: ExportResult | None = None
    """The ONNX export and its parity check (``None``: ``fit(onnx=False)``, or not the first process)."""
    lr_finding: LRFinding | None = None
    """The learning-rate finder's search whose suggestion the run trained at (``fit(lr_search=...)``)."""


def prepare_data(data: str | Path | Samples, config: TrainConfig, *, cache_dir: str | Path | None = None,
                 split_file: str | Path | None = None, progress: bool = True) -> PreparedData:
    """Load the samples, drop the test split, build the cache and split train/validation."""
    samples = data if isinstance(data, Samples) else load_samples(data, **config.source_options())
    pool = samples.subset(samples.frame["split"] != "test")
    if not len(pool):
        raise ChestXrayError(f"{samples.origin}: every image is in the test split; nothing to train on")
    pool = drop_test_copies(pool, samples.split("test"))
    _refuse_conflicting_paths(pool)
    cache = build_cache(pool, config.preprocessing(), cache_dir=cache_dir, progress=progress)
    if not cache.ok.any():
        row, reason = next(iter(cache.failed.items()))
        raise ChestXrayError(f"{samples.origin}: none of the {len(pool)} training images could be read "
                             f"(e.g. {pool.frame['path'].iloc[row]}: {reason})")
    if cache.failed:
        console.print(f"[yellow]skipped {len(cache.failed)} unreadable image(s)[/], e.g. "
                      f"{pool.frame['path'].iloc[next(iter(cache.failed))]}: {next(iter(cache.failed.values()))}")
    usable = pool.subset(cache.ok)
    cache = ImageCache(np.asarray(cache.images)[cache.ok] if cache.failed else cache.images, {},
                       cache.preprocessing, cache.fingerprint, cache.path)
    _refuse_single_class(usable)
    _refuse_conflicting_pixels(usable, cache.images)
    if split_file is not None and Path(split_file).is_file():
        assignment = load_split(split_file, usable)
        train_rows, val_rows = assignment["train"], assignment["val"]
    else:
        train_rows, val_rows = train_val_split(usable, config.val_fraction, config.seed)
    return PreparedData(usable, cache, usable.targets(), train_rows, val_rows)


def _refuse_conflicting_paths(pool: Samples) -> None:
    """One file listed under two labels (a manifest row twice) makes the labels contradict each other."""
    labels = pool.frame.groupby("path")["label"].nunique()
    conflicting = labels[labels > 1]
    if len(conflicting):
        path = conflicting.index[0]
        names = sorted(pool.frame.loc[pool.frame["path"] == path, "label"].unique())
        raise ChestXrayError(f"{pool.origin}: {len(conflicting)} file(s) listed under more than one label, e.g. "
                             f"{path} as {' and '.join(map(repr, names))}: keep one label per file "
                             f"(multi-label data: one row with labels joined by '|')")


def _refuse_single_class(usable: Samples) -> None:
    """A classifier needs at least two classes among the images it can read."""
    if usable.task != "multiclass":
        return
    present = usable.frame["label"].unique()
    if len(present) < 2:
        raise ChestXrayError(f"{usable.origin}: the readable training images are all of one class "
                             f"({present[0]!r}, {len(usable)} images): a classifier needs at least two classes")


def _refuse_conflicting_pixels(usable: Samples, images: np.ndarray) -> None:
    """The same image (identical preprocessed pixels) under two different labels: copies of one file in two
    class folders, or the same file under two names."""
    targets = usable.targets()
    seen: dict[bytes, int] = {}
    for row in range(len(images)):
        digest = hashlib.blake2b(np.ascontiguousarray(images[row]).data, digest_size=16).digest()
        first = seen.setdefault(digest, row)
        if first != row and not np.array_equal(targets[first], targets[row]):
            paths, labels = usable.frame["path"], usable.frame["label"]
            raise ChestXrayError(f"{usable.origin}: the same image is labelled {labels.iloc[first]!r} as "
                                 f"{paths.iloc[first]} and {labels.iloc[row]!r} as {paths.iloc[row]}: "
                                 f"remove one copy or fix its label")


def drop_test_copies(pool: Samples, test: Samples) -> Samples:
    """``pool`` without the images whose bytes equal a test image (leakage guard).

    The course dataset's ten COVID-19 test images are byte-for-byte copies of training images;
    training on them would inflate every test figure.
    """
    if not len(test):
        return pool
    test_hashes = {_safe_hash(p) for p in test.frame["path"]} - {""}
    copies = np.array([_safe_hash(p) in test_hashes for p in pool.frame["path"]], dtype=bool)
    if copies.any():
        console.print(f"left out {int(copies.sum())} training image(s) identical to test images "
                      f"(e.g. {pool.frame['path'].iloc[int(np.argmax(copies))]})", soft_wrap=True)
    return pool.subset(pd.Series(~copies))


def _safe_hash(path: str) -> str:
    try:
        return content_hash(path)
    except OSError:
        return ""  # unreadable files are reported by the cache


class ClassifierModule(L.LightningModule):
    """Loss, augmentation, optimiser groups and schedule around a :class:`ChestXrayNet`."""

    def __init__(self, model: ChestXrayNet, config: TrainConfig, class_weights: torch.Tensor | None = None,
                 channels_last: bool = True) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.channels_last = channels_last
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(0))
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.finder_losses: list[float] | None = None
        """Set to a list by :func:`find_lr`: each step's training loss is appended, and before each step the
        backbone's rate is reset to ``backbone_lr_ratio`` times the head's (Lightning's finder sweeps every
        parameter group at one rate)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _inputs(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = training_inputs(images, self.config, self.current_epoch, train)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
        weights = self.class_weights if self.class_weights.numel() else None
        if self.model.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, targets.float(), pos_weight=weights)
        return F.cross_entropy(logits, targets, weight=weights, label_smoothing=smoothing)

    def on_train_batch_start(self, batch: Any, batch_index: int) -> None:
        if self.finder_losses is not None:  # the finder sets every group to its rate: the backbone keeps its share
            head, *backbone = self.trainer.optimizers[0].param_groups
            for group in backbone:
                group["lr"] = head["lr"] * self.config.backbone_lr_ratio

    def on_train_epoch_start(self) -> None:
        # every epoch's augmentation, mixup and dropout draws follow from (seed, epoch) alone: a resumed run
        # repeats an uninterrupted one, whatever the loader's workers drew from the global generator
        torch.manual_seed(epoch_seed(self.config.seed, self.current_epoch))
        frozen = self.current_epoch < self.config.freeze_epochs
        self.model.freeze_backbone(frozen)
        self.model.freeze_to_stride(self.config.frozen_stride)
        keep_statistics = frozen or batch_norm_frozen(self.config)
        for module in self.model.backbone.modules():  # set every epoch: Lightning restores the modes of
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):  # the epoch before after validation
                module.train(not keep_statistics)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        images, targets = batch
        inputs, order, lam = mix_batch(self._inputs(images, train=True), self.config.mixup)
        logits, smoothing = self.model(inputs), self.config.label_smoothing
        loss = self._loss(logits, targets, smoothing)
        if lam < 1:
            loss = lam * loss + (1 - lam) * self._loss(logits, targets[order], smoothing)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(images), sync_dist=True)
        if self.finder_losses is not None:
            self.finder_losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> None:
        images, targets = batch
        self._val_outputs.append((self.model(self._inputs(images, train=False)).float(), targets))

    def on_validation_epoch_end(self) -> None:
        logits = torch.cat([o[0] for o in self._val_outputs])
        targets = torch.cat([o[1] for o in self._val_outputs])
        self._val_outputs.clear()
        if self.trainer.world_size > 1:  # every rank scores the whole validation set, each image once
            total = len(self.trainer.val_dataloaders.dataset)
            logits, targets = gather_in_order(logits, total), gather_in_order(targets, total)
        for name, value in validation_metrics(logits, targets, self.model.task).items():
            self.log(name, value, sync_dist=False, rank_zero_only=False)

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.config
        groups = [{"params": list(self.model.head_parameters()), "lr": config.lr},
                  {"params": list(self.model.backbone_parameters()), "lr": config.lr * config.backbone_lr_ratio}]
        optimizer = _make_optimizer(groups, config)
        if config.schedule == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.2, patience=2)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": MONITOR}}
        if config.schedule == "none":
            return {"optimizer": optimizer}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(total - 1, config.warmup_epochs * max(1, total // config.epochs))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def training_inputs(images: torch.Tensor, config: TrainConfig, epoch: int, train: bool) -> torch.Tensor:
    """What the model is fed for a uint8 batch (B, 1, S, S): float in [0, 1]; for training also the
    progressive resizing of ``epoch`` (0-based), then :func:`augment_batch` and :func:`photometric_batch`
    (drawn from torch's global generator). Mixup blends the result afterwards, in the training step."""
    x = to_model_input(images)
    if train:
        side = config.train_size(epoch)
        if side < x.shape[-1]:  # progressive resizing: smaller images in the early epochs
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        x = augment_batch(x, config.augment, config.hflip)
        x = photometric_batch(x, config.photometric)
    return x


def batch_norm_frozen(config: TrainConfig) -> bool:
    """Whether the backbone's batch-norm layers keep their starting statistics for the whole run
    (``config.batch_norm``; ``auto``: when the weights start pretrained or warm-started).

    Chosen on purpose: Lightning restores each module's train/eval mode after validation, so the eval
    mode set for the frozen first epoch used to stick for the whole run, while a resumed run trained the
    statistics; at the new site the frozen statistics generalised better (docs/results.md)."""
    if config.batch_norm == "auto":
        return config.weights != "none" or bool(config.init)
    return config.batch_norm == "frozen"


def validation_metrics(logits: torch.Tensor, targets: torch.Tensor, task: str) -> dict[str, float]:
    """The per-epoch validation figures under the names Lightning logs (``val_loss``, ``val_acc``, ``val_auc``)."""
    scores = logit_scores(logits.cpu(), targets.cpu(), task)
    return {MONITOR: scores.loss, "val_acc": scores.accuracy, "val_auc": scores.macro_auc}


def _make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, weight_decay=config.weight_decay, momentum=config.momentum)
    return torch.optim.SGD(groups, weight_decay=config.weight_decay, momentum=config.momentum, nesterov=True)


def check_checkpoint(path: Path, module: L.LightningModule) -> None:
    """Refuse, in one line, a checkpoint that cannot be resumed from: unreadable, damaged, holding
    anything but tensors and plain values (never unpickled: ``weights_only``), or of another model."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types on a damaged or hostile file
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(path, f"cannot resume from this checkpoint ({type(err).__name__}: {first[:200]})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict) \
            or "epoch" not in checkpoint:
        raise InputError(path, "not a training checkpoint (no state_dict or epoch)")
    load_state_strict(module, checkpoint["state_dict"], path)


class RandomState(Callback):
    """Puts the random generators' states (torch, NumPy, Python) in every checkpoint and restores them
    on resume, so a resumed run draws the same shuffles, augmentations and dropout as an uninterrupted
    one. Stored as tensors and lists: checkpoints stay loadable with ``weights_only``."""

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state()
        python_state = random.getstate()
        return {"torch": torch.get_rng_state(),
                "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
                "python": [python_state[0], list(python_state[1]), python_state[2]],
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary name and renamed: a crash or a full disk while saving
    keeps the previous ``last.ckpt`` whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        tmp = temporary_name(path)
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        except OSError as err:  # fit() turns it into one line that says how to resume
            err.filename = str(path)
            raise
        finally:
            tmp.unlink(missing_ok=True)


class TrainingProgress(Callback):
    """The one progress display of a training run (rank 0, on the console's stderr): ``epoch 2/5`` as the
    epoch summaries number it, the batches done, images per second measured since the epoch started,
    and the time left; the summaries print above it, and it is removed when training ends."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._task: Any = None
        self._images = 0
        self._start = time.perf_counter()

    def _show(self, trainer: L.Trainer, phase: str, total: float) -> None:
        if self._bar is None:
            return
        self._images, self._start = 0, time.perf_counter()
        self._bar.update(self._task, description=f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {phase}",
                         total=total, completed=0, rate="")
        self._bar.refresh()  # each phase is shown, however short

    def _advance(self, batch: Any) -> None:
        if self._bar is None:
            return
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._images += len(images)
        elapsed = time.perf_counter() - self._start
        self._bar.update(self._task, advance=1, rate=f"{self._images / elapsed:.1f} img/s" if elapsed > 0 else "")
        self._bar.refresh()

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console,
                                 transient=True)
            self._bar.start()
            self._task = self._bar.add_task("", total=None, rate="")

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._show(trainer, "training", trainer.num_training_batches)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._advance(batch)

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._show(trainer, "validating", sum(trainer.num_val_batches))

    def on_validation_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._advance(batch)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        """Remove the display (nothing stale is left on the terminal)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class EpochLog(Callback):
    """One line per epoch on the console and one row of :meth:`history` (also ``metrics.csv`` when given a path)."""

    def __init__(self, path: Path | None, config: TrainConfig) -> None:
        self.path = path
        self.config = config
        self.rows: list[dict[str, float]] = pd.read_csv(path).to_dict("records") if path and path.is_file() else []
        self._start = time.perf_counter()

    def history(self) -> pd.DataFrame:
        """The epochs logged so far, one row each."""
        return pd.DataFrame(self.rows)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # the rates this step trains at: read after the epoch, a per-step schedule has already moved on
        # (after the last step of a cosine schedule, to 0)
        self._lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero or MONITOR not in trainer.callback_metrics:
            return
        logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
        epoch = trainer.current_epoch + 1
        lrs = self._lrs  # the head's, then the backbone's: those of the epoch's last step
        row = {"epoch": epoch, "train_loss": logged.get("train_loss", math.nan), "val_loss": logged[MONITOR],
               "val_acc": logged["val_acc"], "val_auc": logged["val_auc"], "lr": lrs[0],
               **({"lr_backbone": lrs[1]} if len(lrs) > 1 else {}),
               "train_px": self.config.train_size(epoch - 1), "seconds": time.perf_counter() - self._start}
        self.rows = [r for r in self.rows if r["epoch"] < epoch] + [row]
        if self.path is not None:
            with atomic_path(self.path) as tmp:
                pd.DataFrame(self.rows).to_csv(tmp, index=False)
        console.print(f"epoch {epoch}/{self.config.epochs}  train_loss {row['train_loss']:.4f}  "
                      f"val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.3f}  val_auc {row['val_auc']:.3f}  "
                      f"lr {row['lr']:.2e}  {row['seconds']:.0f}s", soft_wrap=True)


def train_model(prepared: PreparedData, config: TrainConfig, runtime: RuntimeSettings | None = None, *,
                run_dir: str | Path | None = None, resume: bool = False, keep_checkpoints: bool = True, progress: bool = False,
                callbacks: Sequence[Callback] = (), lr_finding: LRFinding | None = None
                ) -> tuple[ChestXrayNet, pd.DataFrame | None]:
    """Train a model on ``prepared``'s training rows, early-stopped on its validation rows; return the
    model with the weights of its best epoch (lowest validation loss; eval mode) and its history
    (one row per epoch: ``epoch, train_loss, val_loss, val_acc, val_auc, lr, train_px, seconds``).
    ``runtime`` (default :class:`~chestxray.config.RuntimeSettings`) says how to use the machine.

    ``run_dir`` receives ``config.yaml``, ``split.csv``, ``environment.json``, ``metrics.csv``,
    ``curves.png`` and, with ``keep_checkpoints``, ``checkpoints/`` (best and last); without
    ``keep_checkpoints`` (or without ``run_dir``) the checkpoints live in a temporary folder.
    ``resume`` continues from ``run_dir/checkpoints/last.ckpt``. ``callbacks`` are extra Lightning
    callbacks (e.g. pruning). In a multi-process launch only rank 0 writes and gets the history;
    the other ranks get ``None``. ``lr_finding`` (the :func:`find_lr` that chose ``config.lr``) is
    written beside the config (``lr_find.json``, ``lr_find.png``) and named in ``config.yaml``.
    """
    runtime = runtime or RuntimeSettings()
    module = build_module(prepared, config, runtime)
    run_dir = Path(run_dir) if run_dir is not None else None
    with contextlib.ExitStack() as stack:
        if run_dir is not None and keep_checkpoints:
            checkpoints = run_dir / "checkpoints"
        else:
            checkpoints = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chestxray-ckpt-")))
        last = checkpoints / "last.ckpt"
        if resume:
            check_checkpoint(last, module)
        log = EpochLog(run_dir / "metrics.csv" if run_dir is not None else None, config)
        trainer = _make_trainer(config, runtime, checkpoints, progress, [log, *callbacks],
                                _logger(runtime.logger, run_dir) if run_dir is not None else False)
        if trainer.is_global_zero:
            _start_run(run_dir, config, prepared, lr_finding)
        try:
            trainer.fit(module, *make_loaders(prepared, config, runtime), ckpt_path=last if resume else None,
                        weights_only=True)
        except OSError as err:  # a checkpoint or metrics.csv that cannot be written: the last complete one is kept
            where = run_dir if run_dir is not None else checkpoints
            kept = (f"; resume from the last complete checkpoint with --resume --name {where.name}"
                    if run_dir is not None and last.is_file() else "")
            raise write_error(getattr(err, "filename", None) or where, err, f"write the run{kept}") from None
        if not trainer.is_global_zero:  # rank 0 alone wrote the checkpoints and metrics (maybe on another node)
            return module.model.float().eval(), None
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best:
            module.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
    history = log.history()
    if run_dir is not None and len(history):
        plot_training_curves(history, run_dir / "curves.png")
    return module.model.float().eval(), history


def build_module(prepared: PreparedData, config: TrainConfig, runtime: RuntimeSettings) -> ClassifierModule:
    """The Lightning module a run trains: the seeds set, the threads shared out, the starting model
    (:func:`initial_model`) in the memory layout of ``runtime``, the class weights of ``config.balance``."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    _set_threads(runtime)
    model = initial_model(config, prepared.samples)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return ClassifierModule(model, config, _class_weights(prepared, config), runtime.channels_last)


@dataclass(frozen=True)
class LRSearch:
    """The learning rates :func:`find_lr` tries: ``num_training`` steps from ``min_lr`` to ``max_lr``,
    growing exponentially, stopped early once the smoothed loss exceeds ``early_stop`` times its best."""

    num_training: int = 100
    min_lr: float = 1e-6
    max_lr: float = 1.0
    early_stop: float = 4.0

    def __post_init__(self) -> None:
        if self.num_training < 2:
            raise ChestXrayError(f"the learning-rate finder needs at least 2 steps, not {self.num_training}")
        if not 0 < self.min_lr < self.max_lr:
            raise ChestXrayError(f"the learning rates searched must be 0 < min < max, not {self.min_lr:g} to "
                                 f"{self.max_lr:g}")


@dataclass
class LRFinding:
    """What :func:`find_lr` measured: the suggested rate of the head (the backbone's is
    ``backbone_lr_ratio`` times it), each step's rate and smoothed training loss, and the search."""

    suggestion: float
    lrs: list[float]
    losses: list[float]
    search: LRSearch
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``lr_find.json``): NaN losses (a step that returned none) as ``null``."""
        return {"suggestion": self.suggestion, "min_lr": self.search.min_lr, "max_lr": self.search.max_lr,
                "num_training": self.search.num_training, "steps": len(self.lrs), "seconds": round(self.seconds, 1),
                "note": "the head's learning rate at the steepest fall of the smoothed training loss per decade of "
                        "rate, swept by Lightning's Tuner.lr_find; the backbone trains at backbone_lr_ratio times it",
                "lr": self.lrs, "loss": [v if math.isfinite(v) else None for v in self.losses]}

    def save(self, folder: str | Path) -> Path:
        """Write ``lr_find.json`` and ``lr_find.png`` (the curve, the suggestion marked) into ``folder``."""
        folder = make_folder(folder, "run folder")
        write_text(folder / "lr_find.json", json.dumps(self.to_dict(), indent=2) + "\n")
        plot_lr_find(self.lrs, self.losses, self.suggestion, folder / "lr_find.png")
        return folder / "lr_find.json"


def find_lr(prepared: PreparedData, config: TrainConfig, runtime: RuntimeSettings | None = None,
            search: LRSearch = LRSearch(), *, progress: bool = False) -> LRFinding:
    """Lightning's learning-rate finder (``Tuner(trainer).lr_find``) on the model, training images,
    loader, augmentation, mixup, loss and optimiser that :func:`train_model` would use with ``config``:
    its first ``search.num_training`` steps, with the rate swept instead of scheduled (the backbone at
    ``backbone_lr_ratio`` times the head's, as in training). Returns the suggestion (the rate where the
    smoothed training loss falls fastest) and the curve; the model is thrown away. One process only.
    ``progress``: show Lightning's bar of the search (on stderr)."""
    runtime = runtime or RuntimeSettings()
    if world_size() > 1 or runtime.num_nodes > 1 or runtime.devices not in ("auto", "1"):
        raise ChestXrayError("the learning-rate finder runs in one process on one device: run chestxray lr-find "
                             "DATA without torchrun, then train with its --lr")
    runtime = runtime.replace(devices="1")
    module = build_module(prepared, config, runtime)
    module.finder_losses = []
    loader, _ = make_loaders(prepared, config, runtime)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(tempfile.TemporaryDirectory(prefix="chestxray-lr-find-"))
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=r".*validation_step.*val_dataloader")  # the finder needs none
        if not progress and hasattr(lightning_lr_finder, "tqdm"):  # its bar is a tqdm of that module's own
            stack.enter_context(mock.patch.object(lightning_lr_finder, "tqdm",
                                                  functools.partial(lightning_lr_finder.tqdm, disable=True)))
        trainer = L.Trainer(max_epochs=-1, max_steps=search.num_training, accelerator=accelerator, devices=1,
                            precision=_precision(runtime, accelerator), logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, default_root_dir=root)
        found = Tuner(trainer).lr_find(module, train_dataloaders=loader, min_lr=search.min_lr, max_lr=search.max_lr,
                                       num_training=search.num_training, early_stop_threshold=search.early_stop,
                                       update_attr=False)
    lrs = [float(v) for v in found.results["lr"]]
    losses = [float(v) for v in found.results["loss"]]
    if len(module.finder_losses) == len(lrs):
        # Lightning debiases its running average one step late (by global_step, already counted when a step ends),
        # which halves the first values and makes the curve rise at the start: smoothed here from the raw losses
        losses = smoothed_losses(module.finder_losses)
    suggestion = suggest_lr(lrs, losses)
    if suggestion is None or not math.isfinite(suggestion) or suggestion <= 0:
        raise ChestXrayError(f"the learning-rate finder ran {len(lrs)} step(s) on {len(prepared.train_rows)} "
                             "training images: too few to suggest a rate; give it more steps (--num-training)")
    return LRFinding(float(suggestion), lrs, losses, search, time.perf_counter() - started)


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], skip_end: int = 1) -> float | None:
    """The rate where the smoothed loss falls fastest per decade of rate: Lightning's rule (the steepest
    negative gradient, the first ``min(10, n // 5)`` and last ``skip_end`` steps skipped) with the gradient
    taken against log10(rate), the axis the rates are spaced on. Lightning's takes it against the rate
    itself, so that on an exponential sweep the tightly spaced low rates win on noise (Lightning issue
    #21141). ``None`` when fewer than two finite points remain."""
    skip_begin = min(10, len(lrs) // 5)
    rates, values = np.log10(np.asarray(lrs, dtype=float)), np.asarray(losses, dtype=float)
    kept = np.arange(len(rates))[skip_begin:len(rates) - skip_end]
    kept = kept[np.isfinite(values[kept])]
    if len(kept) < 2:
        return None
    slope = np.gradient(values[kept], rates[kept])
    return float(lrs[int(kept[np.argmin(slope)])])


def smoothed_losses(losses: Sequence[float], beta: float = 0.98) -> list[float]:
    """The running average of ``losses`` that the learning-rate finder plots, ``beta`` of the average kept at
    each step, divided by ``1 - beta ** steps`` so that its start is not biased towards 0; a NaN loss (a
    step that returned none) stays NaN and leaves the average alone."""
    average, steps, smoothed = 0.0, 0, []
    for loss in losses:
        if not math.isfinite(loss):
            smoothed.append(math.nan)
            continue
        average, steps = beta * average + (1 - beta) * loss, steps + 1
        smoothed.append(average / (1 - beta ** steps))
    return smoothed


def _start_run(run_dir: Path | None, config: TrainConfig, prepared: PreparedData,
               lr_finding: LRFinding | None = None) -> None:
    """Log what is trained; write the run's ``config.yaml``, ``split.csv``, ``environment.json`` and, when
    the learning rate was found, ``lr_find.json`` and ``lr_find.png``."""
    runtime = runtime_environment()
    target = f" -> {run_dir}" if run_dir is not None else ""
    console.print(f"training {config.arch} on {len(prepared.train_rows)} images, validating on "
                  f"{len(prepared.val_rows)} ({len(prepared.samples.classes)} classes, {config.image_size}px; "
                  f"{runtime['threads']} threads, allocator {runtime['allocator']}){target}")
    if note := system_allocator_note():  # the Python API's runs: the CLI has put itself on tcmalloc
        console.print(note, highlight=False)
    if run_dir is None:
        return
    make_folder(run_dir, "run folder")
    notes = {}
    if lr_finding is not None:
        lr_finding.save(run_dir)
        notes["lr"] = "suggested by the learning-rate finder (lr-find; curve in lr_find.json, lr_find.png)"
    save_config(config, run_dir / "config.yaml", comments=notes)
    save_split(run_dir / "split.csv", prepared.samples, {"train": prepared.train_rows, "val": prepared.val_rows})
    write_text(run_dir / "environment.json", json.dumps(runtime, indent=2))


def calibrate_on_validation(model: ChestXrayNet, prepared: PreparedData, seed: int = 0) -> Calibration:
    """:func:`~chestxray.calibration.calibrate` on ``prepared``'s validation rows, with the OOD guard
    fitted on its training rows (``seed``: the folds choosing the logit transform and the bootstrap of
    the validation intervals)."""
    images = np.asarray(prepared.cache.images)
    return calibrate(model, images[prepared.val_rows], prepared.targets[prepared.val_rows],
                     classes=list(prepared.samples.classes), guard_images=images[prepared.train_rows],
                     guard_targets=prepared.targets[prepared.train_rows],
                     fitted_on=f"validation split ({len(prepared.val_rows)} images)", seed=seed,
                     groups=prepared.samples.subset(prepared.val_rows).groups())


def bundle_meta(prepared: PreparedData, config: TrainConfig, calibration: Calibration,
                history: pd.DataFrame | None) -> BundleMeta:
    """The bundle metadata of a model trained on ``prepared`` with ``config``: preprocessing, calibration,
    the validation figures (``val_loss``, ``val_acc``, ``val_auc``, ``val_loss_calibrated``), what it was
    trained on, the content hashes of its training and validation images, its history and (after
    ``train --init``) its lineage."""
    metrics: dict[str, Any] = {}
    if calibration.scores is not None:
        metrics = {MONITOR: calibration.scores.loss, "val_acc": calibration.scores.accuracy,
                   "val_auc": calibration.scores.macro_auc}
    if calibration.loss_calibrated is not None:
        metrics["val_loss_calibrated"] = calibration.loss_calibrated
    paths = prepared.samples.frame["path"].to_numpy()
    return model_meta(prepared.samples, config, calibration, fingerprint=prepared.cache.fingerprint, metrics=metrics,
                      train_paths=paths[prepared.train_rows], val_paths=paths[prepared.val_rows],
                      extra={"history": (history if history is not None else pd.DataFrame()).to_dict("list")},
                      **_init_lineage(config))


def model_meta(samples: Samples, config: TrainConfig, calibration: Calibration, *, fingerprint: str,
               metrics: dict[str, Any], train_paths: Sequence[str], val_paths: Sequence[str],
               extra: dict[str, Any] | None = None, lineage: dict[str, Any] | None = None) -> BundleMeta:
    """The one builder of a trained model's :class:`BundleMeta` (a single run's and a CV ensemble's):
    classes, preprocessing, ``calibration``'s fields, the source-confound check, the cache fingerprint,
    ``metrics``, the content hashes of the training and validation images, what it was trained on
    (origin, image counts, class counts, provenance files) and ``extra`` besides."""
    return BundleMeta(
        classes=list(samples.classes), image_size=config.image_size,
        preprocess=config.preprocessing().options(), **calibration.bundle_fields(),
        source_confound=source_confound(samples, config.seed),
        train_fingerprint=fingerprint, metrics=metrics,
        seen_images=seen_images_record(list(train_paths), list(val_paths)),
        extra={"config": config.to_dict(), "trained_on": {
            "origin": samples.origin, "n_train": int(len(train_paths)), "n_val": int(len(val_paths)),
            "class_counts": samples.frame["label"].value_counts().to_dict(),
            "provenance_files": provenance_files(samples.origin)},
            **calibration.extra_fields(), "calibration_choice": calibration.transform_choice,
            **_label_mapping(samples, config), **_weights_record(config), **(extra or {})},
        lineage=lineage)


def _weights_record(config: TrainConfig) -> dict[str, Any]:
    """``{"weights_source": ...}`` when the run started from a weights file or ``txrv:`` weights (their
    path, sha256 and, for torchxrayvision's, URL and expected input), else nothing."""
    if config.init or config.weights in ("imagenet", "none"):
        return {}
    return {"weights_source": weights_source(config.weights)}


def _label_mapping(samples: Samples, config: TrainConfig) -> dict[str, Any]:
    """``{"label_mapping": {format: mapping}}`` for the public data sets among ``samples`` (what their
    adapters made of the source labels, under ``config``'s policies), else nothing."""
    formats = sorted(set(samples.frame["source"]) & set(PUBLIC_FORMATS))
    if not formats:
        return {}
    options = SourceOptions(**config.source_options())
    return {"label_mapping": {name: label_mapping(name, options) for name in formats}}


def pretrained_config(config: TrainConfig) -> TrainConfig:
    """``config`` with the image size and fit mode that ``txrv:`` weights were trained at (torchxrayvision
    centre-crops and resizes to 224 or 512 px); any other config as it is."""
    if not config.weights.startswith(TXRV_PREFIX):
        return config
    settings = {"image_size": txrv_input_size(config.weights), "fit_mode": "crop"}
    changed = {k: v for k, v in settings.items() if getattr(config, k) != v}
    if changed:
        console.print(f"{config.weights}: " + ", ".join(f"{k} {v}" for k, v in changed.items())
                      + " taken from the weights (torchxrayvision's preprocessing)", soft_wrap=True)
    return config.replace(**changed)


def warm_start_config(config: TrainConfig, data: str | Path | Samples) -> tuple[TrainConfig, Samples]:
    """``config`` with the architecture and preprocessing of the ``config.init`` bundle, and the samples
    with the bundle's class order when they have its classes."""
    meta = read_meta(config.init)
    if meta.extra.get("members"):
        raise ChestXrayError(f"{config.init}: a cross-validation ensemble; warm start from a single model's bundle")
    samples = data if isinstance(data, Samples) else load_samples(data, **config.source_options())
    if meta.task == samples.task and sorted(meta.classes) == sorted(samples.classes):
        samples = Samples(samples.frame, list(meta.classes), samples.task, samples.origin, samples.skipped)
    settings = {"arch": meta.arch, "image_size": meta.image_size, "fit_mode": meta.preprocess.get("mode", "pad"),
                "contrast": meta.preprocess.get("contrast", "none")}
    changed = {k: v for k, v in settings.items() if getattr(config, k) != v}
    if changed:
        console.print(f"warm start from {config.init}: " + ", ".join(f"{k} {v}" for k, v in changed.items())
                      + " taken from the bundle", soft_wrap=True)
    return config.replace(**settings), samples


def initial_model(config: TrainConfig, samples: Samples) -> ChestXrayNet:
    """The model a run starts from: ``config.weights``, or the ``config.init`` bundle's weights.

    From a bundle with the same classes (and order) the whole model is copied; with other classes
    only the backbone, under a freshly initialised classifier.
    """
    if not config.init:
        return create_model(config.arch, len(samples.classes), config.weights, config.drop_rate, samples.task)
    parent, meta = load_bundle(config.init)
    model = create_model(meta.arch, len(samples.classes), "none", config.drop_rate, samples.task)
    if list(meta.classes) == list(samples.classes) and meta.task == samples.task:
        load_state_strict(model, parent.state_dict(), config.init)
        return model
    own = model.backbone.state_dict()
    head = f"{model.backbone.pretrained_cfg['classifier']}."
    state = {k: (own[k] if k.startswith(head) else v) for k, v in parent.backbone.state_dict().items()}
    load_state_strict(model.backbone, state, config.init)
    console.print(f"warm start from {config.init}: backbone only (its classes {', '.join(meta.classes)} are not "
                  f"these: {', '.join(samples.classes)})", soft_wrap=True)
    return model


def _init_lineage(config: TrainConfig) -> dict[str, Any]:
    """``{"lineage": ...}`` naming the bundle a warm-started run began from; empty otherwise."""
    if not config.init:
        return {}
    return {"lineage": lineage_record(config.init, read_meta(config.init), "warm start (train --init)")}


def run_directory(out_dir: str | Path, name: str | None, *, prefix: str = "", resume: bool = False,
                  overwrite: bool = False, complete: str | None = None) -> Path:
    """``out_dir/name`` (default name: ``prefix`` and a timestamp) for a new run, never silently reused.

    An existing non-empty folder is refused unless ``resume`` (it is continued) or ``overwrite``
    (it is deleted first, so no old checkpoint or metric survives beside the new ones); a folder
    holding anything a run does not write is never deleted. ``complete``: the file a finished run of
    this kind writes last (cross-validation, sweeps): a run folder without it is the remains of a killed
    run and is replaced, with a line saying so. Only the first process of a launch checks and deletes.
    """
    run_dir = Path(out_dir) / (_run_name(out_dir, name) if name else datetime.now().strftime(f"{prefix}%Y%m%d-%H%M%S"))
    if resume or not is_first_process() or not run_dir.is_dir() or not any(run_dir.iterdir()):
        return run_dir
    incomplete = complete is not None and not (run_dir / complete).is_file()
    if not overwrite and not incomplete:
        raise ChestXrayError(f"{run_dir} already holds a run; choose another --name, continue it with --resume "
                             "or replace it with --overwrite")
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES and not _FOLD.fullmatch(p.name))
    if foreign:
        raise ChestXrayError(f"{run_dir} is not a run folder (it holds {', '.join(foreign[:3])}); "
                             "not deleting it: choose another --name")
    if incomplete and not overwrite:
        console.print(f"{run_dir} held an incomplete run (no {complete}: interrupted before its end); replacing it",
                      soft_wrap=True, highlight=False)
    shutil.rmtree(run_dir)
    return run_dir


def _run_name(out_dir: str | Path, name: str) -> str:
    """``name`` when it names a folder inside ``out_dir``; an absolute name, ``..`` or a link leading
    elsewhere is refused (a run folder may be deleted by ``--overwrite``: it must stay under ``--out``)."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ChestXrayError(f"--name {name!r}: a run name must be a relative folder inside --out "
                             "(no absolute path, no '..')")
    root = Path(out_dir).resolve()
    target = (root / name).resolve()
    if target == root or not target.is_relative_to(root):
        raise ChestXrayError(f"--name {name!r}: resolves to {target}, outside --out {out_dir}")
    return name


def fit(data: str | Path | Samples, config: TrainConfig | None = None, runtime: RuntimeSettings | None = None, *,
        out_dir: str | Path = "runs",
        name: str | None = None, resume: bool = False, overwrite: bool = False, cache_dir: str | Path | None = None,
        progress: bool | None = None, split_file: str | Path | None = None,
        callbacks: Sequence[Callback] = (), onnx: bool = True, lr_search: LRSearch | None = None) -> RunResult:
    """Train a model on ``data`` (test split excluded) and write its run directory and bundle:
    :func:`prepare_data` -> :func:`train_model` -> :func:`calibrate_on_validation` -> ``save_bundle``.

    With ``resume``, the run ``out_dir/name`` continues from its last checkpoint with its saved
    config and split; an existing run is otherwise refused unless ``overwrite`` (:func:`run_directory`).
    ``split_file`` (a ``split.csv`` as saved in run directories) fixes the
    training and validation images; ``callbacks`` are extra Lightning callbacks (e.g. pruning).
    ``onnx``: also export the bundle to ONNX (``model.onnx``), parity-checked on validation X-rays, so
    that ``fit`` and ``chestxray train`` write the same bundle. ``lr_search`` (``train --lr auto``): run
    :func:`find_lr` first and train at its suggestion instead of ``config.lr`` (recorded in ``config.yaml``).
    """
    if lr_search is not None and resume:
        raise ChestXrayError("a resumed run keeps the learning rate it started with: leave out --lr auto")
    if split_file is not None and not Path(split_file).is_file():
        raise InputError(split_file, "split file not found")
    run_dir = run_directory(out_dir, name, resume=resume, overwrite=overwrite)
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume:
        if not last.is_file():
            raise ChestXrayError(f"{run_dir}: no checkpoint to resume from (expected {last})")
        config = load_config(run_dir / "config.yaml")
        split_file = run_dir / "split.csv"
    elif config is None:
        config = TrainConfig()
    if progress is None:
        progress = console.is_terminal
    config = pretrained_config(config)
    if config.init:
        config, data = warm_start_config(config, data)
    prepared = prepare_data(data, config, cache_dir=cache_dir, split_file=split_file, progress=progress)
    finding = None
    if lr_search is not None:
        finding = find_lr(prepared, config, runtime, lr_search, progress=progress)
        console.print(f"learning-rate finder: lr {finding.suggestion:.2e} (instead of {config.lr:g}; "
                      f"{len(finding.lrs)} steps, {finding.seconds:.0f}s)", soft_wrap=True)
        config = config.replace(lr=finding.suggestion)
    model, history = train_model(prepared, config, runtime, run_dir=run_dir, resume=resume, progress=progress,
                                 callbacks=callbacks, lr_finding=finding)
    if history is None:  # a rank other than 0 of a multi-process run
        return RunResult(run_dir, run_dir / "bundle", {}, pd.DataFrame(), lr_finding=finding)
    calibration = calibrate_on_validation(model, prepared, config.seed)
    meta = bundle_meta(prepared, config, calibration, history)
    bundle_dir = save_bundle(run_dir / "bundle", model, meta)
    if calibration.held_out is not None:
        save_held_out(bundle_dir, *calibration.held_out)
    exported = None
    if onnx:
        from ..deploy.export import PARITY_IMAGES, export_onnx

        exported = export_onnx(bundle_dir, parity_images=split_files(run_dir / "split.csv", "val")[:PARITY_IMAGES])
    return RunResult(run_dir, bundle_dir, meta.metrics, history, calibration, exported, finding)


PROVENANCE_PATTERNS = ("README*", "LICENSE*", "LICENCE*", "SOURCES*", "CITATION*", "MANIFEST*")


def provenance_files(origin: str) -> list[str]:
    """Names of the files beside the data that say where the images came from and under which licence."""
    folder = Path(origin)
    folder = folder if folder.is_dir() else folder.parent
    if not folder.is_dir():
        return []
    return sorted({p.name for pattern in PROVENANCE_PATTERNS for p in folder.glob(pattern) if p.is_file()})


def _class_weights(prepared: PreparedData, config: TrainConfig) -> torch.Tensor | None:
    if config.balance != "weights":
        return None
    targets = prepared.targets[prepared.train_rows]
    n_classes = len(prepared.samples.classes)
    if prepared.samples.task == "multilabel":
        positives = targets.sum(0).clip(min=1)
        return torch.tensor((len(targets) - positives) / positives, dtype=torch.float32).clamp(max=50)
    counts = np.bincount(targets, minlength=n_classes).clip(min=1)
    return torch.tensor(len(targets) / (n_classes * counts), dtype=torch.float32)


SOCKET_PATH_ROOM = 60
"""Longest temporary folder under which multiprocessing may place its sockets (see :func:`short_worker_tempdir`)."""


def short_worker_tempdir() -> None:
    """Give loader workers a temporary folder short enough for a Unix socket.

    torch's loader workers hand each batch to the main process as a file descriptor, through a
    multiprocessing listener socket in ``$TMPDIR/pymp-*/``; a socket path may not exceed 107 bytes, so
    under a long ``TMPDIR`` every worker failed ("DataLoader worker exited unexpectedly") or the run
    stalled for good. Workers inherit this process's multiprocessing folder when they are forked, so a
    short one under /tmp is made here first (removed at exit, as multiprocessing removes its own)."""
    import multiprocessing
    from multiprocessing import util

    if len(tempfile.gettempdir()) <= SOCKET_PATH_ROOM:
        return
    config = multiprocessing.current_process()._config  # noqa: SLF001 - where multiprocessing.util keeps it
    current = config.get("tempdir")
    if current is not None and len(current) <= SOCKET_PATH_ROOM:
        return
    try:
        folder = tempfile.mkdtemp(prefix="pymp-", dir="/tmp")
    except OSError:
        return  # no /tmp to use: leave multiprocessing as it is
    util.Finalize(None, shutil.rmtree, args=[folder, True], exitpriority=-100)
    config["tempdir"] = folder


def make_loaders(prepared: PreparedData, config: TrainConfig, runtime: RuntimeSettings) -> tuple[DataLoader, DataLoader]:
    """The run's training loader (batches of ``config.batch_size`` in :class:`EpochSampler` order, class-balanced
    with ``balance: sampler``) and validation loader (in order), over ``prepared``'s uint8 cache."""
    train_set = CachedDataset(prepared.cache.images, prepared.targets, prepared.train_rows)
    val_set = CachedDataset(prepared.cache.images, prepared.targets, prepared.val_rows)
    weights = None
    if config.balance == "sampler" and prepared.samples.task == "multiclass":
        labels = prepared.targets[prepared.train_rows]
        weights = 1.0 / np.bincount(labels)[labels]
    common = {"num_workers": runtime.num_workers, "persistent_workers": runtime.num_workers > 0}
    if runtime.num_workers > 0:
        short_worker_tempdir()
    drop_last = len(train_set) > config.batch_size
    # the order from (seed, epoch) alone, and the workers' seeds from the loader's own generator, never the
    # global one: the same seed gives the same run with any --num-workers, resumed or not
    train = DataLoader(train_set, batch_size=config.batch_size, sampler=EpochSampler(len(train_set), config.seed, weights),
                       drop_last=drop_last, generator=torch.Generator().manual_seed(config.seed), **common)
    # validation scores in the runners' batch on a CPU (the figures do not depend on the batch; a small one
    # keeps activations in cache), in the training batch on a GPU
    val_batch = config.batch_size if torch.cuda.is_available() else DEFAULT_BATCH
    return train, DataLoader(val_set, batch_size=val_batch, shuffle=False, **common)


def _logger(kind: str, run_dir: Path) -> Logger | bool:
    """The Lightning logger ``kind`` writing into ``run_dir/logs`` (``False`` for ``none``)."""
    if kind == "none":
        return False
    try:
        if kind == "tensorboard":
            return TensorBoardLogger(run_dir, name="logs", version="")
        if kind == "mlflow":
            return MLFlowLogger(experiment_name=run_dir.parent.name or "chestxray", run_name=run_dir.name,
                                tracking_uri=(run_dir / "logs").resolve().as_uri())
    except ModuleNotFoundError:
        raise ChestXrayError(f"--logger {kind} needs the {kind} package (pip install {kind}); "
                             "or use --logger csv") from None
    return CSVLogger(run_dir, name="logs", version="")


def _make_trainer(config: TrainConfig, runtime: RuntimeSettings, checkpoint_dir: Path, progress: bool,
                  extra_callbacks: Sequence[Callback] = (), logger: Logger | bool = False) -> L.Trainer:
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision = _precision(runtime, accelerator)
    best = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor=MONITOR, mode="min",
                           save_weights_only=False, enable_version_counter=False)
    # last.ckpt after every epoch, whatever val_loss does (save_last=True on the monitored checkpoint
    # writes it only when that one improves), after metrics.csv has its row (train-epoch end)
    last = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                           save_on_train_epoch_end=True, save_weights_only=False, enable_version_counter=False)
    callbacks: list[Callback] = [best, last, EarlyStopping(MONITOR, patience=config.patience), *extra_callbacks,
                                 RandomState()]
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if config.ema:  # validation, checkpoints and the bundle then use the averaged weights
        callbacks.append(EMAWeightAveraging(decay=config.ema))
    if progress:  # ours alone: Lightning's bar would count epochs from 0 and share the line with the summaries
        callbacks.append(TrainingProgress())
    return L.Trainer(max_epochs=config.epochs, accelerator=accelerator,
                     **trainer_layout(runtime, accelerator, config.freeze_epochs > 0 or config.frozen_stride > 0),
                     precision=precision, callbacks=callbacks, logger=logger, enable_progress_bar=False,
                     plugins=[AtomicCheckpointIO()],
                     enable_model_summary=False, num_sanity_val_steps=0, deterministic=False,
                     default_root_dir=checkpoint_dir, log_every_n_steps=1)


def _precision(runtime: RuntimeSettings, accelerator: str) -> str:
    """``runtime.precision``; ``auto``: mixed precision on a GPU, 32-bit on a CPU (bf16 is 5-10x slower on
    CPUs without native bf16)."""
    if runtime.precision == "auto":
        return "16-mixed" if accelerator == "gpu" else "32-true"
    return runtime.precision


def runtime_environment() -> dict[str, Any]:
    """What this run ran on (the run folder's ``environment.json``): versions, allocator, threads, device."""
    return {"torch": torch.__version__, "lightning": L.__version__, "allocator": active_allocator(),
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def _set_threads(runtime: RuntimeSettings) -> None:
    """All cores for one process; an equal share each when several processes share the machine.

    Cores are those this process may run on (a cluster job's allocation), not all of the machine's.
    """
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if runtime.devices.isdigit() and not torch.cuda.is_available():
        local_processes = max(local_processes, int(runtime.devices))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // local_processes))
