"""Data-parallel throughput on this machine: training and sharded prediction, images per second with
1 process (all cores) and with N processes under ``torchrun`` (the cores shared out).

    .venv/bin/python bench/bench_ddp.py [--data FOLDER] [--per-class 60] [--size 128] [--epochs 4] [--processes 1 2]

Training: ``chestxray train`` on a two-class subset of the course data, every layer trained
(``--freeze-epochs 0``), one process per run or ``torchrun --nproc-per-node N ... --strategy ddp``;
images/s is training images over the median epoch time after the first (an epoch's time includes its
validation pass). Prediction: :func:`chestxray.distributed.sharded_predict` over the same files, timed
on rank 0 from model load to the merged table, median of 3. The cache is built before anything is timed.
Prints a table and writes ``bench/results/ddp-<date>-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from chestxray.cache import build_cache
from chestxray.sources import load_samples

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(os.environ.get("CHESTXRAY_DATA", "../shared/datasets")) / "chest_xray_4class" / "train"
CLASSES = ("normal", "covid19")
VAL_FRACTION = 0.25


def launcher(processes: int) -> list[str]:
    """The command prefix that starts ``processes`` copies of a Python program (one: plain Python)."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]


def write_manifest(data: Path, per_class: int, out: Path) -> Path:
    """A CSV of the first ``per_class`` images of each of :data:`CLASSES` in ``data``."""
    rows = [{"path": str(f.resolve()), "label": label}
            for label in CLASSES for f in sorted((data / label).iterdir())[:per_class]]
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


def bench_training(manifest: Path, processes: int, args: argparse.Namespace, work: Path) -> dict:
    """One training run; epoch times from its ``metrics.csv``."""
    name = f"train-{processes}"
    command = [*launcher(processes), "-m", "chestxray.cli", "train", str(manifest), "--out", str(work),
               "--name", name, "--image-size", str(args.size), "--epochs", str(args.epochs),
               "--freeze-epochs", "0", "--patience", "100", "--val-fraction", str(VAL_FRACTION),
               "--batch-size", str(args.batch_size // processes), "--cache-dir", str(work / "cache")]
    if processes > 1:
        command += ["--strategy", "ddp"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    history = pd.read_csv(work / name / "metrics.csv")
    n_train = int((pd.read_csv(work / name / "split.csv")["subset"] == "train").sum())
    seconds = statistics.median(history["seconds"].iloc[1:]) if len(history) > 1 else history["seconds"].iloc[0]
    return {"processes": processes, "per_process_batch": args.batch_size // processes, "train_images": n_train,
            "epoch_seconds": [round(s, 3) for s in history["seconds"]], "images_per_s": round(n_train / seconds, 1),
            "final_val_acc": round(float(history["val_acc"].iloc[-1]), 3), "command_wall_s": round(wall, 1)}


def bench_prediction(bundle: Path, manifest: Path, processes: int, batch_size: int, work: Path) -> dict:
    """One sharded prediction over the manifest's files, timed by rank 0 (see :func:`predict_worker`)."""
    timing = work / f"predict-{processes}.json"
    subprocess.run([*launcher(processes), __file__, "--predict-worker", str(bundle), str(manifest),
                    str(batch_size), str(timing)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads(timing.read_text())
    return {"processes": processes, **result, "images_per_s": round(result["images"] / result["seconds"], 1)}


def predict_worker(bundle: str, manifest: str, batch_size: str, out: str) -> None:
    """Runs in every process: sharded prediction of the manifest's files, 3 times; rank 0 writes the
    median time to ``out``."""
    from chestxray.distributed import sharded_predict

    files = pd.read_csv(manifest)["path"].tolist()
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        table = sharded_predict(bundle, files, batch_size=int(batch_size), progress=False)
        seconds.append(time.perf_counter() - start)
    if table is not None:
        Path(out).write_text(json.dumps({"images": len(table), "seconds": round(statistics.median(seconds), 3),
                                         "all_seconds": [round(s, 3) for s in seconds]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"class folders including {CLASSES}")
    parser.add_argument("--per-class", type=int, default=60, help="images of each class")
    parser.add_argument("--size", type=int, default=128, help="image size")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch, split over the processes")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--predict-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.predict_worker:
        predict_worker(*args.predict_worker)
        return
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        manifest = write_manifest(args.data, args.per_class, work / "subset.csv")
        build_cache(load_samples(manifest), args.size, cache_dir=work / "cache", progress=False)
        training = [bench_training(manifest, n, args, work) for n in args.processes]
        bundle = work / f"train-{args.processes[0]}" / "bundle"
        prediction = [bench_prediction(bundle, manifest, n, args.batch_size, work) for n in args.processes]
    record = {
        "created": datetime.now().isoformat(timespec="seconds"), "data": str(args.data), "classes": list(CLASSES),
        "images": 2 * args.per_class, "image_size": args.size, "epochs": args.epochs, "global_batch": args.batch_size,
        "arch": "tf_efficientnet_lite0", "cpus": len(os.sched_getaffinity(0)),
        "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "python": platform.python_version(), "machine": platform.machine(),
        "train": training, "predict": prediction}
    table = Table(title=f"{record['images']} images at {args.size}px, {record['cpus']} CPUs, "
                        f"load {record['load_average_before']} -> {record['load_average_after']}")
    for column in ("task", "processes", "images/s", "speed-up"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, rows in (("train", training), ("predict", prediction)):
        for row in rows:
            table.add_row(task, str(row["processes"]), f"{row['images_per_s']:.1f}",
                          f"{row['images_per_s'] / rows[0]['images_per_s']:.2f}x")
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"ddp-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
