"""A bundle at a new site (``../shared/datasets/pediatric_site``): unadapted, without labels, and with few labels.

One command, on any bundle trained by ``chestxray train`` (it needs the bundle's ``heldout.npz``):

    .venv/bin/python bench/bench_newsite.py runs/demo/bundle

The site's labels are read only to score; no choice below is made on them. Parts, each on the same
cached outputs of the bundle's model on every site image:

- ``unadapted``: the bundle as trained, and with the classes the site lacks ruled out (``--site-classes``).
- ``unlabeled``: ``chestxray adapt --unlabeled`` (``adapt_unlabeled.fit_unlabeled``), adapted on all the
  site's images and scored on them (transductive, as the command is used), and adapted on a random half
  and scored on the other half (``--halvings``, inductive: images the adaptation never saw).
- ``labels``: ``--suggest N`` against N random images (``--draws`` draws), for N in ``--sizes``: the N
  labelled images plus the unlabelled rest adapt the model (``adapt --unlabeled --labels``), and the
  other images are scored.

Each figure comes with its 95% bootstrap interval (accuracy, balanced accuracy) or its mean and sd over
draws. The result goes to ``bench/results/newsite-*.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, save_result  # noqa: E402


def figures(y: np.ndarray, probs: np.ndarray, sets: np.ndarray | None, ood: np.ndarray | None, classes: list[str],
            seed: int = 0) -> dict[str, Any]:
    from chestxray.stats.metrics import bootstrap_ci, expected_calibration_error
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    pred = probs.argmax(1)
    out: dict[str, Any] = {"n": int(len(y)), "accuracy": float(np.mean(pred == y)),
                           "accuracy_ci": list(bootstrap_ci(lambda t, p: accuracy_score(t, p.argmax(1)), y, probs,
                                                            n_boot=1000, seed=seed)),
                           "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
                           "balanced_accuracy_ci": list(bootstrap_ci(
                               lambda t, p: balanced_accuracy_score(t, p.argmax(1)), y, probs, n_boot=1000, seed=seed)),
                           "ece": float(expected_calibration_error(y, probs)),
                           "recall": {classes[k]: float(np.mean(pred[y == k] == k)) for k in np.unique(y)}}
    if sets is not None:
        refer = sets.sum(1) != 1
        if ood is not None:
            refer |= ood
        out.update(set_coverage=float(sets[np.arange(len(y)), y].mean()), mean_set_size=float(sets.sum(1).mean()),
                   referred=float(refer.mean()), accuracy_unreferred=float(np.mean(pred[~refer] == y[~refer]))
                   if (~refer).any() else None)
    return out


def scored(fitted: Any, features: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """:func:`figures` of a label-free fit (``fit_unlabeled``'s result) on the scored images' features: its
    head, transform, sets and OOD guard, as the child bundle would apply them."""
    from chestxray.stats.conformal import ConformalSets
    from chestxray.stats.ood import OODGuard

    probs = fitted.calibration.transform.probabilities(fitted.head.logits(features))
    sets = ConformalSets.from_dict(fitted.calibration.conformal, classes).sets(probs)
    guard = OODGuard.from_dict(fitted.calibration.ood) if fitted.calibration.ood else None
    return figures(y, probs, sets, guard.is_ood(guard.score(features)) if guard else None, classes)


def backbone_part(args: argparse.Namespace, model: Any, meta: Any, images: np.ndarray, y: np.ndarray,
                  absent: list[int]) -> dict[str, Any]:
    """``adapt --unlabeled --backbone-epochs E``'s arrays: the backbone adapted on all images (scored on them)
    and on random halves (scored on the other half, beside the centroid head alone on the same halves)."""
    from chestxray.model.bundle import HeldOut
    from chestxray.training.adapt import load_local, model_outputs
    from chestxray.training.adapt_backbone import adapt_backbone
    from chestxray.training.adapt_unlabeled import fit_unlabeled, run_reference

    reference = run_reference(args.bundle, meta)
    if reference is None:
        sys.exit(f"{args.bundle}: no run split.csv beside it; --backbone-epochs needs the run's validation images")
    local = load_local(meta, reference, progress=False, min_per_class=1, warn_seen=False)
    present = np.array([k not in absent for k in range(len(meta.classes))])
    every = np.arange(len(y))

    def run(fit_rows: np.ndarray, score_rows: np.ndarray) -> dict[str, Any]:
        child, info = adapt_backbone(model, images[fit_rows], present, epochs=args.backbone_epochs, seed=0)
        held = HeldOut(*model_outputs(child, local.images), local.targets)
        logits, features = model_outputs(child, images)
        fitted = fit_unlabeled(meta, held, logits[fit_rows], features[fit_rows], absent, refit_guard=True)
        return {**scored(fitted, features[score_rows], y[score_rows], list(meta.classes)), "adaptation": info.to_dict()}

    out: dict[str, Any] = {"epochs": args.backbone_epochs, "transductive": run(every, every)}
    for h in range(args.backbone_halvings):
        fit_rows = np.sort(np.random.default_rng(h).permutation(len(y))[: len(y) // 2])
        out[f"half {h}"] = run(fit_rows, np.setdiff1d(every, fit_rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--site", type=Path, default=DATA / "pediatric_site")
    parser.add_argument("--site-classes", default="normal,viral_pneumonia,bacterial_pneumonia")
    parser.add_argument("--halvings", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 50, 100, 200])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--backbone-epochs", type=int, default=0,
                        help="also adapt the backbone (adapt --unlabeled --backbone-epochs E): on all images, and on "
                             "--backbone-halvings random halves scored on the other half")
    parser.add_argument("--backbone-halvings", type=int, default=2)
    parser.add_argument("--parts", nargs="+", default=["unlabeled", "labels"], choices=["unlabeled", "labels"])
    args = parser.parse_args()

    from chestxray.training.adapt import model_outputs, site_absent
    from chestxray.training.adapt_unlabeled import fit_unlabeled
    from chestxray.model.bundle import load_bundle, load_held_out
    from chestxray.stats.conformal import ConformalSets
    from chestxray.trust.label_free import choose_for_labelling
    from chestxray.stats.ood import OODGuard
    from chestxray.data.sources import load_samples
    from chestxray.data.cache import build_cache

    start = time.perf_counter()
    model, meta = load_bundle(args.bundle)
    held = load_held_out(args.bundle, meta)
    if held is None:
        sys.exit(f"{args.bundle}: no heldout.npz; retrain the bundle with this version of chestxray")
    classes = list(meta.classes)
    site = load_samples(args.site).with_classes(classes)
    cache = build_cache(site, meta.preprocessing(), progress=False)
    ok = np.asarray(cache.ok)
    y = site.targets()[ok]
    logits, features = model_outputs(model, np.asarray(cache.images)[ok])
    absent = site_absent(meta, args.site_classes.split(","))
    guard = OODGuard.from_dict(meta.ood) if meta.ood else None
    parent_ood = guard.is_ood(guard.score(features)) if guard else None
    record: dict[str, Any] = {"bundle": str(args.bundle), "model_id": meta.model_id, "site": str(args.site),
                              "site_classes": args.site_classes, "n_site": int(len(y))}

    def parent_figures(rows: np.ndarray, rule_out: bool) -> dict[str, Any]:
        transform = meta.logit_transform().without(absent) if rule_out else meta.logit_transform()
        probs = transform.probabilities(logits[rows])
        found = None
        if meta.conformal:
            sets = ConformalSets.from_dict(meta.conformal, classes)
            if rule_out:
                sets = dataclasses.replace(sets, absent=tuple(classes[k] for k in absent))
            found = sets.sets(probs)
        return figures(y[rows], probs, found,
                       parent_ood[rows] if parent_ood is not None else None, classes)

    def adapted_figures(fit_rows: np.ndarray, score_rows: np.ndarray, known: np.ndarray | None = None,
                        seed: int = 0) -> dict[str, Any]:
        fitted = fit_unlabeled(meta, held, logits[fit_rows], features[fit_rows], absent, seed=seed,
                               known=None if known is None else known[fit_rows])
        return {**scored(fitted, features[score_rows], y[score_rows], classes), "domain_auc": fitted.shift["domain_auc"]}

    every = np.arange(len(y))
    record["unadapted"] = parent_figures(every, False)
    record["ruled_out"] = parent_figures(every, True)
    halves: list[dict[str, Any]] = []

    def halving(h: int) -> tuple[np.ndarray, np.ndarray]:
        fit_rows = np.sort(np.random.default_rng(h).permutation(len(y))[: len(y) // 2])
        return fit_rows, np.setdiff1d(every, fit_rows)

    if "unlabeled" in args.parts:
        record["unlabeled_transductive"] = adapted_figures(every, every)
        for h in range(args.halvings):
            fit_rows, score_rows = halving(h)
            halves.append({"parent": parent_figures(score_rows, True), "adapted": adapted_figures(fit_rows, score_rows)})
        record["unlabeled_halves"] = halves
    if args.backbone_epochs:
        record["backbone"] = backbone_part(args, model, meta, np.asarray(cache.images)[ok], y, absent)

    probs_all = meta.logit_transform().without(absent).probabilities(logits)
    labels_part: dict[str, Any] = {}
    for n in (args.sizes if "labels" in args.parts else []):
        suggested = choose_for_labelling(probs_all, features, n, seed=0)
        rows = {"suggested": [suggested],
                "random": [np.random.default_rng(1000 + d).choice(len(y), n, replace=False) for d in range(args.draws)]}
        labels_part[str(n)] = {}
        for how, draws in rows.items():
            found = []
            for chosen in draws:
                known = np.full(len(y), -1)
                known[chosen] = y[chosen]
                rest = np.setdiff1d(every, chosen)
                adapted = adapted_figures(every, rest, known)
                found.append({"accuracy": adapted["accuracy"], "balanced_accuracy": adapted["balanced_accuracy"],
                              "set_coverage": adapted["set_coverage"], "referred": adapted["referred"],
                              "parent_accuracy": parent_figures(rest, True)["accuracy"]})
            labels_part[str(n)][how] = {k: {"mean": float(np.mean([f[k] for f in found])),
                                            "sd": float(np.std([f[k] for f in found]))} for k in found[0]}
    record["labels"] = labels_part
    record["seconds"] = round(time.perf_counter() - start, 1)
    path = save_result("newsite", record)

    def line(name: str, f: dict[str, Any]) -> str:
        lo, hi = f["accuracy_ci"]
        sets = (f"; sets cover {100 * f['set_coverage']:.1f}%, referred {100 * f['referred']:.1f}%"
                if "set_coverage" in f else "")
        return (f"{name:28s} accuracy {100 * f['accuracy']:.1f}% ({100 * lo:.1f}-{100 * hi:.1f}), balanced "
                f"{100 * f['balanced_accuracy']:.1f}%, ECE {f['ece']:.3f}{sets}")

    print(line("unadapted", record["unadapted"]))
    print(line("site classes declared", record["ruled_out"]))
    if "unlabeled_transductive" in record:
        print(line("--unlabeled (all images)", record["unlabeled_transductive"]))
    for part in ("transductive", *(f"half {h}" for h in range(args.backbone_halvings))):
        if args.backbone_epochs and part in record["backbone"]:
            print(line(f"backbone {part}", record["backbone"][part]))
    for name in (("accuracy", "set_coverage", "referred") if halves else ()):
        before = [h["parent"][name] for h in halves]
        after = [h["adapted"][name] for h in halves]
        print(f"halves ({args.halvings}), other half scored: {name} {100 * np.mean(before):.1f}% -> "
              f"{100 * np.mean(after):.1f}% (sd {100 * np.std(after):.1f})")
    for n, part in labels_part.items():
        s, r = part["suggested"]["accuracy"], part["random"]["accuracy"]
        print(f"{n:>4} labels: suggested {100 * s['mean']:.1f}%, random {100 * r['mean']:.1f}% +- {100 * r['sd']:.1f} "
              f"(parent on the same images {100 * part['random']['parent_accuracy']['mean']:.1f}%)")
    print(f"result: {path}")


if __name__ == "__main__":
    main()
