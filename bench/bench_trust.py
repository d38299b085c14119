"""When not to trust a prediction, measured on a trained course bundle: conformal coverage and set size
per class, risk-coverage, and what the adult X-rays of ``dicom_samples`` get.

    .venv/bin/python bench/bench_trust.py RUN_DIR [--run-cwd DIR]

RUN_DIR: a `chestxray train` run on the course data; ``--run-cwd``: the folder it was run from, when
its ``split.csv`` holds relative paths (default: the current folder).

1. If the bundle predates conformal sets, they (and the source-confound AUCs, the drift reference and
   the validation intervals) are fitted as training now does, on the run's own validation split
   (``RUN_DIR/split.csv``), into a copy of the bundle (``runs/bench/trust-<time>/bundle``): the
   weights are not retrained.
2. Validation-like coverage: the validation images are split in halves (stratified, 200 random
   splits); sets are calibrated on one half and judged on the other, for the LAC, APS and RAPS
   scores. Figures: mean over the splits and the 2.5-97.5 percentiles across them.
3. The course test split (40 images): ``chestxray evaluate`` of the bundle (coverage per class with
   Wilson intervals, mean set size with bootstrap intervals, risk-coverage at 80% and 50%).
4. ``dicom_samples``: every image predicted; how many are referred, carry a caution, or both.

Writes ``bench/results/trust-course-<date>.json``. Nothing here chooses a setting on the test split.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, fast_allocator, save_result  # noqa: E402

from chestxray.model.bundle import read_meta, write_meta  # noqa: E402
from chestxray.training.config import load_config  # noqa: E402
from chestxray.stats.conformal import SCORES, fit_conformal, set_metrics  # noqa: E402
from chestxray.inference.evaluation import evaluate  # noqa: E402
from chestxray.inference.predict import load_model, predict_paths  # noqa: E402
from chestxray.data.audit import source_confound  # noqa: E402
from chestxray.trust.calibration import calibrate_outputs  # noqa: E402
from chestxray.training.train import prepare_data  # noqa: E402

SPLITS = 200
COVERAGE = 0.9


def refit(run_dir: Path, data: Path, out: Path, run_cwd: Path) -> tuple[Path, np.ndarray, np.ndarray, list[str]]:
    """A copy of the run's bundle with the trust fields fitted on its validation split; the validation
    probabilities and labels."""
    bundle = out / "bundle"
    shutil.copytree(run_dir / "bundle", bundle)
    config = load_config(run_dir / "config.yaml")
    split = pd.read_csv(run_dir / "split.csv")
    split["path"] = [str((run_cwd / p).resolve()) for p in split["path"]]
    split.to_csv(out / "split.csv", index=False)
    prepared = prepare_data(data, config, split_file=out / "split.csv", progress=False)
    predictor = load_model(bundle)
    images = np.asarray(prepared.cache.images)[prepared.val_rows]
    logits, _ = predictor.forward_arrays(images)
    probs = predictor.probabilities(logits)
    targets = prepared.targets[prepared.val_rows]
    meta = read_meta(bundle)
    if meta.conformal is None:  # a bundle trained before the trust fields: fit them as training now does
        calibration = calibrate_outputs(logits, targets, classes=list(meta.classes), task=meta.task,
                                        fitted_on=f"validation split ({len(targets)} images)", seed=config.seed)
        meta.conformal = calibration.conformal
        meta.source_confound = source_confound(prepared.samples, config.seed)
        meta.extra = {**meta.extra, **calibration.extra_fields()}
        write_meta(bundle, meta)
    return bundle, probs, targets, list(meta.classes)


def split_halves(probs: np.ndarray, targets: np.ndarray, classes: list[str], score: str) -> dict:
    """Class-conditional coverage and set size of sets calibrated on one random half, judged on the other."""
    rng = np.random.default_rng(0)
    coverage, size = {c: [] for c in classes}, {c: [] for c in classes}
    overall, overall_size = [], []
    for _ in range(SPLITS):
        calibrate = np.zeros(len(targets), bool)
        for k in range(len(classes)):
            rows = np.flatnonzero(targets == k)
            calibrate[rng.choice(rows, len(rows) // 2, replace=False)] = True
        sets = fit_conformal(probs[calibrate], targets[calibrate], classes, coverage=COVERAGE, score=score)
        found = set_metrics(sets.sets(probs[~calibrate]), targets[~calibrate], classes, n_boot=2)
        overall.append(found["coverage"])
        overall_size.append(found["mean_set_size"])
        for name, row in found["per_class"].items():
            coverage[name].append(row["coverage"])
            size[name].append(row["mean_set_size"])

    def spread(values: list[float]) -> dict:
        return {"mean": float(np.mean(values)), "p2.5": float(np.percentile(values, 2.5)),
                "p97.5": float(np.percentile(values, 97.5))}

    return {"coverage": spread(overall), "mean_set_size": spread(overall_size),
            "per_class": {c: {"coverage": spread(coverage[c]), "mean_set_size": spread(size[c])} for c in classes}}


def dicom_samples(bundle: Path) -> dict:
    folder = DATA / "dicom_samples"
    table = predict_paths(load_model(bundle), [folder], progress=False)
    ok = table["error"].isna() | (table["error"] == "")
    refer, caution = table["refer"].astype(bool) & ok, (table["cautions"] != "") & ok
    return {"images": int(ok.sum()), "referred": int(refer.sum()), "with_caution": int(caution.sum()),
            "referred_or_caution": int((refer | caution).sum()), "neither": int((ok & ~refer & ~caution).sum()),
            "rows": [{"file": Path(r["file"]).name, "label": r["label"], "set": r["prediction_set"],
                      "refer": bool(r["refer"]), "reasons": r["reasons"], "cautions": r["cautions"],
                      "ood_percentile": r["ood_percentile"]} for r in table[ok].to_dict("records")]}


def main() -> None:
    fast_allocator()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--run-cwd", type=Path, default=Path.cwd(), help="folder the run was made from")
    args = parser.parse_args()
    data = DATA / "chest_xray_4class"
    out = args.out / f"trust-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    start = time.perf_counter()
    bundle, probs, targets, classes = refit(args.run_dir, data, out, args.run_cwd)
    validation = {score: split_halves(probs, targets, classes, score) for score in SCORES}
    result = evaluate(bundle, data, out / "evaluation", progress=False)
    test = {"conformal": result.metrics["conformal"],
            "selective": {k: v for k, v in result.metrics["selective"].items() if k != "risk_coverage"},
            "accuracy": result.metrics["accuracy"], "n": result.n_evaluated}
    record = {"run_dir": str(args.run_dir), "bundle": str(bundle), "coverage": COVERAGE,
              "validation_split_halves": {"splits": SPLITS, "images": int(len(targets)), "by_score": validation},
              "course_test": test, "dicom_samples": dicom_samples(bundle),
              "source_confound": read_meta(bundle).source_confound,
              "seconds": round(time.perf_counter() - start, 1)}
    path = save_result("trust-course", record)
    for score, found in validation.items():
        print(f"validation halves, {score}: coverage {100 * found['coverage']['mean']:.1f}%, mean set size "
              f"{found['mean_set_size']['mean']:.2f}; per class " + ", ".join(
                  f"{c} {100 * r['coverage']['mean']:.0f}%/{r['mean_set_size']['mean']:.2f}"
                  for c, r in found["per_class"].items()))
    conformal = test["conformal"]
    print(f"course test: coverage {100 * conformal['coverage']:.1f}% {conformal['coverage_ci']}, mean set size "
          f"{conformal['mean_set_size']:.2f}; accuracy at 80%/50% coverage: " + ", ".join(
              f"{100 * r['accuracy']:.1f}%" for r in test["selective"]["at_coverage"].values()))
    samples = record["dicom_samples"]
    print(f"dicom_samples: {samples['referred']} of {samples['images']} referred, {samples['with_caution']} with a "
          f"caution, {samples['referred_or_caution']} either; result: {path}")


if __name__ == "__main__":
    main()
