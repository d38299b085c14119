"""A model at a new site: what `chestxray adapt` buys, measured on random halves of a labelled "site".

Three parts (all by default), each writing its JSON to bench/results/:

- ``pneumoniamnist`` (``site-pneumoniamnist-*.json``): the default model trained on PneumoniaMNIST's
  train/val split with the settings of ``bench_protocol.py pneumoniamnist`` (the default recipe at
  128 px, 8 epochs: the official-split row of the README); its test split is the new site. Each of ``--halvings`` random stratified halves adapts the model (every mode) and the
  other half is scored, against the unadapted model on the same half: "adapted with N local labels".
- ``course`` (``site-course-*.json``): the same PneumoniaMNIST model moved to the course dataset's
  normal and pneumonia images (viral and bacterial pneumonia as "pneumonia"), taken from the course's
  ``train/`` only (its ``test/`` is never read here), halved by patient. PneumoniaMNIST and these
  images both come from Kermany et al.'s pediatric set: the shift is the image pipeline (28 px
  thumbnails upscaled vs full-resolution files), and some site images may be full-size versions of
  PneumoniaMNIST training images, which content hashes cannot recognise.
- ``ece`` (``site-ece-*.json``): expected calibration error of the default models on the course test
  split and on PneumoniaMNIST's test split, without calibration, with the former calibration (a
  temperature fitted on the validation images) and with the current one (chosen by cross-validated
  NLL on the validation images, never sharpening). Needs ``--course-bundle`` (a default course bundle
  with its run folder's ``split.csv`` beside it, e.g. ``runs/demo/bundle``).

Every setting was fixed before the test images were read: the adaptation runs as ``chestxray adapt``
does, with its defaults (fine-tuning: ``adapt.FINETUNE_DEFAULTS``).

    .venv/bin/python bench/bench_site.py --course-bundle runs/demo/bundle
    .venv/bin/python bench/bench_site.py pneumoniamnist --halvings 10 --modes recalibrate finetune
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, fast_allocator, save_result  # noqa: E402

from chestxray.training.adapt import MODES, LocalSample, finetune, load_local, model_outputs, recalibration  # noqa: E402
from chestxray.model.bundle import load_bundle, read_meta  # noqa: E402
from chestxray.data.cache import build_cache  # noqa: E402
from chestxray.stats.logit_transform import TRAIN_KINDS, LogitTransform, choose_logit_transform, fold_indices  # noqa: E402
from chestxray.training.config import TrainConfig  # noqa: E402
from chestxray.stats.metrics import expected_calibration_error, fit_temperature  # noqa: E402
from chestxray.data.sources import Samples, load_samples  # noqa: E402
from chestxray.training.train import fit  # noqa: E402

PNEUMONIAMNIST = DATA / "pneumoniamnist" / "pneumoniamnist.npz"
COURSE = DATA / "chest_xray_4class"
PM_CONFIG = {"image_size": 128, "epochs": 8, "frozen_stride": 0}
"""The default recipe with the two settings ``bench_protocol.py pneumoniamnist`` gives PneumoniaMNIST (its
28-px images upscaled to 128 px, 8 epochs), everything else the current default's."""
ANCHOR = {"Google AutoML Vision (official test split)": {"accuracy": 0.946, "auc": 0.991}}


def pneumoniamnist_bundle(work: Path, cache: Path) -> Path:
    """The default PneumoniaMNIST model (trained once, then reused from ``work`` while its config is the
    current default's)."""
    run_dir = work / "pneumoniamnist-default"
    if (run_dir / "bundle" / "model.json").is_file():
        if read_meta(run_dir / "bundle").extra.get("config") == TrainConfig(**PM_CONFIG).to_dict():
            return run_dir / "bundle"
        raise SystemExit(f"{run_dir} was trained with another recipe than today's default: remove it or pass "
                         "another --work")
    print(f"training the default on PneumoniaMNIST train/val -> {run_dir}")
    return fit(PNEUMONIAMNIST, TrainConfig(**PM_CONFIG), out_dir=work, name=run_dir.name, cache_dir=cache,
               progress=False).bundle_dir


