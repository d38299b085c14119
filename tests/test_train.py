"""Training: a tiny run end to end, resume after a kill, bundle round trip, multi-label, config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from chestxray.model.bundle import load_bundle
from chestxray.training.config import TrainConfig, load_config
from chestxray.errors import ChestXrayError
from chestxray.model.runners import as_runner, run_images
from chestxray.model.models import create_model
from chestxray.training.train import ClassifierModule, fit, run_directory

TINY = dict(arch="tf_efficientnet_lite0", weights="none", image_size=32, epochs=2, batch_size=8,
            freeze_epochs=1, warmup_epochs=0)


def _write_classes(root: Path, per_class: int = 12) -> Path:
    """Two visibly different classes: dark images with a bright disc vs bright images."""
    rng = np.random.default_rng(0)
    for label, base in (("normal", 60), ("pneumonia", 170)):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(base, 20, (40, 40)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"person{i}_{label}_{i}.png")
    return root


@pytest.mark.slow
def test_tiny_run_writes_run_directory_and_bundle(tmp_path: Path) -> None:
    data = _write_classes(tmp_path / "data")
    result = fit(data, TrainConfig(**TINY), out_dir=tmp_path / "runs", name="tiny", progress=False)
    run = result.run_dir
    for name in ("config.yaml", "environment.json", "split.csv", "metrics.csv", "curves.png", "checkpoints/last.ckpt",
                 "bundle/model.safetensors", "bundle/model.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "environment.json").read_text())["allocator"] == "system"  # tests: see conftest
    history = pd.read_csv(run / "metrics.csv")
    assert list(history["epoch"]) == [1, 2]
    assert {"train_loss", "val_loss", "val_acc", "val_auc", "lr", "lr_backbone"} <= set(history.columns)
    logged = pd.read_csv(run / "logs" / "metrics.csv")  # Lightning's CSVLogger: every parameter group's rate
    assert {"lr-AdamW/pg1", "lr-AdamW/pg2", "val_loss"} <= set(logged.columns)
    split = pd.read_csv(run / "split.csv")
    train_patients = set(split[split.subset == "train"].patient_id)
    assert not train_patients & set(split[split.subset == "val"].patient_id)
    assert load_config(run / "config.yaml") == TrainConfig(**TINY)
    model, meta = load_bundle(result.bundle_dir)
    assert meta.classes == ["normal", "pneumonia"] and meta.image_size == 32
    assert meta.temperature > 0 and "val_acc" in meta.metrics
    assert set(meta.operating_points) == {"normal", "pneumonia"}  # chosen on the validation images
    assert set(meta.operating_points["normal"]) == {"youden", "sensitivity_90", "sensitivity_95"}


@pytest.mark.slow
def test_bundle_outputs_match_trained_model(tmp_path: Path) -> None:
    data = _write_classes(tmp_path / "data")
    result = fit(data, TrainConfig(**{**TINY, "epochs": 1}), out_dir=tmp_path / "runs", name="r", progress=False)
    model, _ = load_bundle(result.bundle_dir)
    reloaded, _ = load_bundle(result.bundle_dir)
    images = np.random.default_rng(1).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    assert np.array_equal(run_images(as_runner(model), images)[0], run_images(as_runner(reloaded), images)[0])


@pytest.mark.slow
def test_seed_makes_runs_repeatable_with_and_without_mixup(tmp_path: Path) -> None:
    data = _write_classes(tmp_path / "data")
    plain = TrainConfig(**{**TINY, "epochs": 1, "mixup": 0.0})
    mixed = plain.replace(mixup=0.4)
    first, second, third, fourth = (fit(data, config, out_dir=tmp_path / "runs", name=name, progress=False).history
                                    for config, name in [(plain, "a"), (plain, "b"), (mixed, "c"), (mixed, "d")])
    assert np.allclose(first["val_loss"], second["val_loss"], atol=1e-5)
    assert np.allclose(third["train_loss"], fourth["train_loss"], atol=1e-5)
    assert not np.allclose(first["train_loss"], third["train_loss"], rtol=0, atol=1e-5)  # mixup changed the loss


@pytest.mark.slow
def test_multilabel_training_from_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        pixels = rng.integers(0, 255, (32, 32), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i:08d}_000.png")
        labels = ["Effusion|Cardiomegaly", "No Finding", "Effusion", "Cardiomegaly"][i % 4]
        rows.append({"path": f"{i:08d}_000.png", "label": labels})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    result = fit(tmp_path / "labels.csv", TrainConfig(**{**TINY, "epochs": 1, "mixup": 0.4}), out_dir=tmp_path / "runs",
                 name="ml", progress=False)
    model, meta = load_bundle(result.bundle_dir)
    assert meta.task == "multilabel" and meta.classes == ["Cardiomegaly", "Effusion"]
    logits = run_images(as_runner(model), np.zeros((2, 32, 32), np.uint8))[0]
    assert logits.shape == (2, 2)


@pytest.mark.slow
def test_resume_after_killed_run(tmp_path: Path) -> None:
    """Kill a training process after its first checkpoint, resume it, and get every epoch."""
    data = _write_classes(tmp_path / "data", per_class=16)
    runs = tmp_path / "runs"
    args = [sys.executable, "-m", "chestxray.cli", "train", str(data), "--out", str(runs), "--name", "k",
            "--arch", "tf_efficientnet_lite0", "--weights", "none", "--image-size", "32", "--epochs", "30",
            "--batch-size", "4", "--freeze-epochs", "0", "--patience", "100"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    last = runs / "k" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not (last.is_file() and (runs / "k" / "metrics.csv").is_file()) and time.monotonic() < deadline:
        assert process.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.2)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(pd.read_csv(runs / "k" / "metrics.csv"))
    assert 1 <= done < 30, "the run should have been killed part-way"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    config = load_config(runs / "k" / "config.yaml").replace(epochs=checkpoint["epoch"] + 2)
    (runs / "k" / "config.yaml").write_text(__import__("yaml").safe_dump(config.to_dict()))
    result = fit(data, None, out_dir=runs, name="k", resume=True, progress=False)
    epochs = list(result.history["epoch"])
    assert epochs == list(range(1, config.epochs + 1))
    assert (result.bundle_dir / "model.safetensors").is_file()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ChestXrayError, match="no checkpoint"):
        fit(tmp_path, None, out_dir=tmp_path, name="missing", resume=True)


@pytest.mark.slow
def test_ema_weights_are_validated_checkpointed_and_bundled(tmp_path: Path) -> None:
    data = _write_classes(tmp_path / "data")
    result = fit(data, TrainConfig(**{**TINY, "ema": 0.5}), out_dir=tmp_path / "runs", name="ema", progress=False)
    best = torch.load(result.run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    averaged, raw = best["state_dict"], best["current_model_state"]
    name = next(k for k in averaged if k.endswith("classifier.weight"))
    assert not torch.equal(averaged[name], raw[name])  # the average lags the optimiser's weights
    bundled = load_bundle(result.bundle_dir)[0].state_dict()
    assert torch.equal(bundled[name.removeprefix("model.")], averaged[name])


@pytest.mark.slow
def test_progressive_resizing_grows_the_training_images_to_full_size(tmp_path: Path) -> None:
    assert [TrainConfig(image_size=384, resize_start=2 / 3, epochs=5).train_size(e) for e in range(6)] == \
        [256, 288, 320, 352, 384, 384]
    assert {TrainConfig(image_size=384).train_size(e) for e in range(15)} == {384}

    seen: list[tuple[bool, int]] = []

    class InputSizes(Callback):
        def on_fit_start(self, trainer, module) -> None:
            module.model.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[-1])))

    config = TrainConfig(**{**TINY, "image_size": 64, "resize_start": 0.5, "epochs": 3})
    result = fit(_write_classes(tmp_path / "data"), config, out_dir=tmp_path / "runs", name="grow",
                 progress=False, callbacks=[InputSizes()])
    assert result.history["train_px"].tolist() == [32, 64, 64]
    assert {side for training, side in seen if training} == {32, 64}
    assert {side for training, side in seen if not training} == {64}  # validation always at full size


def test_frozen_stages_stay_frozen_after_the_frozen_first_epochs() -> None:
    model = create_model("tf_efficientnet_lite0", num_classes=2, weights="none")
    module = ClassifierModule(model, TrainConfig(freeze_epochs=0, frozen_stride=2))
    module.on_train_epoch_start()  # epoch 0, past the (zero) head-only epochs: the backbone trains...
    frozen = {name for name, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen and all(name.startswith(("conv_stem.", "bn1.", "blocks.0.")) for name in frozen)  # ...but not them
    assert all(p.requires_grad for name, p in model.backbone.named_parameters() if name.startswith("blocks.1."))


def test_config_validation_and_yaml_overrides(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("epochs: 7\noptimizer: sgd\n")
    config = load_config(tmp_path / "c.yaml", epochs=3, lr=None)
    assert config.epochs == 3 and config.optimizer == "sgd"
    with pytest.raises(ChestXrayError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ChestXrayError, match="mixup"):
        TrainConfig(mixup=-1)
    with pytest.raises(ChestXrayError, match="ema must be"):
        TrainConfig(ema=1.0)
    with pytest.raises(ChestXrayError, match="resize_start"):
        TrainConfig(resize_start=0)
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    with pytest.raises(ChestXrayError, match="epochz"):
        load_config(tmp_path / "bad.yaml")


def test_an_existing_run_is_never_silently_replaced(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("epochs: 1\n")
    (run / "checkpoints").mkdir()
    with pytest.raises(ChestXrayError, match="already holds a run.*--resume.*--overwrite"):
        run_directory(tmp_path / "runs", "x")
    assert run_directory(tmp_path / "runs", "x", resume=True) == run and (run / "config.yaml").is_file()
    assert run_directory(tmp_path / "runs", "x", overwrite=True) == run and not run.exists()
    (tmp_path / "runs" / "notes.txt").write_text("mine")
    with pytest.raises(ChestXrayError, match="not a run folder"):
        run_directory(tmp_path, "runs", overwrite=True)
    assert (tmp_path / "runs" / "notes.txt").is_file()
    assert run_directory(tmp_path / "runs", "fresh") == tmp_path / "runs" / "fresh"


@pytest.mark.parametrize("name", ["../../escape", "../x", "a/../../b", ".", "/tmp/absolute-run"])
def test_a_run_name_never_leads_outside_out(tmp_path: Path, name: str) -> None:
    out = tmp_path / "runs"
    with pytest.raises(ChestXrayError, match="--name") as raised:
        run_directory(out, name)
    assert "\n" not in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing made anywhere


def test_a_run_name_through_a_link_out_of_out_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    out.mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ChestXrayError, match="outside --out"):
        run_directory(out, "link/run")
    assert run_directory(out, "group/run") == out / "group" / "run"  # a nested name inside --out is fine


@pytest.mark.slow
def test_a_terminal_shows_one_progress_display_numbered_like_the_epoch_lines(tmp_path: Path, monkeypatch) -> None:
    """Our bar alone (never Lightning's ``Epoch 0/1 ... 0.00it/s``), the summaries printed above it and
    numbered the same way, a measured rate, and no bar left once training ends; the last epoch logs
    the learning rate it trained at (a cosine schedule reaches 0 only after its last step)."""
    import io
    import re

    from rich.console import Console

    import chestxray.training.train as train

    screen = io.StringIO()
    monkeypatch.setattr(train, "console", Console(file=screen, force_terminal=True, width=100, color_system=None))
    data = _write_classes(tmp_path / "data")
    result = fit(data, TrainConfig(**TINY), out_dir=tmp_path / "runs", name="bar", progress=True)
    shown = screen.getvalue()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)
    assert "Epoch 0" not in text and "it/s" not in text  # Lightning's bar is gone
    assert re.search(r"epoch 1/2 training .* \d+/\d+ \d+\.\d img/s", text) and "epoch 2/2 validating" in text
    summaries = [line for line in text.splitlines() if re.match(r"epoch \d/2  train_loss", line)]
    assert [line[:9] for line in summaries] == ["epoch 1/2", "epoch 2/2"]  # each on its own line
    assert shown.rstrip().endswith("\x1b[2K") or "img/s" not in shown.splitlines()[-1]  # the bar was erased
    assert (result.history["lr"] > 0).all() and (result.history["lr_backbone"] > 0).all()
