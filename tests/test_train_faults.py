"""Training under faults (issue 17): a checkpoint after every epoch and an exact resume, damaged or
hostile checkpoints, data a classifier cannot learn from, and a full disk under the run folder."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from chestxray.training.config import TrainConfig
from chestxray.errors import ChestXrayError
from chestxray.training.train import fit
from factories import TINY

FAST = {**TINY, "epochs": 4, "patience": 100, "batch_size": 4}


def _two_classes(root: Path, per_class: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for label, base in (("normal", 70), ("pneumonia", 160)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(base, 25, (36, 36)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"p{label}{i}_{i}.png")
    return root


class _Crash(Callback):
    """Fails in the middle of epoch ``at`` (0-based), as a killed process would stop there; before each
    epoch it checks that ``last.ckpt`` holds the previous one."""

    def __init__(self, last: Path, at: int) -> None:
        self.last, self.at, self.seen = last, at, []

    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch:
            self.seen.append(torch.load(self.last, map_location="cpu", weights_only=True)["epoch"])

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        if trainer.current_epoch == self.at and batch_index == 1:
            raise RuntimeError("simulated kill")


@pytest.mark.slow  # trains, is killed and resumes, three times
@pytest.mark.parametrize("recipe", [{}, {"freeze_epochs": 1}, {"freeze_epochs": 1, "batch_norm": "frozen"}],
                         ids=["plain", "frozen-first-epoch", "frozen-statistics"])
def test_last_checkpoint_after_every_epoch_and_an_exact_resume(tmp_path, recipe):
    """Before: last.ckpt was written only when val_loss improved (up to `patience` epochs lost), and
    the re-run epoch gave other numbers; after a frozen first epoch batch norm stayed in eval mode for
    the rest of an uninterrupted run but trained in a resumed one (val_loss 1.134 against 0.792)."""
    data = _two_classes(tmp_path / "data")
    config = TrainConfig(**{**FAST, **recipe})
    whole = fit(data, config, out_dir=tmp_path / "runs", name="whole", progress=False).history
    last = tmp_path / "runs" / "cut" / "checkpoints" / "last.ckpt"
    crash = _Crash(last, at=3)
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(data, config, out_dir=tmp_path / "runs", name="cut", progress=False, callbacks=[crash])
    assert crash.seen == [0, 1, 2]  # a checkpoint after each finished epoch, whatever val_loss did
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 2
    resumed = fit(data, None, out_dir=tmp_path / "runs", name="cut", resume=True, progress=False).history
    assert list(resumed["epoch"]) == [1, 2, 3, 4]
    for column in ("train_loss", "val_loss", "val_acc"):
        np.testing.assert_allclose(resumed[column], whole[column], rtol=1e-6, atol=1e-7, err_msg=column)


class _Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/chestxray-unpickled-marker")


@pytest.mark.slow  # trains a run to get a checkpoint (4-5 s on shared cores, at the fast tier's limit)
def test_a_damaged_or_hostile_checkpoint_is_refused_in_one_line(tmp_path):
    """Before: UnpicklingError / PytorchStreamReader tracebacks (nothing was unpickled even then)."""
    data = _two_classes(tmp_path / "data")
    fit(data, TrainConfig(**{**FAST, "epochs": 1}), out_dir=tmp_path / "runs", name="r", progress=False)
    last = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    MARKER.unlink(missing_ok=True)
    damages = {
        "zeroed": b"\0" * len(good),
        "truncated": good[: len(good) // 2],
        "hostile": None,
        "other model": None,
    }
    for kind, content in damages.items():
        if kind == "hostile":
            torch.save({"state_dict": {}, "epoch": 0, "payload": _Hostile()}, last)
        elif kind == "other model":
            torch.save({"state_dict": {"model.x": torch.zeros(3)}, "epoch": 0}, last)
        else:
            last.write_bytes(content)
        with pytest.raises(ChestXrayError) as err:
            fit(data, None, out_dir=tmp_path / "runs", name="r", resume=True, progress=False)
        message = str(err.value)
        assert "\n" not in message and str(last) in message, (kind, message)
    assert not MARKER.exists()  # nothing was unpickled


def test_data_a_classifier_cannot_learn_from_is_refused_before_training(tmp_path, make_folder):
    """Before: IndexError after a full epoch (one class); sklearn's ValueError (every file unreadable)."""
    one = make_folder({"normal": 6}, root="one")
    with pytest.raises(ChestXrayError, match="all of one class"):
        fit(one, TrainConfig(**FAST), out_dir=tmp_path / "runs", progress=False)
    broken = make_folder({"normal": 3, "pneumonia": 3}, root="broken")
    for path in broken.rglob("*.png"):
        path.write_bytes(b"not an image")
    with pytest.raises(ChestXrayError, match="none of the 6 training images could be read") as err:
        fit(broken, TrainConfig(**FAST), out_dir=tmp_path / "runs", progress=False)
    assert "not a readable image" in str(err.value)
    assert not (tmp_path / "runs").exists()  # refused before any run folder was made


