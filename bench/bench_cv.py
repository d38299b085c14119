"""5-fold cross-validation of the default config on the course dataset's training images.

    .venv/bin/python bench/bench_cv.py [--folds 5] [--config cfg.yaml] [any train flag]

Stratified, patient-grouped folds of ``train/`` (test images and their byte copies left out); each
fold model picks its epoch on an inner validation split and is scored on the fold it never saw.
The test split is not read. Prints per-fold and mean ± std accuracy; JSON in bench/results/.

When not to trust a prediction, on validation-like data: each fold model's logit transform and 90%
class-conditional conformal sets are fitted on its inner validation split and judged on the held-out
fold it never saw; the record's ``trust`` holds the coverage per class (Wilson intervals) and mean set
size (bootstrap intervals) over every out-of-fold image, and the accuracy of the 80% and 50% most
confident out-of-fold predictions (risk-coverage).

    .venv/bin/python bench/bench_cv.py --epochs 1 --image-size 64    # a smoke run (minutes), not a figure
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, add_training_flags, fast_allocator, save_result, training_overrides  # noqa: E402

from chestxray.training.config import load_config  # noqa: E402
from chestxray.training.cv import cross_validate  # noqa: E402


def main() -> None:
    fast_allocator()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--config", type=Path, help="YAML config (flags win)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    add_training_flags(parser)
    args = parser.parse_args()
    config = load_config(args.config, **training_overrides(args))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chestxray-bench-cache-") as cache:
        result = cross_validate(DATA / "chest_xray_4class", config, args.folds, out_dir=args.out,
                                name=f"cv{args.folds}-{time.strftime('%Y%m%d-%H%M%S')}", cache_dir=cache, progress=False)
    seconds = time.perf_counter() - start
    trust = result.summary.get("oof_trust")
    record = {"folds": args.folds, "config": config.to_dict(), "run_dir": str(result.run_dir),
              "per_fold": result.folds.to_dict("records"), "summary": result.summary, "trust": trust,
              "seconds": round(seconds, 1)}
    path = save_result(f"cv{args.folds}-course", record)
    accuracy = result.folds["accuracy"]
    print(f"{args.folds}-fold accuracy {100 * accuracy.mean():.1f}% ± {100 * accuracy.std():.1f}% "
          f"(per fold: {', '.join(f'{100 * a:.1f}' for a in accuracy)}) in {seconds:.0f} s; result: {path}")
    if trust:
        print("\n".join(trust_lines(trust)))


def trust_lines(trust: dict) -> list[str]:
    """The out-of-fold conformal coverage and risk-coverage figures, one line each."""
    sets = trust["conformal"]
    low, high = sets["mean_set_size_ci"]
    lines = [f"out-of-fold 90% sets: coverage {100 * sets['coverage']:.1f}%, mean set size "
             f"{sets['mean_set_size']:.2f} ({low:.2f}-{high:.2f})"]
    for name, row in sets["per_class"].items():
        c_low, c_high = row["coverage_ci"]
        lines.append(f"  {name}: n {row['n']}, coverage {100 * row['coverage']:.1f}% ({100 * c_low:.1f}-"
                     f"{100 * c_high:.1f}), mean set size {row['mean_set_size']:.2f}")
    lines.append("accuracy at coverage: " + ", ".join(
        f"{level} {100 * row['accuracy']:.1f}% ({100 * row['accuracy_ci'][0]:.1f}-{100 * row['accuracy_ci'][1]:.1f})"
        for level, row in trust["at_coverage"].items()))
    return lines


if __name__ == "__main__":
    main()
