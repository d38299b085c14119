"""Compare two cross-validation runs of the same folds image by image: is a candidate really better?

    .venv/bin/python bench/compare_cv.py BASELINE CANDIDATE

Each argument is a ``bench/results/cv*.json`` file or a CV run directory (one with ``oof.csv``). Prints
both out-of-fold accuracies, the per-fold differences, and McNemar's exact test on the images where
exactly one of the two is right (the paired test for two classifiers scored on the same images).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from scipy.stats import binomtest


def out_of_fold(source: Path) -> pd.DataFrame:
    """The ``oof.csv`` of a CV run, with a ``correct`` column."""
    run_dir = Path(json.loads(source.read_text())["run_dir"]) if source.suffix == ".json" else source
    frame = pd.read_csv(run_dir / "oof.csv")
    classes = [c for c in frame.columns if c not in ("file", "truth", "patient_id", "fold")]
    frame["correct"] = frame[classes].idxmax(axis=1) == frame["truth"]
    return frame.set_index("file")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", type=Path)
    parser.add_argument("candidate", type=Path)
    args = parser.parse_args()
    base, cand = out_of_fold(args.baseline), out_of_fold(args.candidate)
    if set(base.index) != set(cand.index) or not (base["fold"] == cand.loc[base.index, "fold"]).all():
        raise SystemExit("the two runs did not use the same images and folds: no paired comparison")
    cand = cand.loc[base.index]
    only_base = int((base["correct"] & ~cand["correct"]).sum())
    only_cand = int((cand["correct"] & ~base["correct"]).sum())
    p_value = binomtest(only_cand, only_base + only_cand).pvalue if only_base + only_cand else 1.0
    per_fold = (cand.groupby("fold")["correct"].mean() - base.groupby("fold")["correct"].mean()) * 100
    print(f"out-of-fold accuracy: baseline {100 * base['correct'].mean():.1f}%, "
          f"candidate {100 * cand['correct'].mean():.1f}% (n = {len(base)})")
    print(f"per-fold difference (points): {', '.join(f'{d:+.1f}' for d in per_fold)}")
    print(f"right only by the baseline: {only_base}; only by the candidate: {only_cand}; "
          f"McNemar exact p = {p_value:.3f}")


if __name__ == "__main__":
    main()
