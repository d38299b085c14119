"""Distributed runs: torchrun's layout, validation gathered across ranks, the cache built once, data-parallel
training on real X-rays against one process, and sharded prediction identical to one process."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import xray_array
from distributed_helpers import build_logged
from factories import make_bundle, sets_for
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image
from torch.utils.data import DistributedSampler

from chestxray.data.cache import build_cache
from chestxray.training.config import RuntimeSettings, TrainConfig
from chestxray.launch import gather_in_order, trainer_layout
from chestxray.errors import ChestXrayError
from chestxray.inference.predict import load_model, predict_paths, shard
from chestxray.data.sources import load_samples
from chestxray.training.train import fit

# torchrun gives each process one thread unless told otherwise; the single-process runs compared
# with it use one thread too (CPU kernels add in a thread-count-dependent order).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str, processes: int = 2, timeout: float = 300, returncode: int = 0) -> None:
    """``torchrun --standalone --nproc-per-node N ARGS...``, output captured, exit status checked."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    done = subprocess.run(command, env=ONE_THREAD, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == returncode, done.stderr[-3000:]


# ---------------------------------------------------------------------- helpers, no processes


@pytest.mark.parametrize("n", [0, 1, 7, 22, 24])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("block", [1, 3])
def test_shards_are_contiguous_whole_blocks_in_order(n: int, world: int, block: int) -> None:
    items = list(range(n))
    shards = [list(shard(items, rank, world, block)) for rank in range(world)]
    assert sum(shards, []) == items
    assert all(len(s) % block == 0 for s in shards if s and s[-1] != n - 1)
    blocks = [math.ceil(len(s) / block) for s in shards]
    assert max(blocks) - min(blocks) <= 1
    with pytest.raises(ValueError):
        shard(items, world, world)


@pytest.mark.parametrize("total, world", [(7, 2), (7, 3), (2, 3), (12, 4)])
def test_gather_in_order_undoes_the_distributed_sampler(monkeypatch: pytest.MonkeyPatch, total: int,
                                                        world: int) -> None:
    """Each rank's rows as an unshuffled DistributedSampler deals them (padding included), gathered
    back: dataset order, every row once."""
    values = torch.arange(total) * 10
    per_rank = [values[list(DistributedSampler(range(total), world, rank, shuffle=False))] for rank in range(world)]

    def all_gather(parts: list[torch.Tensor], tensor: torch.Tensor) -> None:
        for part, theirs in zip(parts, per_rank):
            part.copy_(theirs)

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    assert torch.equal(gather_in_order(per_rank[0], total), values)


def test_layout_follows_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"RANK": "3", "GROUP_RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "job1"}.items():
        monkeypatch.setenv(name, value)
    layout = trainer_layout(RuntimeSettings(), "cpu", frozen=True)
    assert (layout["devices"], layout["num_nodes"]) == (2, 2)
    assert isinstance(layout["strategy"], DDPStrategy)
    assert layout["strategy"]._ddp_kwargs["find_unused_parameters"]  # frozen weights
    assert not trainer_layout(RuntimeSettings(), "cpu", frozen=False)["strategy"]._ddp_kwargs["find_unused_parameters"]
    assert trainer_layout(RuntimeSettings(devices="2", num_nodes=2), "cpu")["devices"] == 2
    with pytest.raises(ChestXrayError, match="torchrun"):
        trainer_layout(RuntimeSettings(devices="4"), "cpu")
    with pytest.raises(ChestXrayError, match="torchrun"):
        trainer_layout(RuntimeSettings(num_nodes=3), "cpu")


def test_layout_without_torchrun() -> None:
    assert trainer_layout(RuntimeSettings(), "cpu") == {"devices": "auto", "num_nodes": 1, "strategy": "auto"}
    assert isinstance(trainer_layout(RuntimeSettings(devices="2"), "cpu")["strategy"], DDPStrategy)
    assert trainer_layout(RuntimeSettings(devices="2", strategy="ddp_spawn"), "cpu")["strategy"] == "ddp_spawn"


# ---------------------------------------------------------------------- the cache, built once


@pytest.mark.slow
def test_concurrent_builders_decode_once(make_folder, tmp_path: Path) -> None:
    folder = make_folder({"a": 3, "b": 3})
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    log = tmp_path / "decoders.log"
    builders = [context.Process(target=build_logged, args=(str(folder), str(tmp_path / "cache"), str(log), start))
                for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join(120)
    assert [builder.exitcode for builder in builders] == [0, 0]
    assert len(log.read_text().split()) == 1
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".npy"]
    built = build_cache(load_samples(folder), 16, cache_dir=tmp_path / "cache", progress=False)
    assert built.images.shape == (6, 16, 16) and built.images.any()


# ---------------------------------------------------------------------- sharded prediction


