""".venv/bin/python bench/bench_ddp.py [--data FOLDER] [--per-class 60] [--size 128] [--epochs 4] [--processes 2]

Data-parallel throughput on this machine: training and sharded prediction, images per second with
one process on one core, one process on every core, and N processes under ``torchrun`` (the cores
shared out, one process per core at most).

Training: ``chestxray train`` on a two-class subset of the course data with every layer trained
(``--freeze-epochs 0``), the global batch split over the processes (``--strategy ddp``); images/s is
training images over the median epoch time after the first (an epoch's time includes its validation
pass). Prediction: :func:`chestxray.predict.sharded_predict` over the same files, timed on rank 0
from model load to the merged table, median of 3. The cache is built before anything is timed. The
one-core runs set the CPU affinity, which ``chestxray`` sizes its threads by. Communication: the time
of one gloo all-reduce of the model's gradients (what DDP adds to every step), median of 10.
Prints a table and writes ``bench/results/ddp-<date>-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, save_result  # noqa: E402

from chestxray.data.cache import build_cache  # noqa: E402
from chestxray.model.models import create_model  # noqa: E402
from chestxray.data.sources import load_samples  # noqa: E402

CLASSES = ("normal", "covid19")
VAL_FRACTION = 0.25
PREDICT_REPEATS = 3
ALLREDUCE_REPEATS = 10
ARCH = "tf_efficientnet_lite0"


@dataclass
class Setup:
    """How many processes, on which cores (``None``: all of this process's)."""

    processes: int
    cores: set[int] | None = None

    @property
    def label(self) -> str:
        where = "all cores" if self.cores is None else f"{len(self.cores)} core(s)"
        return f"{self.processes} process(es), {where}"

    def run(self, program: list[str]) -> float:
        """Run ``program`` (arguments after ``python``) this way; its wall time in seconds."""
        if self.processes == 1:
            command = [sys.executable, *program]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={self.processes}", *program]
        pin = None if self.cores is None else (lambda: os.sched_setaffinity(0, self.cores))
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, preexec_fn=pin)
        if done.returncode:
            raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-4000:]}")
        return time.perf_counter() - start


def write_manifest(data: Path, per_class: int, out: Path) -> Path:
    """A CSV of the first ``per_class`` images of each of :data:`CLASSES` in ``data``."""
    rows = [{"path": str(f.resolve()), "label": label}
            for label in CLASSES for f in sorted((data / label).iterdir())[:per_class]]
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


def bench_training(setup: Setup, manifest: Path, args: argparse.Namespace, run_dir: Path) -> dict:
    """One training run; epoch times from its ``metrics.csv``."""
    batch = args.batch_size // setup.processes
    program = ["-m", "chestxray.cli", "train", str(manifest), "--out", str(run_dir.parent), "--name", run_dir.name,
               "--image-size", str(args.size), "--epochs", str(args.epochs), "--freeze-epochs", "0",
               "--patience", "100", "--val-fraction", str(VAL_FRACTION), "--batch-size", str(batch),
               "--cache-dir", str(run_dir.parent / "cache")]
    wall = setup.run(program + (["--strategy", "ddp"] if setup.processes > 1 else []))
    history = pd.read_csv(run_dir / "metrics.csv")
    n_train = int((pd.read_csv(run_dir / "split.csv")["subset"] == "train").sum())
    seconds = statistics.median(history["seconds"].iloc[1:]) if len(history) > 1 else history["seconds"].iloc[0]
    return {"setup": setup.label, "processes": setup.processes, "per_process_batch": batch, "train_images": n_train,
            "epoch_seconds": [round(s, 3) for s in history["seconds"]], "images_per_s": round(n_train / seconds, 1),
            "final_val_acc": round(float(history["val_acc"].iloc[-1]), 3), "command_wall_s": round(wall, 1)}


def bench_prediction(setup: Setup, bundle: Path, manifest: Path, batch_size: int, timing: Path) -> dict:
    """Sharded prediction over the manifest's files, timed by rank 0 (see :func:`predict_worker`)."""
    setup.run([__file__, "--predict-worker", str(bundle), str(manifest), str(batch_size), str(timing)])
    result = json.loads(timing.read_text())
    return {"setup": setup.label, "processes": setup.processes, **result,
            "images_per_s": round(result["images"] / result["seconds"], 1)}


