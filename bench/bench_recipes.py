"""Candidate training recipes, side by side: out-of-fold CV on the course train and the new site, unadapted.

One command (each part appends to one JSON in bench/results/, so a run can be continued):

    .venv/bin/python bench/bench_recipes.py                       # every candidate, both parts
    .venv/bin/python bench/bench_recipes.py --only default tta --parts site

For each candidate (:data:`CANDIDATES`: overrides of the default :class:`~chestxray.config.TrainConfig`,
and whether prediction averages test-time views):

- ``site``: the main job (``chestxray train`` on the course ``train/``, test split never read), timed,
  then scored on every image of ``../shared/datasets/pediatric_site`` as it is (no adaptation): accuracy
  and balanced accuracy with 95% bootstrap intervals, ECE, recall per class, 90% set coverage, referred.
- ``cv``: ``--folds``-fold patient-grouped cross-validation on the course ``train/`` (``chestxray cv``):
  out-of-fold accuracy, balanced accuracy, ECE and 90% set coverage. The default's fold models are also
  kept as an ensemble bundle and scored on the site (candidate ``cv-ensemble``).

``--bundle default=runs/demo/bundle`` scores a bundle already trained (the default recipe repeats exactly),
and ``--ensemble default seed-1 seed-2`` averages stored site probabilities (an ensemble of seeds).

The course ``test/`` split is not read: a recipe is chosen on these figures, and ``make demo`` then reports
the chosen one's test figures once. Wall times are those of the machine the run had (recorded with it);
compare them only within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_newsite import figures  # noqa: E402
from common import DATA, fast_allocator, machine, save_result  # noqa: E402

COURSE = DATA / "chest_xray_4class"
# name: (TrainConfig overrides, test-time augmentation, what it tests)
CANDIDATES: dict[str, tuple[dict[str, Any], bool, str]] = {
    "default": ({}, False, "the default recipe (batch norm frozen after the first epoch, 256 px, 13 epochs)"),
    "tta": ({}, True, "the default model, predictions averaged over the test-time views (predict --tta)"),
    "photometric": ({"photometric": 1.0}, False, "plus gamma, blur and noise augmentation (--photometric 1)"),
    "ema": ({"ema": 0.98}, False, "plus an exponential moving average of the weights (--ema 0.98)"),
    "bn-train": ({"batch_norm": "train"}, False, "batch norm trained after the frozen epoch (--batch-norm train)"),
    "clahe": ({"contrast": "clahe"}, False, "adaptive histogram equalisation before resizing (--contrast clahe)"),
    "size-320": ({"image_size": 320}, False, "320-px images (--image-size 320)"),
    "lite2": ({"arch": "tf_efficientnet_lite2"}, False, "EfficientNet-Lite2 backbone (--arch tf_efficientnet_lite2)"),
    "crop": ({"fit_mode": "crop"}, False, "centre square instead of padding (--fit-mode crop): hides the aspect ratio"),
    "seed-1": ({"seed": 1}, False, "the default with another seed (split and training randomness): the noise floor"),
    "seed-2": ({"seed": 2}, False, "the default with a third seed"),
}
SMOKE: dict[str, Any] = {}  # --set key=value: applied to every candidate (a smoke run, never a figure)


def site_figures(bundle: Path, site_dir: Path, tta: bool) -> dict[str, Any]:
    """The bundle's predictions on every readable site image, scored against the site's labels."""
    from chestxray.cache import build_cache
    from chestxray.predict import load_model
    from chestxray.sources import load_samples

    predictor = load_model(bundle, backend="torch")
    classes = list(predictor.classes)
    site = load_samples(site_dir).with_classes(classes)
    cache = build_cache(site, predictor.meta.preprocessing(), progress=False)
    ok = np.asarray(cache.ok)
    probs, scores = predictor.predict_arrays(np.asarray(cache.images)[ok], tta=tta)
    sets = predictor.conformal.sets(probs) if predictor.conformal is not None else None
    ood = predictor.guard.is_ood(scores) if predictor.guard is not None else None
    out = figures(site.targets()[ok], probs, sets, ood, classes)
    # kept so that --ensemble can average candidates' probabilities later, without retraining
    out["probs"] = np.round(probs, 5).tolist()
    out["targets"] = site.targets()[ok].tolist()
    out["classes"] = classes
    return out


def ensemble_figures(record: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Average the stored site probabilities of ``names`` (an ensemble of models, no prediction sets)."""
    sites = [record["candidates"][n]["site"] for n in names]
    targets = [tuple(s["targets"]) for s in sites]
    if len(set(targets)) != 1:
        raise SystemExit(f"--ensemble {' '.join(names)}: the candidates were scored on different images")
    probs = np.mean([np.asarray(s["probs"]) for s in sites], axis=0)
    out = figures(np.asarray(targets[0]), probs, None, None, sites[0]["classes"])
    out["members"] = names
    return out


def run_site(name: str, overrides: dict[str, Any], tta: bool, work: Path, site_dir: Path,
             bundles: dict[str, Path]) -> dict[str, Any]:
    overrides = {**overrides, **SMOKE}
    from chestxray.config import TrainConfig
    from chestxray.train import fit

    key = json.dumps(overrides, sort_keys=True)
    seconds = None
    if key not in bundles:
        start = time.perf_counter()
        run = fit(COURSE, TrainConfig().replace(**overrides), out_dir=work, name=name, overwrite=True, progress=False)
        seconds = round(time.perf_counter() - start, 1)
        bundles[key] = run.bundle_dir
    return {"train_seconds": seconds, "site": site_figures(bundles[key], site_dir, tta)}


