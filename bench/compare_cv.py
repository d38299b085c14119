"""Compare two cross-validation runs of the same folds image by image: is a candidate really better?

    .venv/bin/python bench/compare_cv.py BASELINE CANDIDATE

Each argument is a ``bench/results/cv*.json`` file or a CV run directory (one with ``oof.csv``). Prints
both out-of-fold accuracies, the per-fold differences (when the folds are the same), McNemar's exact
test on the images where exactly one of the two is right (the paired test for two classifiers scored
on the same images), and what the two averaged would give: a 2-model ensemble whose members never saw
the image they score. Runs with another ``--seed`` have other folds; they compare image by image too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest


def out_of_fold(source: Path) -> tuple[pd.DataFrame, list[str]]:
    """The ``oof.csv`` of a CV run, with a ``correct`` column, and its class columns."""
    run_dir = Path(json.loads(source.read_text())["run_dir"]) if source.suffix == ".json" else source
    frame = pd.read_csv(run_dir / "oof.csv")
    classes = [c for c in frame.columns if c not in ("file", "truth", "patient_id", "fold")]
    frame["correct"] = frame[classes].idxmax(axis=1) == frame["truth"]
    return frame.set_index("file"), classes


def scores(probs: pd.DataFrame, truth: pd.Series) -> str:
    """Accuracy and cross-entropy of probabilities against the true class names."""
    accuracy = (probs.idxmax(axis=1) == truth).mean()
    picked = probs.to_numpy()[np.arange(len(probs)), probs.columns.get_indexer(truth)]
    loss = -np.log(np.clip(picked, 1e-15, 1)).mean()
    return f"accuracy {100 * accuracy:.1f}%, loss {loss:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", type=Path)
    parser.add_argument("candidate", type=Path)
    args = parser.parse_args()
    (base, classes), (cand, _) = out_of_fold(args.baseline), out_of_fold(args.candidate)
    if set(base.index) != set(cand.index):
        raise SystemExit("the two runs did not score the same images: no paired comparison")
    cand = cand.loc[base.index]
    same_folds = bool((base["fold"] == cand["fold"]).all())
    only_base = int((base["correct"] & ~cand["correct"]).sum())
    only_cand = int((cand["correct"] & ~base["correct"]).sum())
    p_value = binomtest(only_cand, only_base + only_cand).pvalue if only_base + only_cand else 1.0
    print(f"out-of-fold (n = {len(base)}): baseline {scores(base[classes], base['truth'])}; "
          f"candidate {scores(cand[classes], base['truth'])}")
    if same_folds:
        per_fold = (cand.groupby("fold")["correct"].mean() - base.groupby("fold")["correct"].mean()) * 100
        print(f"per-fold difference (points): {', '.join(f'{d:+.1f}' for d in per_fold)}")
    else:
        print("the folds differ (another seed): image-by-image comparison only")
    print(f"right only by the baseline: {only_base}; only by the candidate: {only_cand}; "
          f"McNemar exact p = {p_value:.3f}")
    averaged = (base[classes] + cand[classes]) / 2
    print(f"both averaged (a 2-model ensemble): {scores(averaged, base['truth'])}")


if __name__ == "__main__":
    main()