def predict_worker(bundle: str, manifest: str, batch_size: str, out: str) -> None:
    """Runs in every process: sharded prediction of the manifest's files, :data:`PREDICT_REPEATS` times;
    rank 0 writes the median time to ``out``."""
    from chestxray.inference.predict import sharded_predict

    files = pd.read_csv(manifest)["path"].tolist()
    seconds = []
    for _ in range(PREDICT_REPEATS):
        start = time.perf_counter()
        table = sharded_predict(bundle, files, batch_size=int(batch_size), progress=False)
        seconds.append(time.perf_counter() - start)
    if table is not None:
        Path(out).write_text(json.dumps({"images": len(table), "seconds": round(statistics.median(seconds), 3),
                                         "all_seconds": [round(s, 3) for s in seconds]}))


def bench_allreduce(setup: Setup, parameters: int, timing: Path) -> dict:
    """One all-reduce of ``parameters`` float32 values across the processes (see :func:`allreduce_worker`)."""
    setup.run([__file__, "--allreduce-worker", str(parameters), str(timing)])
    return {"setup": setup.label, "processes": setup.processes, "megabytes": round(parameters * 4 / 2**20, 1),
            **json.loads(timing.read_text())}


def allreduce_worker(parameters: str, out: str) -> None:
    """Runs in every process: times gloo all-reduces of a gradient-sized tensor; rank 0 writes the median."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    gradients = torch.ones(int(parameters))
    seconds = []
    for _ in range(ALLREDUCE_REPEATS + 2):  # the first two warm up the connections
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(gradients)
        seconds.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"allreduce_ms": round(1000 * statistics.median(seconds[2:]), 1)}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA / "chest_xray_4class" / "train",
                        help=f"class folders including {CLASSES}")
    parser.add_argument("--per-class", type=int, default=60, help="images of each class")
    parser.add_argument("--size", type=int, default=128, help="image size")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch, split over the processes")
    parser.add_argument("--processes", type=int, nargs="+", default=[2], help="process counts besides 1")
    parser.add_argument("--predict-worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--allreduce-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.predict_worker:
        predict_worker(*args.predict_worker)
        return
    if args.allreduce_worker:
        allreduce_worker(*args.allreduce_worker)
        return
    cores = sorted(os.sched_getaffinity(0))
    setups = [Setup(1, {cores[0]}), Setup(1), *(Setup(n) for n in args.processes)]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        manifest = write_manifest(args.data, args.per_class, work / "subset.csv")
        build_cache(load_samples(manifest), args.size, cache_dir=work / "cache", progress=False)
        training = [bench_training(setup, manifest, args, work / f"train{i}") for i, setup in enumerate(setups)]
        bundle = work / "train0" / "bundle"
        prediction = [bench_prediction(setup, bundle, manifest, args.batch_size, work / f"predict{i}.json")
                      for i, setup in enumerate(setups)]
        parameters = sum(p.numel() for p in create_model(ARCH, len(CLASSES), weights="none").parameters())
        communication = [bench_allreduce(setup, parameters, work / f"allreduce{i}.json")
                         for i, setup in enumerate(setups) if setup.processes > 1]
    record = {
        "data": str(args.data), "classes": list(CLASSES), "images": 2 * args.per_class, "image_size": args.size,
        "epochs": args.epochs, "global_batch": args.batch_size, "arch": ARCH, "cpus": len(cores),
        "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "train": training, "predict": prediction, "gradient_allreduce": communication}
    table = Table(title=f"{record['images']} images at {args.size}px, {record['cpus']} CPUs, "
                        f"load {record['load_average_before']} -> {record['load_average_after']}")
    for column in ("task", "setup", "images/s", "vs 1 core"):
        table.add_column(column, justify="right" if column in ("images/s", "vs 1 core") else "left")
    for task, rows in (("train", training), ("predict", prediction)):
        for row in rows:
            table.add_row(task, row["setup"], f"{row['images_per_s']:.1f}",
                          f"{row['images_per_s'] / rows[0]['images_per_s']:.2f}x")
    Console().print(table)
    for row in communication:
        print(f"{row['setup']}: one all-reduce of the {row['megabytes']} MiB of gradients takes {row['allreduce_ms']} ms")
    print(f"written: {save_result('ddp', record)}")


if __name__ == "__main__":
    main()