def run_cv(name: str, overrides: dict[str, Any], folds: int, work: Path, site_dir: Path) -> dict[str, Any]:
    from chestxray.config import TrainConfig
    from chestxray.cv import cross_validate

    overrides = {**overrides, **SMOKE}
    keep = name == "default"
    start = time.perf_counter()
    result = cross_validate(COURSE, TrainConfig().replace(**overrides), folds, out_dir=work, name=f"cv-{name}",
                            keep_models=keep, overwrite=True, progress=False)
    from chestxray.metrics import expected_calibration_error

    classes = [c for c in result.oof.columns if c not in ("file", "truth", "patient_id", "fold")]
    truth = result.oof["truth"].map({c: k for k, c in enumerate(classes)}).to_numpy()
    out: dict[str, Any] = {"cv_seconds": round(time.perf_counter() - start, 1), "oof": result.summary["oof"],
                           "fold_accuracy": [float(a) for a in result.folds["accuracy"]],
                           "oof_ece_uncalibrated": float(expected_calibration_error(
                               truth, result.oof[classes].to_numpy()))}
    trust = result.summary.get("oof_trust")
    if trust:
        out["oof_set_coverage"] = trust["conformal"]["coverage"]
    if keep:
        out["ensemble_site"] = site_figures(result.bundle_dir, site_dir, False)
    return out


def main() -> None:
    fast_allocator()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(CANDIDATES), help="these candidates (default: all)")
    parser.add_argument("--parts", nargs="+", choices=("site", "cv"), default=["site", "cv"])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--site", type=Path, default=DATA / "pediatric_site")
    parser.add_argument("--resume", type=Path, help="a bench/results/recipes-*.json to add to")
    parser.add_argument("--bundle", nargs="+", default=[], metavar="NAME=PATH",
                        help="score an existing bundle as candidate NAME (site part only), e.g. "
                             "default=runs/demo/bundle after make demo: the default recipe repeats exactly")
    parser.add_argument("--ensemble", nargs="+", default=[], metavar="NAME",
                        help="after the parts: average these candidates' stored site probabilities")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override every candidate (a smoke run, e.g. --set epochs=1 image_size=64)")
    args = parser.parse_args()
    import yaml

    SMOKE.update({k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)})
    if SMOKE:
        record_kind = "recipes-smoke"
    else:
        record_kind = "recipes"
    names = args.only or list(CANDIDATES)
    record: dict[str, Any] = (json.loads(args.resume.read_text()) if args.resume else
                              {"folds": args.folds, "site": str(args.site), "set": SMOKE, "candidates": {}})
    record.setdefault("machine_per_part", [])
    path = args.resume
    with tempfile.TemporaryDirectory(prefix="chestxray-recipes-") as tmp:
        work, bundles = Path(tmp), {}
        for item in args.bundle:
            name, _, where = item.partition("=")
            overrides, tta, what = CANDIDATES[name]
            entry = record["candidates"].setdefault(name, {"overrides": overrides, "tta": tta, "what": what})
            entry.update(train_seconds=None, bundle=where, site=site_figures(Path(where), args.site, tta))
            path = save_result(record_kind, record) if path is None else _rewrite(path, record)
            print(summary_line(name, entry), flush=True)
        if args.bundle and not args.only:
            names = []
        for part in args.parts:
            for name in names:
                overrides, tta, what = CANDIDATES[name]
                if part == "cv" and tta:
                    continue  # same training as the default: its CV is the default's
                entry = record["candidates"].setdefault(name, {"overrides": overrides, "tta": tta, "what": what})
                entry.update(run_site(name, overrides, tta, work, args.site, bundles) if part == "site"
                             else run_cv(name, overrides, args.folds, work, args.site))
                record["machine_per_part"].append({"candidate": name, "part": part, **machine()})
                path = save_result(record_kind, record) if path is None else _rewrite(path, record)
                print(summary_line(name, entry), flush=True)
    if args.ensemble:
        name = "ensemble(" + "+".join(args.ensemble) + ")"
        record["candidates"][name] = {"what": "mean of the members' probabilities", "site": ensemble_figures(
            record, args.ensemble)}
        path = save_result(record_kind, record) if path is None else _rewrite(path, record)
        print(summary_line(name, record["candidates"][name]), flush=True)
    print(f"result: {path}")


def _rewrite(path: Path, record: dict[str, Any]) -> Path:
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def summary_line(name: str, entry: dict[str, Any]) -> str:
    parts = [f"{name:12s}"]
    if "site" in entry:
        s = entry["site"]
        parts.append(f"site acc {100 * s['accuracy']:.1f}% bal {100 * s['balanced_accuracy']:.1f}% "
                     f"ECE {s['ece']:.3f} cover {100 * s.get('set_coverage', float('nan')):.1f}% "
                     f"refer {100 * s.get('referred', float('nan')):.1f}%")
        if entry.get("train_seconds"):
            parts.append(f"train {entry['train_seconds']:.0f} s")
    if "oof" in entry:
        o = entry["oof"]
        parts.append(f"| CV acc {100 * o.get('accuracy', float('nan')):.1f}% "
                     f"bal {100 * o.get('balanced_accuracy', float('nan')):.1f}% ECE {entry.get('oof_ece_uncalibrated', float('nan')):.3f} "
                     f"cover {100 * entry.get('oof_set_coverage', float('nan')):.1f}%")
    if "ensemble_site" in entry:
        s = entry["ensemble_site"]
        parts.append(f"| CV ensemble on site {100 * s['accuracy']:.1f}% bal {100 * s['balanced_accuracy']:.1f}%")
    return " ".join(parts)


if __name__ == "__main__":
    main()
