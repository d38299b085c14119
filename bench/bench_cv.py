"""5-fold cross-validation of the default config on the course dataset's training images.

    .venv/bin/python bench/bench_cv.py [--folds 5] [--config cfg.yaml] [any train flag]

Stratified, patient-grouped folds of ``train/`` (test images and their byte copies left out); each
fold model picks its epoch on an inner validation split and is scored on the fold it never saw.
The test split is not read. Prints per-fold and mean ± std accuracy; JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, save_result  # noqa: E402

from chestxray.config import load_config, overrides_from_args  # noqa: E402
from chestxray.cv import cross_validate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--config", type=Path, help="YAML config (flags win)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args, extra = parser.parse_known_args()
    config = load_config(args.config, **overrides_from_args(extra))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chestxray-bench-cache-") as cache:
        result = cross_validate(DATA / "chest_xray_4class", config, args.folds, out_dir=args.out,
                                name=f"cv{args.folds}-{time.strftime('%Y%m%d-%H%M%S')}", cache_dir=cache, progress=False)
    seconds = time.perf_counter() - start
    record = {"folds": args.folds, "config": config.to_dict(), "run_dir": str(result.run_dir),
              "per_fold": result.folds.to_dict("records"), "summary": result.summary, "seconds": round(seconds, 1)}
    path = save_result(f"cv{args.folds}-course", record)
    accuracy = result.folds["accuracy"]
    print(f"{args.folds}-fold accuracy {100 * accuracy.mean():.1f}% ± {100 * accuracy.std():.1f}% "
          f"(per fold: {', '.join(f'{100 * a:.1f}' for a in accuracy)}) in {seconds:.0f} s; result: {path}")


if __name__ == "__main__":
    main()