def test_the_same_image_under_two_labels_is_refused(tmp_path, make_folder):
    """Before: trained silently on contradicting labels."""
    root = make_folder({"normal": 4, "pneumonia": 4})
    rows = [{"path": str(p), "label": p.parent.name} for p in sorted(root.rglob("*.png"))]
    rows.append({"path": rows[0]["path"], "label": "pneumonia"})  # one manifest row twice, another label
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(ChestXrayError, match="listed under more than one label"):
        fit(tmp_path / "labels.csv", TrainConfig(**FAST), out_dir=tmp_path / "runs", progress=False)
    shutil.copy(root / "normal" / "normal_0.png", root / "pneumonia" / "copy_of_normal_0.png")  # a copied file
    with pytest.raises(ChestXrayError, match="the same image is labelled") as err:
        fit(root, TrainConfig(**FAST), out_dir=tmp_path / "runs", progress=False)
    assert "normal_0.png" in str(err.value) and "copy_of_normal_0.png" in str(err.value)


def _full_disk_for(name: str, monkeypatch) -> None:
    """Writes of files called ``name`` (under their temporary names) fail with ENOSPC."""
    import chestxray.storage as storage

    real = storage.os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(storage.os, "replace", replace)


def test_a_full_disk_under_the_run_folder_is_one_line_and_leaves_no_empty_file(tmp_path, monkeypatch):
    """Before: an OSError traceback and an empty config.yaml."""
    data = _two_classes(tmp_path / "data")
    _full_disk_for("config.yaml", monkeypatch)
    with pytest.raises(ChestXrayError) as err:
        fit(data, TrainConfig(**FAST), out_dir=tmp_path / "runs", name="r", progress=False)
    assert "config.yaml" in str(err.value) and "disk is full" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in (tmp_path / "runs" / "r").iterdir()) == []


@pytest.mark.slow  # trains (and resumes) real runs
def test_a_full_disk_while_checkpointing_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
    from lightning.fabric.plugins import TorchCheckpointIO

    data = _two_classes(tmp_path / "data")
    real = TorchCheckpointIO.save_checkpoint
    calls = []

    def save(self, checkpoint, path, storage_options=None):
        calls.append(checkpoint["epoch"])
        if checkpoint["epoch"] >= 1:
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", save)
    with pytest.raises(ChestXrayError) as err:
        fit(data, TrainConfig(**FAST), out_dir=tmp_path / "runs", name="r", progress=False)
    message = str(err.value)
    assert "disk is full" in message and "--resume --name r" in message and "\n" not in message
    checkpoints = tmp_path / "runs" / "r" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0
    assert not [p for p in checkpoints.iterdir() if p.name.endswith(".tmp")]


class _KillAfterRow(Callback):
    """Dies at the end of epoch ``at`` (0-based) after ``metrics.csv`` got the epoch's row but before
    ``last.ckpt`` holds the epoch (Lightning runs checkpoint callbacks after the others)."""

    def __init__(self, metrics: Path, at: int) -> None:
        self.metrics, self.at = metrics, at

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.current_epoch == self.at:
            assert len(pd.read_csv(self.metrics)) == self.at + 1  # the row is written
            raise RuntimeError("simulated kill between the row and the checkpoint")


@pytest.mark.slow  # trains (and resumes) real runs
def test_a_kill_between_the_metrics_row_and_the_checkpoint_resumes_to_the_same_rows(tmp_path):
    """Before: a kill 0.3 s after row 2 resumed from epoch 1 and rewrote row 2 with other numbers."""
    data = _two_classes(tmp_path / "data")
    config = TrainConfig(**{**FAST, "epochs": 3, "freeze_epochs": 1})
    whole = fit(data, config, out_dir=tmp_path / "runs", name="whole", progress=False).history
    run = tmp_path / "runs" / "cut"
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(data, config, out_dir=tmp_path / "runs", name="cut", progress=False,
            callbacks=[_KillAfterRow(run / "metrics.csv", at=1)])
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0
    resumed = fit(data, None, out_dir=tmp_path / "runs", name="cut", resume=True, progress=False).history
    assert list(resumed["epoch"]) == [1, 2, 3] and list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1, 2, 3]
    for column in ("train_loss", "val_loss", "val_acc"):
        np.testing.assert_allclose(resumed[column], whole[column], rtol=1e-6, atol=1e-7, err_msg=column)


@pytest.mark.slow  # trains (and resumes) real runs
def test_the_same_seed_gives_the_same_run_with_any_number_of_workers(tmp_path):
    """Before: the loader drew its order and its workers' seeds from the global generator, so
    --num-workers 2 gave other losses than --num-workers 0 with the same seed. Each run is a process of
    its own, as a user's is (loader workers forked from a long test session can stall on its state)."""
    import json
    import subprocess
    import sys

    data = _two_classes(tmp_path / "data")
    script = ("import json, sys\n"
              "from chestxray.config import RuntimeSettings, TrainConfig\n"
              "from chestxray.train import fit\n"
              "config = TrainConfig(**json.loads(sys.argv[1]))\n"
              "run = fit(sys.argv[2], config, RuntimeSettings(num_workers=int(sys.argv[3])), out_dir=sys.argv[4],\n"
              "          name='w' + sys.argv[3], progress=False)\n"
              "print(run.history.to_json(orient='records'))\n")
    settings = json.dumps({**FAST, "epochs": 3, "freeze_epochs": 1})
    runs = []
    for workers in (0, 2):
        done = subprocess.run([sys.executable, "-c", script, settings, str(data), str(workers), str(tmp_path / "runs")],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(pd.DataFrame(json.loads(done.stdout.strip().splitlines()[-1])))
    for column in ("train_loss", "val_loss", "val_acc"):
        np.testing.assert_allclose(runs[1][column], runs[0][column], rtol=1e-6, atol=1e-7, err_msg=column)