@pytest.mark.slow
def test_sharded_prediction_equals_one_process(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle", conformal=sets_for(0.001))  # every set holds both classes
    images = tmp_path / "images"
    for i in range(12):
        folder = images / "sub" if i % 3 else images
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(xray_array(40 + i, 50, seed=i)).save(folder / f"x{i:02d}.png")
    (images / "broken.png").write_bytes(b"not an image")
    (tmp_path / "empty").mkdir()
    inputs = [str(images), str(tmp_path / "missing.png"), str(images / "sub" / "*.png"), str(tmp_path / "empty")]
    batch = 3  # 23 rows: rank 0 predicts 4 batches, rank 1 the other 4 (the last one short)
    torchrun("-m", "chestxray.cli", "predict", str(bundle), *inputs, "--format", "csv", "--out",
             str(tmp_path / "sharded.csv"), "--batch-size", str(batch), "--coverage", "0.6",
             returncode=1)  # 1: some inputs failed
    predictor, threads = load_model(bundle, device="cpu", coverage=0.6), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = predict_paths(predictor, inputs, batch, False)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "sharded.csv").read_text() == single.to_csv(index=False)
    table = pd.read_csv(tmp_path / "sharded.csv")
    assert len(table) == 23 and table["error"].notna().sum() == 3  # broken, missing, empty folder
    assert table["reasons"].str.contains("the 60% prediction set").any()  # every rank took --coverage
    any_threads = predict_paths(predictor, inputs, batch, False)
    np.testing.assert_allclose(table[["normal", "pneumonia"]], any_threads[["normal", "pneumonia"]].astype(float),
                               rtol=1e-6)


# ---------------------------------------------------------------------- data-parallel training


@pytest.fixture
def xray_subset(course_data: Path, tmp_path: Path) -> Path:
    """A manifest of 101 course images, normal vs COVID-19: 20 + 20 train, 31 + 30 validation (odd,
    so the 2-rank sampler pads)."""
    rows = []
    for label, n_val in (("normal", 31), ("covid19", 30)):
        files = sorted((course_data / "train" / label).iterdir())[:20 + n_val]
        rows += [{"path": str(f), "label": label, "split": "train" if i < 20 else "val"} for i, f in enumerate(files)]
    pd.DataFrame(rows).to_csv(tmp_path / "subset.csv", index=False)
    return tmp_path / "subset.csv"


RUN = dict(image_size=64, epochs=3, freeze_epochs=1, lr=1e-3, seed=0)  # Lite0, offline ImageNet weights


@pytest.mark.slow
def test_ddp_training_matches_one_process(xray_subset: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"  # cold: both ranks ask for the cache at once
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in RUN.items()]
    torchrun("-m", "chestxray.cli", "train", str(xray_subset), "--out", str(tmp_path / "runs"), "--name", "ddp",
             *flags, "--batch-size=4", "--strategy=ddp", "--cache-dir", str(cache_dir), timeout=600)
    run = tmp_path / "runs" / "ddp"
    assert sorted(p.name for p in run.iterdir()) == ["bundle", "checkpoints", "config.yaml", "curves.png",
                                                      "environment.json", "logs", "metrics.csv", "split.csv"]
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".json", ".npy"]
    ddp = json.loads((run / "bundle" / "model.json").read_text())["metrics"]
    history = pd.read_csv(run / "metrics.csv")
    assert list(history["epoch"]) == [1, 2, 3]
    # the gathered validation (every image once, padding dropped) equals rank 0's own pass over the set
    assert history["val_loss"].min() == pytest.approx(ddp["val_loss"], rel=1e-4)

    # one process, same seed and data, same global batch (8 = 2 ranks x 4)
    single = fit(xray_subset, TrainConfig(**RUN, batch_size=8), out_dir=tmp_path / "runs", name="one",
                 cache_dir=cache_dir, progress=False).metrics
    n = int((pd.read_csv(xray_subset)["split"] == "val").sum())
    # DDP changes the sampler order and each rank's batch-norm statistics, so the runs differ: allow
    # 3 standard errors of a difference of two accuracies on n images (pooled, Agresti-Coull adjusted)
    pooled = (round((single["val_acc"] + ddp["val_acc"]) * n) + 2) / (2 * n + 4)
    tolerance = 3 * math.sqrt(2 * pooled * (1 - pooled) / n)
    assert abs(ddp["val_acc"] - single["val_acc"]) <= tolerance, (ddp, single, tolerance)
    assert ddp["val_acc"] > 0.5 + 2 * math.sqrt(0.25 / n), ddp  # and it learned: better than chance


def test_a_lost_peer_is_named_in_one_line_only_inside_a_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    from chestxray.launch import peer_lost

    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:9138. This is ...")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert peer_lost(gloo) is None  # one process: nothing to blame on a peer
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    line = peer_lost(gloo)
    assert line is not None and "\n" not in line and "(4 processes)" in line and "rank 2" in line and "--resume" in line
    assert peer_lost(ValueError("a bad option")) is None
