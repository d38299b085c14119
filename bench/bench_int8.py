"""INT8 against FP32 ONNX on a bundle: which parts kept in FP32 let static INT8 pass parity, and at what speed.

One command (on the demo bundle; calibration on the course ``train/``, test split never read):

    .venv/bin/python bench/bench_int8.py runs/demo/bundle

For each variant (``--variants``; names are the parts kept in FP32, ``none`` quantizes everything), the
bundle is quantized as ``chestxray export --quantize int8`` does (QDQ, per-channel, reduced range, min/max
ranges on 256 calibration images), without the parity gate, and compared with the FP32 ONNX model on
the validation images of the bundle's run (``split.csv``) and on every ``pediatric_site`` image: label
agreement and the largest probability difference. Speed: images/s at batch 16, FP32 and INT8 interleaved
in one run (``--repeats`` rounds). Result: ``bench/results/int8-*.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, machine, save_result  # noqa: E402

VARIANTS = {"none": (), "head": ("head",), "stem+head": ("stem", "head"), "depthwise": ("depthwise",),
            "stem+head+depthwise": ("stem", "head", "depthwise"), "se": ("se",),
            "stem+head+se": ("stem", "head", "se")}


def speed(runner: Any, images: np.ndarray, batch: int = 16) -> float:
    start = time.perf_counter()
    for at in range(0, len(images), batch):
        runner(images[at:at + batch])
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--calibration-data", type=Path, default=DATA / "chest_xray_4class")
    parser.add_argument("--site", type=Path, default=DATA / "pediatric_site")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calibrate-on-site", action="store_true",
                        help="calibrate on every other site image (a site calibrating on its own unlabelled X-rays) "
                             "and check parity on the others")
    args = parser.parse_args()

    from chestxray.deploy.export import export_onnx
    from chestxray.deploy.quantize import QuantSettings, _calibration_and_parity_images, _quantize, _read_images, check_parity
    from chestxray.model.bundle import read_meta
    from chestxray.model.runners import OnnxRunner
    from chestxray.training.adapt import load_local
    from chestxray.training.adapt_unlabeled import run_reference

    meta = read_meta(args.bundle)
    calibration, _, _ = _calibration_and_parity_images(meta, args.calibration_data, None, 256, 20, 0, None, False)
    reference = run_reference(args.bundle, meta)
    if reference is None:
        sys.exit(f"{args.bundle}: no run split.csv beside it (its validation images are the parity set)")
    val = load_local(meta, reference, progress=False, min_per_class=1, warn_seen=False).images
    site, _ = _read_images(meta, args.site, None, False, drop_test=False)
    if args.calibrate_on_site:
        calibration, site = site[0::2], site[1::2]
    record: dict[str, Any] = {"bundle": str(args.bundle), "machine": machine(), "n_calibration": len(calibration),
                              "n_val": len(val), "n_site": len(site), "calibrated_on": "every other site image" if args.calibrate_on_site
                              else str(args.calibration_data), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="chestxray-int8-bench-") as scratch:
        fp32_path = export_onnx(args.bundle, Path(scratch) / "fp32.onnx").path
        fp32 = OnnxRunner(fp32_path)
        timing = (site[:96, None] / np.float32(255.0)).astype(np.float32)  # the runner's input: (N, 1, S, S) in [0, 1]
        for name in args.variants:
            out = Path(scratch) / f"{name}.onnx"
            _quantize(fp32_path, Path(scratch) / f"{name}.prepared.onnx", out, calibration,
                      QuantSettings(keep_fp32=VARIANTS[name]))
            int8 = OnnxRunner(out)
            on_val, on_site = check_parity(meta, fp32, int8, val), check_parity(meta, fp32, int8, site)
            rounds = [(speed(fp32, timing), speed(int8, timing)) for _ in range(args.repeats)]
            ratio = float(np.median([b / a for a, b in rounds]))
            record["variants"][name] = {
                "keep_fp32": list(VARIANTS[name]),
                "val": {"agreement": on_val.label_agreement, "max_prob_diff": on_val.max_prob_diff},
                "site": {"agreement": on_site.label_agreement, "max_prob_diff": on_site.max_prob_diff},
                "fp32_images_per_s": [round(a, 1) for a, _ in rounds], "int8_images_per_s": [round(b, 1) for _, b in rounds],
                "speedup_median": round(ratio, 3)}
            print(f"{name:22s} val agree {100 * on_val.label_agreement:5.1f}% (max diff {on_val.max_prob_diff:.3f})  "
                  f"site agree {100 * on_site.label_agreement:5.1f}% (max diff {on_site.max_prob_diff:.3f})  "
                  f"INT8/FP32 speed x{ratio:.2f}", flush=True)
    print(f"result: {save_result('int8', record)}")


if __name__ == "__main__":
    main()
