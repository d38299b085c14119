"""Look before you train: the inputs a run feeds its model, and the learning-rate finder.

Both go through the very path ``chestxray train`` takes: the samples, the leakage guard and the cache
of :func:`~chestxray.training.train.prepare_data`, the run's split, its loaders and, for training
images, the augmentation of :func:`~chestxray.training.train.training_inputs`.

- :func:`show_batch` (``chestxray show-batch``): a grid of the first images of a split as the model
  receives them (one channel, preprocessed, for ``train`` augmented as epoch 1 draws them), each
  titled with its label and file; the figure and the arrays it shows (fastai's ``show_batch``).
- :func:`lr_find` (``chestxray lr-find``): :func:`~chestxray.training.train.find_lr` on a new run
  folder: ``lr_find.png`` (the curve, the suggestion marked), ``lr_find.json`` (the suggestion and the
  curve) and ``config.yaml`` (the recipe searched, at the suggested rate: ``train --config`` takes it).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data.dataset import epoch_seed
from ..data.sources import NO_FINDING, Samples
from ..errors import ChestXrayError
from ..storage import make_folder, write_bytes
from .config import RuntimeSettings, TrainConfig, save_config
from .train import (LRFinding, LRSearch, PreparedData, console, find_lr, make_loaders, prepare_data,
                    run_directory, training_inputs, warm_start_config)

__all__ = ["show_batch", "lr_find", "batch_inputs", "BatchView", "LRFindRun", "SPLITS"]

SPLITS = ("train", "val")
"""The inputs :func:`show_batch` shows: ``train`` (augmented as training draws them) or ``val`` (as validated)."""
TITLE_CHARS = 24
"""Longest file name in a tile's title (longer ones keep their start and end)."""


@dataclass
class BatchView:
    """What :func:`show_batch` drew: the figure, and per tile the model's input and where it came from."""

    figure: Figure
    images: np.ndarray
    """The inputs shown, float32 (n, side, side) in [0, 1]: the model's one channel, as fed to it."""
    rows: np.ndarray
    """Each tile's row in ``prepared.samples``."""
    labels: list[str]
    files: list[str]
    split: str
    prepared: PreparedData
    config: TrainConfig
    path: Path | None = None
    """The PNG written (``None``: no ``out`` given)."""


@dataclass
class LRFindRun:
    """What :func:`lr_find` wrote: its run folder, the finder's result and the config it searched."""

    run_dir: Path
    finding: LRFinding
    config: TrainConfig


def batch_inputs(prepared: PreparedData, config: TrainConfig, n: int, split: str = "train"
                 ) -> tuple[np.ndarray, torch.Tensor]:
    """The first ``n`` inputs of ``split`` as the run's loaders and steps produce them: ``(rows, inputs)``,
    the rows of ``prepared.samples`` and the float inputs (n, 1, side, side).

    ``train``: in the training loader's order of epoch 1, each whole batch augmented after seeding
    torch as epoch 1 does, so the first ``batch_size`` inputs are those of the run's first step (before
    mixup blends them); later batches are drawn the same way (training draws mixup and dropout between
    them). ``val``: the validation images in order, unaugmented.
    """
    if split not in SPLITS:
        raise ChestXrayError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    train, val = make_loaders(prepared, config, RuntimeSettings())
    loader, rows = (train, prepared.train_rows) if split == "train" else (val, prepared.val_rows)
    if not len(rows):
        raise ChestXrayError(f"no {'training' if split == 'train' else 'validation'} images to show "
                             f"(--val-fraction {config.val_fraction:g})")
    order = list(iter(loader.sampler)) if split == "train" else list(range(len(rows)))
    n = min(n, len(order))
    if split == "train":
        torch.manual_seed(epoch_seed(config.seed, 0))  # what ClassifierModule.on_train_epoch_start does
    shown: list[torch.Tensor] = []
    for images, _ in loader:
        shown.append(training_inputs(images, config, 0, split == "train"))
        if sum(len(batch) for batch in shown) >= n:
            break
    return np.asarray(rows)[np.asarray(order[:n], dtype=int)], torch.cat(shown)[:n]