def scores(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, ROC-AUC (macro one-vs-rest), ECE and per-class sensitivity."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    pred = probs.argmax(1)
    auc = roc_auc_score(y, probs[:, 1]) if probs.shape[1] == 2 else roc_auc_score(y, probs, multi_class="ovr")
    return {"accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "auc": float(auc), "ece": expected_calibration_error(y, probs),
            **{f"sensitivity_{name}": float((pred[y == k] == k).mean()) for k, name in enumerate(classes)}}


def halvings(bundle_dir: Path, local: LocalSample, n: int, modes: list[str], work: Path, cache: Path,
             with_groups: bool) -> dict[str, Any]:
    """Adapt on a random half, score the other half, ``n`` times; every mode against the unadapted model."""
    model, meta = load_bundle(bundle_dir)
    classes = list(meta.classes)
    logits, features = model_outputs(model, local.images)
    before = meta.logit_transform().probabilities(logits)
    groups = local.samples.groups() if with_groups else None
    rows: list[dict[str, Any]] = []
    for h in range(n):
        fit_rows, held_rows = fold_indices(local.targets, 2, seed=h, groups=groups)[0]
        y = local.targets[held_rows]
        row = {"halving": h, "n_adapt": len(fit_rows), "n_scored": len(held_rows),
               "unadapted": scores(y, before[held_rows], classes)}
        start = time.perf_counter()
        if "recalibrate" in modes:
            adapted = recalibration(model, meta, logits[fit_rows], features[fit_rows], local.targets[fit_rows],
                                    groups[fit_rows] if groups is not None else None, seed=h)
            row["recalibrate"] = scores(y, adapted.transform.probabilities(logits[held_rows]), classes)
            row["recalibrate"]["transform"] = adapted.transform.describe()
        if "finetune" in modes:
            tuned = finetune(bundle_dir, meta, local, fit_rows, work / f"finetune-{h}", seed=h, cache_dir=cache)
            row["finetune"] = scores(y, tuned.probabilities(local.images[held_rows]), classes)
            row["finetune"]["transform"] = tuned.transform.describe()
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"halving {h}: " + ", ".join(f"{k} acc {row[k]['accuracy']:.3f} auc {row[k]['auc']:.3f} "
                                            f"ece {row[k]['ece']:.3f}" for k in ("unadapted", *modes)), flush=True)
    return {"halvings": rows, "summary": summarise(rows, ["unadapted", *modes])}


