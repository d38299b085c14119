""".venv/bin/python bench/bench_backends.py BUNDLE [--data FOLDER] [--rounds 5] [--calls 10] [--threads 2 1]

PyTorch vs onnxruntime on one bundle and real X-rays: batch-1 latency, batch-16 throughput, parity.

The bundle is exported to a temporary ONNX file (its parity check includes a few of the X-rays), then
both runners get the same preprocessed images. Timings alternate between the backends round by round,
so a neighbour's load on a shared CPU hits both alike; the medians and their ratio are reported for
each thread count (default: torch's default, then 1: oversubscribed torch threads collapse).
Writes ``bench/results/backends-<date>-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, save_result  # noqa: E402

from chestxray.export import export_onnx  # noqa: E402
from chestxray.runners import OnnxRunner  # noqa: E402
from chestxray.predict import expand_inputs, load_model  # noqa: E402

BATCH = 16
PARITY_FILES = 4


def timed_ms(runner, images: np.ndarray) -> float:
    start = time.perf_counter()
    runner(images)
    return 1000 * (time.perf_counter() - start)


def compare(runners: dict, images: np.ndarray, rounds: int, calls: int) -> dict:
    """Batch-1 latency and batch-16 throughput of each runner, measured in alternating rounds."""
    single = {name: [] for name in runners}
    batched = {name: [] for name in runners}
    for runner in runners.values():  # warm-up
        timed_ms(runner, images[:1])
        timed_ms(runner, images[:BATCH])
    for round_index in range(rounds):
        for name, runner in runners.items():
            for call in range(calls):
                at = (round_index * calls + call) % len(images)
                single[name].append(timed_ms(runner, images[at:at + 1]))
            for call in range(max(1, calls // 4)):
                at = (call * BATCH) % max(1, len(images) - BATCH)
                batched[name].append(timed_ms(runner, images[at:at + BATCH]))
    results = {}
    for name in runners:
        batch_ms = statistics.median(batched[name])
        results[name] = {"batch1_median_ms": round(statistics.median(single[name]), 2),
                         "batch1_p90_ms": round(statistics.quantiles(single[name], n=10, method="inclusive")[-1], 2),
                         f"batch{BATCH}_median_ms": round(batch_ms, 2),
                         f"batch{BATCH}_images_per_s": round(1000 * BATCH / batch_ms, 1),
                         "calls": len(single[name]) + len(batched[name])}
    results["batch1_latency_torch_over_onnx"] = round(results["torch"]["batch1_median_ms"]
                                                      / results["onnx"]["batch1_median_ms"], 2)
    results[f"batch{BATCH}_throughput_onnx_over_torch"] = round(
        results["onnx"][f"batch{BATCH}_images_per_s"] / results["torch"][f"batch{BATCH}_images_per_s"], 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="model bundle folder")
    parser.add_argument("--data", type=Path, default=DATA / "chest_xray_4class" / "test",
                        help="folder of real X-rays")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per backend")
    parser.add_argument("--calls", type=int, default=10, help="calls of each kind per round")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads(), 1],
                        help="compute thread counts to measure (both backends get the same)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    predictor = load_model(args.bundle)
    files = [f for f, error in expand_inputs([args.data]) if error is None]
    squares = np.stack([predictor.prepare(f) for f in files])
    images = squares[:, None].astype(np.float32) / 255.0
    default_threads = torch.get_num_threads()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        export = export_onnx(args.bundle, out=Path(scratch) / "model.onnx", parity_images=files[:PARITY_FILES])
        torch_logits, torch_features = predictor.runner(images)
        onnx_logits, onnx_features = OnnxRunner(export.path)(images)
        for threads in args.threads:
            torch.set_num_threads(threads)
            runners = {"torch": predictor.runner, "onnx": OnnxRunner(export.path, threads)}
            results[f"{threads} thread(s)"] = compare(runners, images, args.rounds, args.calls)
    torch.set_num_threads(default_threads)  # the machine facts saved below record torch's default
    prob_diff = np.abs(predictor.probabilities(onnx_logits) - predictor.probabilities(torch_logits)).max()
    meta = predictor.meta
    record = {
        "bundle": str(args.bundle), "arch": meta.arch, "image_size": meta.image_size, "data": str(args.data),
        "images": len(images),
        "export": {"exporter": export.exporter, "opset": export.opset, "seconds": round(export.seconds, 1),
                   "parity_max_prob_diff": export.max_prob_diff, "parity_images": export.n_images},
        "parity_all_images": {"max_prob_diff": float(prob_diff),
                              "max_logit_diff": float(np.abs(onnx_logits - torch_logits).max()),
                              "max_feature_diff": float(np.abs(onnx_features - torch_features).max()),
                              "same_labels": int((onnx_logits.argmax(1) == torch_logits.argmax(1)).sum())},
        "results": results, "onnxruntime": onnxruntime.__version__,
        "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
    }
    out = save_result("backends", record)
    print(json.dumps({k: record[k] for k in ("parity_all_images", "results")}, indent=2))
    print(f"load average {record['load_average_before']} -> {record['load_average_after']} on {os.cpu_count()} "
          f"cores (shared machine: compare the ratios, not the absolute figures); wrote {out}")


if __name__ == "__main__":
    main()
