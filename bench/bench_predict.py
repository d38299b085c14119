""".venv/bin/python bench/bench_predict.py BUNDLE [--data FOLDER] [--repeats 30] [--backend torch|onnx]

Prediction speed of a bundle: single-image latency (a file in, a result out, model loaded) and
folder throughput (decode threads + batched inference), plus Grad-CAM and TTA latency.

Prints a table and writes ``bench/results/predict-<date>-<time>.json``. Latencies are medians over
``--repeats`` calls after three warm-up calls, cycling over the folder's first images; the folder is
read twice and the second (warm page cache) pass is the throughput reported next to the first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, save_result  # noqa: E402

from chestxray.inference.predict import expand_inputs, load_model, predict_paths  # noqa: E402

WARM_UP = 3


def latency_ms(action, inputs: list[str], repeats: int) -> dict[str, float]:
    """Median and 90th percentile of ``action(input)`` in milliseconds, inputs cycled."""
    for i in range(WARM_UP):
        action(inputs[i % len(inputs)])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        action(inputs[i % len(inputs)])
        times.append(1000 * (time.perf_counter() - start))
    return {"median_ms": round(statistics.median(times), 2),
            "p90_ms": round(statistics.quantiles(times, n=10)[-1], 2), "calls": repeats}


def throughput(predictor, folder: Path, batch_size: int) -> dict[str, float]:
    start = time.perf_counter()
    table = predict_paths(predictor, [folder], batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    return {"images": len(table), "seconds": round(seconds, 3), "images_per_s": round(len(table) / seconds, 1),
            "failed": int(table["error"].notna().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="model bundle folder")
    parser.add_argument("--data", type=Path, default=DATA / "chest_xray_4class" / "test", help="folder of images")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    predictor = load_model(args.bundle, backend=args.backend)
    load_seconds = time.perf_counter() - start
    files = [f for f, error in expand_inputs([args.data]) if error is None]
    results = {
        "predict_one_file": latency_ms(predictor.predict, files[:10], args.repeats),
        "predict_one_file_tta": latency_ms(lambda f: predictor.predict(f, tta=True), files[:10], args.repeats),
        "folder_first_pass": throughput(predictor, args.data, args.batch_size),
        "folder_second_pass": throughput(predictor, args.data, args.batch_size),
    }
    if predictor.model is not None:
        results["gradcam_png"] = latency_ms(predictor.gradcam_png, files[:10], max(5, args.repeats // 3))
    meta = predictor.meta
    record = {
        "bundle": str(args.bundle), "arch": meta.arch, "image_size": meta.image_size, "backend": args.backend,
        "load_model_s": round(load_seconds, 3), "data": str(args.data),
        "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "results": results}
    table = Table(title=f"{meta.arch} at {meta.image_size}px, {args.backend}, {os.cpu_count()} CPUs, "
                        f"load {record['load_average_before']} -> {record['load_average_after']}")
    for column in ("measure", "value"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row("load model", f"{load_seconds:.2f} s")
    for name, row in results.items():
        if "median_ms" in row:
            table.add_row(name, f"median {row['median_ms']:.1f} ms, p90 {row['p90_ms']:.1f} ms")
        elif "images_per_s" in row:
            table.add_row(name, f"{row['images_per_s']:.1f} images/s ({row['images']} in {row['seconds']:.2f} s)")
    Console().print(table)
    print(f"written: {save_result('predict', record)}")


if __name__ == "__main__":
    main()