def summarise(rows: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Mean and sample sd over halvings of every figure of every arm, and of each mode minus unadapted."""
    out: dict[str, Any] = {}
    names = [k for k, v in rows[0]["unadapted"].items() if isinstance(v, float)]
    for arm in arms:
        out[arm] = {name: {"mean": float(np.mean([r[arm][name] for r in rows])),
                           "sd": float(np.std([r[arm][name] for r in rows], ddof=1))} for name in names}
        if arm != "unadapted":
            diffs = {name: [r[arm][name] - r["unadapted"][name] for r in rows] for name in names}
            out[f"{arm}_minus_unadapted"] = {name: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)),
                                                    "better_in": int(sum(d > 0 for d in v))}
                                             for name, v in diffs.items()}
    return out


def part_pneumoniamnist(args: argparse.Namespace, work: Path, cache: Path) -> None:
    bundle_dir = pneumoniamnist_bundle(work, cache)
    _, meta = load_bundle(bundle_dir)
    test = load_samples(PNEUMONIAMNIST).split("test")
    local = load_local(meta, test, cache_dir=cache, progress=False)
    official = _official(bundle_dir, local)
    result = halvings(bundle_dir, local, args.halvings, args.modes, work / "pm-halvings", cache, with_groups=False)
    record = {"part": "pneumoniamnist", "bundle": str(bundle_dir), "site": f"{PNEUMONIAMNIST}::test",
              "n_site": len(local.images), "official_test_unadapted": official,
              "report_as": f"adapted with {result['halvings'][0]['n_adapt']} local labels, scored on the other "
                           f"{result['halvings'][0]['n_scored']} test images (not the official-split figure)",
              "modes": args.modes, "anchors": ANCHOR, **result}
    print(f"result: {save_result('site-pneumoniamnist', record)}")
    _print_summary(result["summary"])


def _official(bundle_dir: Path, local: LocalSample) -> dict[str, Any]:
    model, meta = load_bundle(bundle_dir)
    logits = model_outputs(model, local.images)[0]
    return scores(local.targets, meta.logit_transform().probabilities(logits), list(meta.classes))


def course_site(work: Path) -> Path:
    """A manifest of the course's train/ normal, viral and bacterial images as normal / pneumonia."""
    samples = load_samples(COURSE)
    frame = samples.frame[samples.frame["split"] != "test"]
    mapping = {"normal": "normal", "viral_pneumonia": "pneumonia", "bacterial_pneumonia": "pneumonia"}
    frame = frame[frame["label"].isin(mapping)]
    path = work / "course-normal-pneumonia.csv"
    pd.DataFrame({"path": frame["path"], "label": frame["label"].map(mapping),
                  "patient_id": frame["patient_id"]}).to_csv(path, index=False)
    return path


def part_course(args: argparse.Namespace, work: Path, cache: Path) -> None:
    bundle_dir = pneumoniamnist_bundle(work, cache)
    _, meta = load_bundle(bundle_dir)
    manifest = course_site(work)
    local = load_local(meta, manifest, cache_dir=cache, progress=False)
    result = halvings(bundle_dir, local, args.halvings, args.modes, work / "course-halvings", cache, with_groups=True)
    record = {"part": "course", "bundle": str(bundle_dir), "site": str(manifest),
              "site_description": "course train/ normal vs viral+bacterial pneumonia (test/ never read), "
                                  "halved by patient",
              "n_site": len(local.images), "class_counts": local.class_counts(),
              "report_as": f"PneumoniaMNIST model adapted with about {result['halvings'][0]['n_adapt']} local labels",
              "modes": args.modes, **result}
    print(f"result: {save_result('site-course', record)}")
    _print_summary(result["summary"])


def part_ece(args: argparse.Namespace, work: Path, cache: Path) -> None:
    record: dict[str, Any] = {"part": "ece"}
    pm_bundle = pneumoniamnist_bundle(work, cache)
    pm = load_samples(PNEUMONIAMNIST)
    record["pneumoniamnist"] = _ece_figures(pm_bundle, pm.split("val"), pm.split("test"), cache)
    if args.course_bundle:
        course = load_samples(COURSE)
        split = pd.read_csv(Path(args.course_bundle).parent / "split.csv", dtype=str, keep_default_na=False)
        val_files = {str(Path(p).resolve()) for p in split.loc[split["subset"] == "val", "path"]}
        pool = course.subset(course.frame["split"] != "test")
        val = pool.subset(pool.frame["path"].map(lambda p: str(Path(p).resolve()) in val_files))
        if len(val) != len(val_files):
            raise SystemExit(f"{len(val_files)} validation files in the split, {len(val)} found in {COURSE}")
        record["course"] = _ece_figures(Path(args.course_bundle), val, course.split("test"), cache)
    else:
        record["course"] = "skipped: pass --course-bundle"
    print(f"result: {save_result('site-ece', record)}")
    for name in ("pneumoniamnist", "course"):
        if isinstance(record[name], dict):
            e = record[name]["test_ece"]
            print(f"{name} test ECE: uncalibrated {e['uncalibrated']:.3f}, former temperature "
                  f"{e['former_temperature']:.3f}, current calibration {e['current']:.3f} "
                  f"({record[name]['current_calibration']})")


def _ece_figures(bundle_dir: Path, val: Samples, test: Samples, cache: Path) -> dict[str, Any]:
    """Test-split ECE under each calibration; both calibrations fitted on the validation images only."""
    model, meta = load_bundle(bundle_dir)
    val = Samples(val.frame, list(meta.classes), val.task, val.origin)
    test = Samples(test.frame, list(meta.classes), test.task, test.origin)

    def logits_of(samples: Samples) -> tuple[np.ndarray, np.ndarray]:
        built = build_cache(samples, meta.preprocessing(), cache_dir=cache, progress=False)
        return model_outputs(model, np.asarray(built.images)[built.ok])[0], samples.targets()[built.ok]

    val_logits, val_y = logits_of(val)
    test_logits, test_y = logits_of(test)
    former = LogitTransform.from_temperature(fit_temperature(val_logits, val_y))
    # what training's calibration (chestxray.calibration.calibrate_outputs) chooses on these validation images
    current = choose_logit_transform(val_logits, val_y, "multiclass", kinds=TRAIN_KINDS, sharpen=False,
                                     groups=val.groups())
    arms = {"uncalibrated": LogitTransform(), "former_temperature": former, "current": current.transform}
    return {"bundle": str(bundle_dir), "n_val": int(len(val_y)), "n_test": int(len(test_y)),
            "former_calibration": former.describe(), "current_calibration": current.transform.describe(),
            "current_choice": current.to_dict(),
            "val_ece": {k: expected_calibration_error(val_y, t.probabilities(val_logits)) for k, t in arms.items()},
            "test_ece": {k: expected_calibration_error(test_y, t.probabilities(test_logits)) for k, t in arms.items()},
            "test_accuracy": float((test_logits.argmax(1) == test_y).mean())}


def _print_summary(summary: dict[str, Any]) -> None:
    for arm, figures in summary.items():
        print(f"{arm}: " + ", ".join(f"{k} {v['mean']:.3f} ± {v['sd']:.3f}" for k, v in figures.items()))


def main() -> None:
    fast_allocator()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["pneumoniamnist", "course", "ece"],
                        choices=["pneumoniamnist", "course", "ece"])
    parser.add_argument("--halvings", type=int, default=10)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--course-bundle", type=Path, help="default course bundle (for the ECE part)")
    parser.add_argument("--work", type=Path, default=Path("runs/site"), help="trained model and caches (reused)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "cache"
    for part in args.parts:
        {"pneumoniamnist": part_pneumoniamnist, "course": part_course, "ece": part_ece}[part](args, args.work, cache)


if __name__ == "__main__":
    main()
