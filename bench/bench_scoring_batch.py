""".venv/bin/python bench/bench_scoring_batch.py BUNDLE [--images 128] [--rounds 3] [--sizes 1 4 8 16 32 64]

Images per second of scoring (eval-mode forward, logits and features) by batch size, for the PyTorch
runner and, when the bundle has ``model.onnx``, the onnxruntime runner: which micro-batch to score
in. Random uint8 squares at the bundle's input size (speed does not depend on the pixels). The batch
sizes alternate round by round, so a neighbour's load hits all alike; medians are reported.
Writes ``bench/results/scoring-batch-<date>-<time>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fast_allocator, save_result  # noqa: E402


def main() -> None:
    fast_allocator()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    args = parser.parse_args()

    from chestxray.model.bundle import load_bundle
    from chestxray.model.runners import OnnxRunner, TorchRunner

    model, meta = load_bundle(args.bundle)
    runners = {"torch": TorchRunner(model)}
    if (args.bundle / "model.onnx").is_file():
        runners["onnx"] = OnnxRunner(args.bundle / "model.onnx")
    side = meta.image_size
    images = np.random.default_rng(0).random((args.images, 1, side, side), dtype=np.float32)
    speeds: dict[str, dict[int, list[float]]] = {name: {size: [] for size in args.sizes} for name in runners}
    for name, runner in runners.items():  # warm-up: first calls allocate and pick kernels
        for size in args.sizes:
            runner(images[:size])
    for _ in range(args.rounds):
        for name, runner in runners.items():
            for size in args.sizes:
                start = time.perf_counter()
                for first in range(0, args.images, size):
                    runner(images[first:first + size])
                speeds[name][size].append(args.images / (time.perf_counter() - start))
    table = {name: {size: round(statistics.median(values), 2) for size, values in by_size.items()}
             for name, by_size in speeds.items()}
    for name, by_size in table.items():
        best = max(by_size, key=by_size.get)
        cells = ", ".join(f"{size}: {value}" for size, value in by_size.items())
        print(f"{name} images/s by batch size ({side} px): {cells}; best {best}")
    path = save_result("scoring-batch", {"bundle": str(args.bundle), "arch": meta.arch, "image_size": side,
                                         "images": args.images, "rounds": args.rounds, "images_per_s": table,
                                         "all_rounds": speeds})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
