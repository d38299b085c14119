"""``cv``, ``sweep`` and ``adapt`` killed (SIGKILL) mid-run, then run again (issue 28), each as a user runs
it: a ``chestxray`` process on tiny data. Nothing half-written may block the rerun or pass for a result:
a cross-validation or sweep folder without its last file (``cv.json``, ``best.yaml``) is an interrupted
run and a rerun replaces it, saying so, while a complete one is still refused; ``adapt`` writes its child
bundle beside ``--out`` and moves it in only once complete. None of them resumes: a rerun starts over.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from factories import make_bundle, write_xrays

CLI = [sys.executable, "-c", "from chestxray.cli import run; run()"]
TINY_FLAGS = ["--arch", "test_efficientnet", "--weights", "none", "--image-size", "32", "--epochs", "2",
              "--batch-size", "8", "--freeze-epochs", "0", "--warmup-epochs", "0"]


def _kill_when(args: list[str], ready: Callable[[], bool], timeout: float = 240) -> None:
    """Start ``chestxray ARGS`` and SIGKILL it as soon as ``ready()`` (a progress marker on disk)."""
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"ended (exit {process.returncode}) before the marker: {process.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "no progress marker in time"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(30)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL  # killed, not finished


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_xrays(tmp_path / "data")


@pytest.mark.slow  # three chestxray processes, two of them training
@pytest.mark.timeout(600)
def test_cv_killed_mid_fold_is_rerun_over_its_remains(tmp_path, data):
    """Before: the rerun was refused ('already holds a run') though the killed run had no result."""
    run = tmp_path / "runs" / "k"
    args = ["cv", str(data), "--folds", "2", "--out", str(tmp_path / "runs"), "--name", "k", *TINY_FLAGS]
    _kill_when(args, lambda: (run / "fold0" / "metrics.csv").is_file())
    assert not (run / "cv.json").exists()
    again = _run(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "held an incomplete run (no cv.json" in again.stderr
    assert (run / "cv.json").is_file() and (run / "oof.csv").is_file() and (run / "fold1").is_dir()
    complete = _run(args)  # a finished cross-validation is still never replaced without --overwrite
    assert complete.returncode != 0 and "already holds a run" in complete.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_killed_after_a_trial_is_rerun_over_its_remains(tmp_path, data):
    run = tmp_path / "runs" / "s"
    args = ["sweep", str(data), "--trials", "3", "--out", str(tmp_path / "runs"), "--name", "s", *TINY_FLAGS]
    _kill_when(args, lambda: (run / "trials.csv").is_file())
    assert not (run / "best.yaml").exists()
    again = _run(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "held an incomplete run (no best.yaml" in again.stderr and (run / "best.yaml").is_file()
    bundles = list((run / "trials").glob("*/bundle/model.json"))
    assert len(bundles) == 1  # the winner's bundle, written before best.yaml


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_adapt_killed_while_writing_the_child_leaves_no_half_bundle_and_reruns(tmp_path, data):
    """Before: the child was written into --out file by file, so a kill during its ONNX export left a
    bundle without its graph; now --out holds nothing of it until every file is written."""
    from chestxray.model.bundle import read_meta

    parent = make_bundle(tmp_path / "parent")
    child, staging = tmp_path / "child", tmp_path / ".child.partial"
    args = ["adapt", str(parent), str(data / "train"), "--out", str(child), "--mode", "finetune", "--folds", "2",
            "--n-boot", "20", "--epochs", "1", "--batch-size", "8", "--freeze-epochs", "0", "--warmup-epochs", "0"]
    _kill_when(args, lambda: (staging / "model.json").is_file() or (child / "model.json").is_file())
    assert not child.exists(), sorted(p.name for p in child.iterdir())
    again = _run(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not staging.exists()
    names = {p.name for p in child.iterdir()}
    assert {"model.json", "model.safetensors", "model.onnx", "adaptation.json", "adaptation.html"} <= names, names
    assert "model.onnx" in read_meta(child).files  # the graph's sha256 recorded, as any bundle's
