""".venv/bin/python bench/bench_backends.py BUNDLE [--data DATA] [--split-file CSV] [--rounds 5] [--calls 10]
[--threads 2 1] [--openvino]

PyTorch vs onnxruntime FP32 vs onnxruntime INT8 on one bundle and real X-rays: batch-1 latency,
batch-16 throughput, parity (label agreement, largest probability difference, OOD flags) on the test
and validation images, and each backend's accuracy on the test images with a bootstrap interval.

The bundle is exported to a temporary FP32 ONNX file (its parity check includes a few test X-rays)
and quantized to INT8 exactly as `chestxray export --quantize int8` does, calibrated on the run's
*training* images (``split.csv`` beside the bundle's folder, or ``--split-file``), so neither the
validation nor the test images are calibrated on. Every backend then gets the same preprocessed
images. Timings alternate between the backends round by round, so a neighbour's load on a shared CPU
hits all alike; the medians and their ratios are reported for each thread count (default: torch's
default, then 1). The load average is sampled every round. ``--openvino`` adds OpenVINO's CPU runtime
on the same two ONNX files (``pip install openvino``; not a project dependency).
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
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, save_result  # noqa: E402

from chestxray.deploy.export import export_onnx  # noqa: E402
from chestxray.stats.metrics import classification_metrics  # noqa: E402
from chestxray.inference.predict import Predictor, load_model  # noqa: E402
from chestxray.deploy.quantize import check_parity, quantize_bundle  # noqa: E402
from chestxray.model.runners import OnnxRunner  # noqa: E402
from chestxray.data.sources import load_samples  # noqa: E402

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
    loads = []
    for runner in runners.values():  # warm-up
        timed_ms(runner, images[:1])
        timed_ms(runner, images[:BATCH])
    for round_index in range(rounds):
        loads.append(os.getloadavg()[0])
        for name, runner in runners.items():
            for call in range(calls):
                at = (round_index * calls + call) % len(images)
                single[name].append(timed_ms(runner, images[at:at + 1]))
            for call in range(max(1, calls // 4)):
                at = (call * BATCH) % max(1, len(images) - BATCH)
                batched[name].append(timed_ms(runner, images[at:at + BATCH]))
    results = {"load_average_per_round": [round(load, 2) for load in loads]}
    for name in runners:
        batch_ms = statistics.median(batched[name])
        results[name] = {"batch1_median_ms": round(statistics.median(single[name]), 2),
                         "batch1_p90_ms": round(statistics.quantiles(single[name], n=10, method="inclusive")[-1], 2),
                         f"batch{BATCH}_median_ms": round(batch_ms, 2),
                         f"batch{BATCH}_images_per_s": round(1000 * BATCH / batch_ms, 1),
                         "calls": len(single[name]) + len(batched[name])}
    for faster, slower in [(name, "torch") for name in runners if name != "torch"] + \
                          [(name, "onnx") for name in runners if name not in ("torch", "onnx")]:
        results[f"batch1_latency_{slower}_over_{faster}"] = round(
            results[slower]["batch1_median_ms"] / results[faster]["batch1_median_ms"], 2)
        results[f"batch{BATCH}_throughput_{faster}_over_{slower}"] = round(
            results[faster][f"batch{BATCH}_images_per_s"] / results[slower][f"batch{BATCH}_images_per_s"], 2)
    return results


def openvino_runner(onnx_path: Path, threads: int):
    """OpenVINO's CPU plugin on an ONNX file, as a runner (images -> (logits, features))."""
    try:
        import openvino
    except ImportError:
        sys.exit("--openvino needs the openvino package (pip install openvino)")
    compiled = openvino.Core().compile_model(str(onnx_path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                     "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = request.infer({0: np.ascontiguousarray(images, np.float32)})
        return outputs[compiled.output("logits")].copy(), outputs[compiled.output("features")].copy()

    return run


def labelled_squares(predictor, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Preprocessed squares, class indices (in the bundle's order) and paths of a sample table."""
    paths = frame["path"].tolist()
    squares = np.stack([predictor.prepare(path) for path in paths])
    return squares, np.array([predictor.classes.index(label) for label in frame["label"]]), paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="model bundle folder (runs/<name>/bundle)")
    parser.add_argument("--data", type=Path, default=DATA / "chest_xray_4class",
                        help="labelled data with a test split (default: the course dataset)")
    parser.add_argument("--split-file", type=Path, default=None,
                        help="the run's split.csv (default: beside the bundle's folder)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per backend")
    parser.add_argument("--calls", type=int, default=10, help="calls of each kind per round")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads(), 1],
                        help="compute thread counts to measure (every backend gets the same)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the accuracy intervals")
    parser.add_argument("--openvino", action="store_true", help="add OpenVINO's CPU runtime (FP32 and INT8)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    split_file = args.split_file or args.bundle.resolve().parent / "split.csv"
    split = pd.read_csv(split_file, dtype=str, keep_default_na=False)
    split["path"] = [str(Path(path).resolve()) for path in split["path"]]  # written relative to the training's cwd
    predictor = load_model(args.bundle)
    meta = predictor.meta
    test = load_samples(args.data).split("test")
    test_squares, test_y, test_paths = labelled_squares(predictor, test.frame)
    val_squares, val_y, _ = labelled_squares(predictor, split[split["subset"] == "val"])
    images = test_squares[:, None].astype(np.float32) / 255.0
    default_threads = torch.get_num_threads()
    results, parity, accuracy = {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        train_manifest = Path(scratch) / "train.csv"
        split[split["subset"] == "train"][["path", "label", "patient_id"]].to_csv(train_manifest, index=False)
        export = export_onnx(args.bundle, out=Path(scratch) / "model.onnx", parity_images=test_paths[:PARITY_FILES])
        int8 = quantize_bundle(args.bundle, train_manifest, Path(scratch) / "model.int8.onnx",
                               cache_dir=Path(scratch) / "cache")
        files = {"onnx": export.path, "onnx-int8": int8.path}
        sizes_mb = {name: round(path.stat().st_size / 1e6, 2) for name, path in files.items()}  # gone after the block
        full = {"torch": predictor.runner, **{name: OnnxRunner(path) for name, path in files.items()}}
        if args.openvino:
            full.update({f"openvino{name[4:]}": openvino_runner(path, default_threads) for name, path in files.items()})
        for name, squares in (("test", test_squares), ("val", val_squares)):
            parity[name] = {f"{other}_vs_{reference}": check_parity(meta, full[reference], full[other], squares).__dict__
                            for reference in ("torch", "onnx") for other in full if other not in ("torch", reference)}
        for name, runner in full.items():
            probs, _ = Predictor(runner, meta).predict_arrays(test_squares)
            metrics = classification_metrics(test_y, probs, predictor.classes, n_boot=args.n_boot)
            accuracy[name] = {"accuracy": metrics["accuracy"], "accuracy_ci": metrics["ci"].get("accuracy"),
                              "macro_auc": metrics["macro_auc"], "macro_auc_ci": metrics["ci"].get("macro_auc")}
        for threads in args.threads:
            torch.set_num_threads(threads)
            runners = {"torch": predictor.runner, **{name: OnnxRunner(path, threads) for name, path in files.items()}}
            if args.openvino:
                runners.update({f"openvino{name[4:]}": openvino_runner(path, threads) for name, path in files.items()})
            results[f"{threads} thread(s)"] = compare(runners, images, args.rounds, args.calls)
    torch.set_num_threads(default_threads)  # the machine facts saved below record torch's default
    record = {
        "bundle": str(args.bundle), "arch": meta.arch, "image_size": meta.image_size, "data": str(args.data),
        "test_images": len(test_squares), "val_images": len(val_squares), "split_file": str(split_file),
        "export": {"exporter": export.exporter, "opset": export.opset, "seconds": round(export.seconds, 1),
                   "parity_max_prob_diff": export.max_prob_diff, "parity_images": export.n_images},
        "int8": {"settings": int8.settings.__dict__, "calibration_images": int8.n_calibration,
                 "calibrated_on": "training images of the split (not val, not test)",
                 "export_parity": int8.parity.__dict__, "seconds": round(int8.seconds, 1),
                 "size_mb": sizes_mb["onnx-int8"], "fp32_size_mb": sizes_mb["onnx"]},
        "parity": parity, "test_accuracy": accuracy, "results": results, "onnxruntime": onnxruntime.__version__,
        "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
    }
    if args.openvino:
        import openvino

        record["openvino"] = openvino.__version__
    out = save_result("backends", record)
    print(json.dumps({k: record[k] for k in ("parity", "test_accuracy", "results")}, indent=2))
    print(f"load average {record['load_average_before']} -> {record['load_average_after']} on {os.cpu_count()} "
          f"cores (shared machine: compare the ratios, not the absolute figures); wrote {out}")


if __name__ == "__main__":
    main()
