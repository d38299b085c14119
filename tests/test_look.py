"""Look before you train: show-batch shows what the run feeds its model, lr-find runs Lightning's finder on the
run's own recipe, and ``--lr auto`` trains at the finder's suggestion and says so in ``config.yaml``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from factories import TINY, write_xrays
from PIL import Image
from typer.testing import CliRunner

import chestxray.training.train as train_module
from chestxray.cli import app
from chestxray.data.dataset import CachedDataset
from chestxray.errors import ChestXrayError
from chestxray.model.bundle import read_meta
from chestxray.training.config import TrainConfig, load_config, save_config
from chestxray.training.cv import cross_validate
from chestxray.training.look import show_batch
from chestxray.training.train import (ClassifierModule, LRSearch, find_lr, prepare_data, smoothed_losses,
                                     suggest_lr, train_model)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """24 training images (dark normal, bright pneumonia; 40 x 40 px) of 12 patients, and a test split."""
    return write_xrays(tmp_path / "data")


def test_show_batch_draws_the_augmented_training_inputs_with_label_and_file(data: Path, tmp_path: Path) -> None:
    config = TrainConfig(**TINY)  # 32 px, batch 8, augment 1
    view = show_batch(data, config, n=6, out=tmp_path / "batch.png")

    with Image.open(view.path) as png:
        assert png.format == "PNG" and png.width >= 400 and png.height >= 300  # 3 x 2 tiles at 100 dpi
    assert view.images.shape == (6, 32, 32) and view.images.dtype == np.float32
    assert 0.0 <= view.images.min() and view.images.max() <= 1.0
    prepared = view.prepared
    assert set(view.rows) <= set(prepared.train_rows)  # never a validation or test image
    raw = np.asarray(prepared.cache.images)[view.rows].astype(np.float32) / 255  # the cache: what the dataset yields
    assert not np.allclose(view.images, raw, atol=0.02)  # augmented (rotation, scale, shift, brightness)...
    assert np.abs(view.images.mean((1, 2)) - raw.mean((1, 2))).max() < 0.2  # ...but the same pictures
    # dark normal, bright pneumonia survive the augmentation; each title names the label and the file
    for image, label, file, ax in zip(view.images, view.labels, view.files, view.figure.axes):
        assert Path(file).parent.name == label
        assert (image.mean() < 0.45) == (label == "normal")
        assert ax.get_title() == f"{label}\n{Path(file).name}"


def test_the_val_split_shows_the_datasets_images_unaugmented(data: Path) -> None:
    config = TrainConfig(**TINY)
    view = show_batch(data, config, n=4, split="val")
    prepared = view.prepared
    assert list(view.rows) == list(prepared.val_rows[:4])
    dataset = CachedDataset(prepared.cache.images, prepared.targets, prepared.val_rows)
    for i, image in enumerate(view.images):
        item, target = dataset[i]
        np.testing.assert_array_equal(image, item[0].numpy().astype(np.float32) / 255)
        assert prepared.samples.classes[int(target)] == view.labels[i]
    assert view.figure.texts[0].get_text().startswith("4 validation inputs")


def test_show_batch_follows_the_recipe_options(data: Path) -> None:
    """No augmentation: a training tile is the cached image; progressive resizing: epoch 1's smaller side."""
    plain = show_batch(data, TrainConfig(**{**TINY, "augment": 0.0}), n=3)
    raw = np.asarray(plain.prepared.cache.images)[plain.rows].astype(np.float32) / 255
    np.testing.assert_array_equal(plain.images, raw)
    assert show_batch(data, TrainConfig(**{**TINY, "image_size": 64, "epochs": 3, "resize_start": 0.5}),
                      n=2).images.shape == (2, 32, 32)


def test_show_batch_refuses_what_it_cannot_show(data: Path) -> None:
    with pytest.raises(ChestXrayError, match="split must be one of train, val, not 'test'"):
        show_batch(data, TrainConfig(**TINY), split="test")
    with pytest.raises(ChestXrayError, match="n must be at least 1"):
        show_batch(data, TrainConfig(**TINY), n=0)


