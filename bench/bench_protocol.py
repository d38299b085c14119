"""Train the default model and evaluate it ONCE on a dataset's test split, timing everything.

Two datasets, one protocol:
- ``course``: the course dataset's ``train/`` (a patient-grouped 20% validation split inside it),
  then the 40 images of ``test/`` — the original notebook's protocol.
- ``pneumoniamnist``: PneumoniaMNIST's official train/val/test split, printed beside the MedMNIST v2
  anchors.

Wall time includes the cache build (a fresh, temporary cache folder) and the evaluation. Model
selection uses validation data only; the test split is read once, at the end.

    .venv/bin/python bench/bench_protocol.py course [--config cfg.yaml] [any train flag, e.g. --epochs 8]
    .venv/bin/python bench/bench_protocol.py pneumoniamnist
    .venv/bin/python bench/bench_protocol.py pneumoniamnist --validation-only --contrast clahe

``--validation-only`` trains and reports the validation metrics without reading the test split:
the way to compare candidate settings.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, add_training_flags, fast_allocator, save_result, training_overrides  # noqa: E402

from chestxray.training.config import TrainConfig, load_config  # noqa: E402
from chestxray.inference.evaluation import evaluate, headline  # noqa: E402
from chestxray.training.train import RunResult, fit  # noqa: E402

DATASETS = {
    "course": ("chest_xray_4class", {}),
    # 28 px originals: upscaled to the smallest size at which the ImageNet features work well; at 128 px the
    # backward pass is cheap, so nothing stays frozen (the figures in the README were measured so)
    "pneumoniamnist": ("pneumoniamnist/pneumoniamnist.npz", {"image_size": 128, "epochs": 8, "frozen_stride": 0}),
}
ANCHORS = {
    "course": {"original notebook (Keras ResNet50)": {"accuracy": 0.575},
               "best public rerun of the course": {"accuracy": 0.825}},
    "pneumoniamnist": {"ResNet-18 (28)": {"accuracy": 0.854, "auc": 0.944},
                       "ResNet-50 (224)": {"accuracy": 0.884, "auc": 0.962},
                       "Google AutoML Vision": {"accuracy": 0.946, "auc": 0.991}},
}


def main() -> None:
    fast_allocator()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--config", type=Path, help="YAML config (flags win)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="parent of the run directory")
    parser.add_argument("--validation-only", action="store_true", help="train and validate; leave the test split unread")
    parser.add_argument("--resume", metavar="NAME", help="continue the interrupted run --out/NAME from its last "
                        "checkpoint, with its saved config and split (the same figures as an uninterrupted run; "
                        "the times then cover only what is left)")
    add_training_flags(parser)
    args = parser.parse_args()
    relative, dataset_defaults = DATASETS[args.dataset]
    data = DATA / relative
    config = load_config(args.config, **{**dataset_defaults, **training_overrides(args)})
    name = args.resume or f"{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume:
        config = load_config(args.out / name / "config.yaml")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chestxray-bench-cache-") as cache:
        run = fit(data, None if args.resume else config, out_dir=args.out, name=name, cache_dir=cache,
                  progress=False, resume=bool(args.resume))
        trained = time.perf_counter()
        if args.validation_only:
            report_validation(args.dataset, data, config, run, trained - start)
            return
        result = evaluate(run.bundle_dir, data, run.run_dir / "evaluation", cache_dir=cache, progress=False)
    total = time.perf_counter() - start
    metrics = result.metrics
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record = {
        "dataset": args.dataset, "data": str(data), "config": config.to_dict(), "run_dir": str(run.run_dir),
        "epochs_run": int(len(run.history)), "validation": run.metrics,
        "test": {"n": result.n_evaluated, "accuracy": metrics["accuracy"], "ci": metrics["ci"],
                 "balanced_accuracy": metrics["balanced_accuracy"], "macro_auc": metrics["macro_auc"],
                 "sensitivity": {k: v["sensitivity"] for k, v in metrics["per_class"].items()},
                 "confusion_matrix": metrics["confusion_matrix"], "ece": metrics["ece"],
                 "operating_points": metrics.get("operating_points"),
                 "conformal": metrics.get("conformal"),
                 "selective": {k: v for k, v in (metrics.get("selective") or {}).items() if k != "risk_coverage"}},
        "anchors": ANCHORS[args.dataset], "seconds_train": round(trained - start, 1),
        "seconds_total": round(total, 1), "peak_rss_mb": round(peak_mb), "test_evaluations": 1,
        "resumed": bool(args.resume),
    }
    path = save_result(f"protocol-{args.dataset}", record)
    print("\n".join(headline(result)))
    print(f"validation: {', '.join(f'{k} {v:.4f}' for k, v in run.metrics.items())}")
    print(f"wall time {total:.0f} s (training incl. cache {trained - start:.0f} s), peak memory {peak_mb:.0f} MB")
    print(f"anchors: {ANCHORS[args.dataset]}")
    print(f"result: {path}; report: {result.files['report']}")


def report_validation(dataset: str, data: Path, config: TrainConfig, run: RunResult, seconds: float) -> None:
    """Record a candidate's validation metrics: model selection never sees the test split."""
    record = {"dataset": dataset, "data": str(data), "config": config.to_dict(), "run_dir": str(run.run_dir),
              "epochs_run": int(len(run.history)), "validation": run.metrics, "seconds_train": round(seconds, 1),
              "test_evaluations": 0}
    path = save_result(f"select-{dataset}", record)
    print(f"validation: {', '.join(f'{k} {v:.4f}' for k, v in run.metrics.items())}")
    print(f"wall time {seconds:.0f} s; result: {path}")


if __name__ == "__main__":
    main()