def show_batch(data: str | Path | Samples, config: TrainConfig | None = None, *, n: int = 16, split: str = "train",
               out: str | Path | None = None, cache_dir: str | Path | None = None,
               progress: bool = False) -> BatchView:
    """A grid of the first ``n`` inputs of ``split`` (:func:`batch_inputs`) of the run ``config`` would
    train on ``data``, each tile titled with its label and file, drawn in gray from 0 to 1 (the model's
    input range, not stretched per tile); saved as a PNG at ``out`` when given."""
    if n < 1:
        raise ChestXrayError(f"n must be at least 1, not {n}")
    config = config or TrainConfig()
    if config.init:
        config, data = warm_start_config(config, data)
    prepared = prepare_data(data, config, cache_dir=cache_dir, progress=progress)
    rows, inputs = batch_inputs(prepared, config, n, split)
    images = inputs[:, 0].numpy().astype(np.float32)
    frame = prepared.samples.frame
    labels = frame["label"].iloc[rows].replace("", NO_FINDING).astype(str).tolist()
    files = frame["path"].iloc[rows].astype(str).tolist()
    figure = _grid(images, labels, files, _caption(config, split, len(images), images.shape[-1]))
    path = None
    if out is not None:
        path = Path(out)
        make_folder(path.parent, "output folder")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        write_bytes(path, buffer.getvalue())
    return BatchView(figure, images, rows, labels, files, split, prepared, config, path)


def _caption(config: TrainConfig, split: str, count: int, side: int) -> str:
    if split == "val":
        return f"{count} validation inputs as the model is fed them: {side} px, no augmentation"
    mixup = f"; mixup {config.mixup:g} then blends pairs (not shown)" if config.mixup > 0 else ""
    return (f"{count} training inputs of epoch 1 as the model is fed them (seed {config.seed}): {side} px, "
            f"augment {config.augment:g}, photometric {config.photometric:g}, hflip "
            f"{'on' if config.hflip else 'off'}{mixup}")


def _short(name: str) -> str:
    name = Path(name).name
    if len(name) <= TITLE_CHARS:
        return name
    half = (TITLE_CHARS - 1) // 2
    return name[:half] + "…" + name[len(name) - (TITLE_CHARS - 1 - half):]


def _grid(images: np.ndarray, labels: list[str], files: list[str], caption: str) -> Figure:
    """The tiles in a near-square grid, gray from 0 (black) to 1 (white)."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    figure = Figure(figsize=(max(2.2 * columns, 6.0), 2.4 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, image, label, file in zip(axes, images, labels, files):
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"{label}\n{_short(file)}", fontsize=8)
    figure.suptitle(caption, fontsize=9, wrap=True)
    return figure


def lr_find(data: str | Path | Samples, config: TrainConfig | None = None, runtime: RuntimeSettings | None = None,
            search: LRSearch = LRSearch(), *, out_dir: str | Path = "runs", name: str | None = None,
            overwrite: bool = False, cache_dir: str | Path | None = None, progress: bool | None = None) -> LRFindRun:
    """:func:`~chestxray.training.train.find_lr` on the data and recipe ``chestxray train`` would use,
    written to ``out_dir/name`` (default name ``lr-find-<timestamp>``): ``lr_find.json``, ``lr_find.png``
    and ``config.yaml`` (``config`` at the suggested rate, for ``train --config``)."""
    config = config or TrainConfig()
    progress = console.is_terminal if progress is None else progress
    run_dir = run_directory(out_dir, name, prefix="lr-find-", overwrite=overwrite)
    if config.init:
        config, data = warm_start_config(config, data)
    prepared = prepare_data(data, config, cache_dir=cache_dir, progress=progress)
    console.print(f"learning-rate finder: {config.arch} on {len(prepared.train_rows)} training images, "
                  f"{search.num_training} steps from {search.min_lr:g} to {search.max_lr:g}", soft_wrap=True)
    finding = find_lr(prepared, config, runtime, search, progress=progress)
    finding.save(run_dir)
    found = config.replace(lr=finding.suggestion)
    save_config(found, run_dir / "config.yaml",
                comments={"lr": "suggested by the learning-rate finder (lr_find.json, lr_find.png)"})
    return LRFindRun(run_dir, finding, found)
