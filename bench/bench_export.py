""".venv/bin/python bench/bench_export.py BUNDLE [--rounds 2]

Wall time of the ONNX export (dynamo exporter, the default opset) of a bundle's model with timm's
activations in place, as trained, and out of place, as ``export_onnx`` exports them; after one
untimed warm-up export, the two alternating round by round. Also checks that both graphs give the
same outputs. Writes ``bench/results/export-<date>-<time>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fast_allocator, save_result  # noqa: E402


def main() -> None:
    fast_allocator()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch

    from chestxray.model.bundle import load_bundle, read_meta
    from chestxray.deploy.export import DEFAULT_OPSET, _export, _LogitsAndFeatures
    from chestxray.model.runners import OnnxRunner

    def export(in_place: bool, path: Path) -> float:
        model, _ = load_bundle(args.bundle)
        wrapper = _LogitsAndFeatures(model)  # turns the activations out of place
        if in_place:
            for module in model.modules():
                if hasattr(module, "inplace") and isinstance(module, (torch.nn.ReLU, torch.nn.ReLU6)):
                    module.inplace = True
        example = torch.rand(2, 1, side, side)
        start = time.perf_counter()
        _export(wrapper.eval(), example, path, DEFAULT_OPSET)
        return time.perf_counter() - start

    side = read_meta(args.bundle).image_size
    seconds: dict[str, list[float]] = {"in place": [], "out of place": []}
    with tempfile.TemporaryDirectory() as folder:
        paths = {kind: Path(folder) / f"{kind.replace(' ', '_')}.onnx" for kind in seconds}
        export(False, Path(folder) / "warm-up.onnx")
        for _ in range(args.rounds):
            for kind in seconds:
                seconds[kind].append(round(export(kind == "in place", paths[kind]), 2))
        images = np.random.default_rng(0).random((4, 1, side, side), dtype=np.float32)
        outputs = {kind: OnnxRunner(path)(images) for kind, path in paths.items()}
    difference = max(float(np.abs(a - b).max()) for a, b in zip(*outputs.values()))
    medians = {kind: round(statistics.median(values), 2) for kind, values in seconds.items()}
    print(f"ONNX export at {side} px: in place {seconds['in place']} s, out of place {seconds['out of place']} s; "
          f"largest output difference between the two graphs {difference:.1e}")
    path = save_result("export", {"bundle": str(args.bundle), "image_size": side, "rounds": args.rounds,
                                  "seconds": seconds, "median_s": medians, "max_output_difference": difference})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