def test_the_show_batch_command_takes_trains_options(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "look" / "batch.png"
    result = CliRunner().invoke(app, ["show-batch", str(data), "--n", "4", "--image-size", "48", "--augment", "0",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "4 training inputs, 48 px" in result.output and str(out) in result.output
    refused = CliRunner().invoke(app, ["show-batch", str(data), "--lr", "auto", "--out", str(out)])
    assert "--lr auto goes with train and cv" in str(refused.exception)


def test_lr_takes_a_number_or_auto_only(data: Path) -> None:
    refused = CliRunner().invoke(app, ["train", str(data), "--lr", "fast"])
    assert refused.exit_code == 2 and "a number or auto, not 'fast'" in refused.output
    refused = CliRunner().invoke(app, ["sweep", str(data), "--lr", "auto"])
    assert "--lr auto goes with train and cv; sweep takes a number" in str(refused.exception)


def test_a_config_comment_loads_back_as_the_same_config(tmp_path: Path) -> None:
    config = TrainConfig(lr=0.00321)
    save_config(config, tmp_path / "config.yaml", comments={"lr": "from the finder"})
    text = (tmp_path / "config.yaml").read_text()
    assert "lr: 0.00321  # from the finder\n" in text and text.count("#") == 1
    assert load_config(tmp_path / "config.yaml") == config


def test_the_finders_running_average_is_unbiased_from_its_first_step() -> None:
    """Lightning's divides by 1 - 0.98 ** (step + 1): its first value is half the first loss, and a flat
    loss makes a curve that rises; this one stays flat, follows a change, and steps over a NaN."""
    assert smoothed_losses([1.3] * 5) == pytest.approx([1.3] * 5)
    rising = smoothed_losses([1.0] * 3 + [2.0] * 3)
    assert rising[:3] == pytest.approx([1.0] * 3) and 1.0 < rising[3] < rising[4] < rising[5] < 2.0
    with_gap = smoothed_losses([1.0, float("nan"), 1.0])
    assert np.isnan(with_gap[1]) and with_gap[0] == pytest.approx(1.0) and with_gap[2] == pytest.approx(1.0)


def test_the_suggestion_is_the_steepest_fall_per_decade_of_rate() -> None:
    """A loss that falls fastest around 1e-3 on a sweep from 1e-6 to 1, with a wobble of 0.002 at the
    low rates: per decade, the fall wins; against the rate itself (Lightning's), the wobble does."""
    from lightning.pytorch.tuner.lr_finder import _LRFinder

    lrs = np.logspace(-6, 0, 100)
    losses = 1.4 - 0.3 / (1 + np.exp(-3 * (np.log10(lrs) + 3))) + 0.002 * np.sin(np.arange(100))
    losses[lrs > 0.05] += 5 * (np.log10(lrs[lrs > 0.05]) + 1.3)  # divergence at the end
    assert 5e-4 < suggest_lr(list(lrs), list(losses)) < 2e-3
    lightning = _LRFinder("exponential", 1e-6, 1.0, 100)
    lightning.results = {"lr": list(lrs), "loss": list(losses)}
    assert lightning.suggestion() < 1e-4  # the bug the rule above avoids (Lightning issue #21141)
    assert suggest_lr([1e-3, 1e-2], [1.0, 0.9]) is None  # too few points once the ends are skipped


def test_lr_search_refuses_an_empty_range() -> None:
    with pytest.raises(ChestXrayError, match="0 < min < max"):
        LRSearch(min_lr=1e-2, max_lr=1e-3)
    with pytest.raises(ChestXrayError, match="at least 2 steps"):
        LRSearch(num_training=1)


@pytest.mark.slow  # trains two tiny models for one step each
def test_show_batch_is_the_first_batch_that_training_feeds_the_model(data: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrainConfig(**{**TINY, "photometric": 0.5})
    fed: list[torch.Tensor] = []
    real = train_module.training_inputs

    def recording(images, config, epoch, train):
        inputs = real(images, config, epoch, train)
        if train:
            fed.append(inputs.clone())
        return inputs

    view = show_batch(data, config, n=config.batch_size)
    monkeypatch.setattr(train_module, "training_inputs", recording)
    train_model(prepare_data(data, config, progress=False), config, progress=False)
    np.testing.assert_array_equal(view.images, fed[0][:, 0].numpy())


@pytest.mark.slow  # runs the finder: 20 steps of a tiny model
def test_lr_find_suggests_a_rate_in_the_range_and_writes_its_curve(data: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    rates: list[list[float]] = []
    raw: list[float] = []
    step = ClassifierModule.training_step

    def recording(self, batch, batch_index):
        rates.append([group["lr"] for group in self.trainer.optimizers[0].param_groups])
        loss = step(self, batch, batch_index)
        raw.append(float(loss))
        return loss

    monkeypatch.setattr(ClassifierModule, "training_step", recording)
    args = ["lr-find", str(data), "--arch", "test_efficientnet", "--weights", "none", "--image-size", "32",
            "--batch-size", "8", "--val-fraction", "0.25", "--freeze-epochs", "0", "--num-training", "20",
            "--min-lr", "1e-5", "--max-lr", "1", "--out", str(tmp_path / "runs"), "--name", "find"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "find"
    found = json.loads((run / "lr_find.json").read_text())
    suggestion = found["suggestion"]
    assert np.isfinite(suggestion) and 1e-5 <= suggestion <= 1
    assert f"suggested lr: {suggestion:.3g}" in result.output
    assert found["steps"] == len(found["lr"]) == len(found["loss"]) == len(rates) and 2 < found["steps"] <= 20
    assert suggestion in found["lr"] and found["lr"] == sorted(found["lr"])  # one of the rates tried, rising
    assert found["loss"] == pytest.approx(smoothed_losses(raw)) and found["loss"][0] == pytest.approx(raw[0])
    with Image.open(run / "lr_find.png") as png:
        assert png.format == "PNG" and png.width >= 400
    # the backbone keeps its share of the head's rate through the sweep, as in training (0.3 by default)
    head, backbone = np.array(rates).T
    np.testing.assert_allclose(backbone, 0.3 * head)
    assert head[0] == pytest.approx(1e-5) and head[-1] > 100 * head[0]
    # the run folder's config is the recipe searched, at the suggested rate: train --config takes it
    saved = load_config(run / "config.yaml")
    assert saved.lr == suggestion and saved.arch == "test_efficientnet" and saved.image_size == 32
    assert "# suggested by the learning-rate finder" in (run / "config.yaml").read_text()


@pytest.mark.slow  # the finder (100 steps) and one epoch of a tiny model
def test_train_lr_auto_trains_at_the_suggestion_and_records_it(data: Path, tmp_path: Path) -> None:
    args = ["train", str(data), "--lr", "auto", "--arch", "test_efficientnet", "--weights", "none", "--image-size",
            "32", "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.25", "--freeze-epochs", "0",
            "--warmup-epochs", "0", "--schedule", "none", "--no-onnx", "--out", str(tmp_path / "runs"), "--name", "a"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "a"
    suggestion = json.loads((run / "lr_find.json").read_text())["suggestion"]
    line = next(line for line in (run / "config.yaml").read_text().splitlines() if line.startswith("lr:"))
    assert yaml.safe_load(line)["lr"] == suggestion and "# suggested by the learning-rate finder" in line
    assert suggestion != TrainConfig().lr and (run / "lr_find.png").is_file()
    assert read_meta(run / "bundle").extra["config"]["lr"] == suggestion
    history = read_meta(run / "bundle").extra["history"]
    assert history["lr"] == [pytest.approx(suggestion)]  # the epoch trained at it (no schedule)
    assert f"lr: {suggestion:.3g}, the learning-rate finder's suggestion" in result.output
    resumed = CliRunner().invoke(app, ["train", str(data), "--lr", "auto", "--resume", "--out", str(tmp_path / "runs"),
                                       "--name", "a"])
    assert "a resumed run keeps the learning rate it started with" in str(resumed.exception)


@pytest.mark.slow  # three folds, each with the finder and one epoch
def test_cv_lr_auto_runs_the_finder_on_each_folds_own_training_images(data: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    searched: list[int] = []

    def recording(prepared, config, runtime=None, search=LRSearch(), **options):
        searched.append(len(prepared.train_rows))
        return find_lr(prepared, config, runtime, search, **options)

    monkeypatch.setattr("chestxray.training.cv.find_lr", recording)
    result = cross_validate(data, TrainConfig(**TINY), folds=3, out_dir=tmp_path / "runs", name="cv",
                            progress=False, lr_search=LRSearch(num_training=12))
    lrs = list(result.folds["lr"])
    assert len(lrs) == len(searched) == 3 and all(np.isfinite(lr) and lr > 0 for lr in lrs)
    assert all(n < len(result.oof) * 2 / 3 for n in searched)  # a fold's inner training rows, not the whole pool
    for index, lr in enumerate(lrs):
        assert json.loads((result.run_dir / f"fold{index}" / "lr_find.json").read_text())["suggestion"] == lr
        assert load_config(result.run_dir / f"fold{index}" / "config.yaml").lr == lr
    assert json.loads((result.run_dir / "cv.json").read_text())["lr_find"]["per_fold"] == lrs
