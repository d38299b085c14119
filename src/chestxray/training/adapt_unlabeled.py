"""Site adaptation without labels, and which labels to ask for.

``adapt_unlabeled(bundle, images, out)`` writes a child bundle from the site's unlabelled images alone:

1. the parent scores the images (features and probabilities; classes the site declares absent ruled out);
2. each image gets the label of its nearest class centroid in feature space (:mod:`chestxray.label_free`);
3. a new classifier layer is fitted to those pseudo-labels and replaces the parent's (the backbone is
   unchanged), so every backend and reader of a bundle runs it;
4. the logit transform, the operating points and the prediction sets are refitted on the parent's
   held-out validation images (its ``heldout.npz``, true labels) through the new layer, the sets as
   weighted split conformal with the likelihood ratio site / validation of a domain classifier;
5. the OOD guard's reference scores and the drift reference are refitted on the site's images.

What adaptation changed is reported without a label (agreement with the parent, class shares,
confidence, set sizes, referrals); what cannot be checked without labels is said so.

``suggest_labels(bundle, images, n, out_csv)`` writes the ``n`` images whose labels would help most
(diversity by k-means on the features, uncertainty by entropy within each cluster) as a CSV to fill in.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from .adapt import load_local, model_outputs, site_absent, site_coverage, site_lineage
from ..model.bundle import BundleMeta, HeldOut, load_bundle, load_held_out, save_bundle
from ..data.cache import build_cache
from ..trust.calibration import Calibration, calibrate_outputs
from ..stats.conformal import ConformalSets
from ..console import make_console
from ..errors import ChestXrayError, InputError
from ..trust.label_free import (MIN_SITE_IMAGES, choose_for_labelling, choose_head_labels, centroid_pseudo_labels, domain_weights,
                         SiteHead, fit_site_head, label_free_summary)
from ..trust.lineage import check_seen, data_fingerprint, short_hash
from ..model.models import ChestXrayNet, EnsembleNet
from ..stats.ood import OODGuard
from ..inference.predict import expand_inputs
from ..data.sources import Samples
from ..storage import staged_folder, write_text

if TYPE_CHECKING:
    from ..deploy.export import ExportResult

__all__ = ["adapt_unlabeled", "fit_unlabeled", "reference_held_out", "run_reference", "UnlabeledResult", "suggest_labels", "site_images",
           "REPORT_FILE"]

REPORT_FILE = "adaptation.json"
console = make_console(stderr=True)


@dataclass
class SiteImages:
    """The readable site images (uint8 squares at the bundle's preprocessing) and their files."""

    paths: list[str]
    images: np.ndarray
    failed: list[tuple[str, str]]


@dataclass
class UnlabeledResult:
    """The child bundle and what adaptation changed, measured without labels (``summary``)."""

    bundle_dir: Path
    summary: dict[str, Any]
    site: SiteImages
    onnx: ExportResult | None = None
    """The child's ONNX export (its new classifier layer), parity-checked on site X-rays; ``None``: ``onnx=False``."""


def site_images(meta: BundleMeta, data: str | Path | Sequence[str | Path], *, cache_dir: str | Path | None = None,
                progress: bool = True) -> SiteImages:
    """Every image file under ``data`` (files, folders searched recursively, globs; labels, if any, are
    ignored), decoded and resized as the bundle's model expects; unreadable files are named and left out."""
    inputs = [data] if isinstance(data, (str, Path)) else list(data)
    entries = expand_inputs(inputs)
    failed = [(file, error) for file, error in entries if error is not None]
    files = [file for file, error in entries if error is None]
    if not files:
        raise ChestXrayError(f"{', '.join(map(str, inputs))}: no image files to adapt on")
    frame = pd.DataFrame({"path": files, "label": "", "patient_id": "", "split": ""})
    cache = build_cache(Samples(frame, list(meta.classes), "multiclass", str(inputs[0])), meta.preprocessing(),
                        cache_dir=cache_dir, progress=progress)
    failed += [(files[row], reason) for row, reason in sorted(cache.failed.items())]
    ok = np.asarray(cache.ok)
    if failed:
        named = "; ".join(f"{file}: {reason}" for file, reason in failed[:5])
        console.print(f"[yellow]{len(failed)} unreadable site image(s) left out[/] ({named}"
                      f"{'; ...' if len(failed) > 5 else ''})", soft_wrap=True, highlight=False)
    return SiteImages([f for f, good in zip(files, ok) if good], np.asarray(cache.images)[ok], failed)


def _with_head(model: ChestXrayNet, weight: np.ndarray, bias: np.ndarray) -> ChestXrayNet:
    """A copy of ``model`` whose classifier layer is ``weight`` (C, F) and ``bias`` (C,)."""
    child = copy.deepcopy(model)
    layer = child.backbone.get_classifier()
    if not isinstance(layer, torch.nn.Linear) or tuple(layer.weight.shape) != weight.shape:
        raise ChestXrayError(f"{model.arch}: its classifier is not one linear layer on the pooled features; "
                             "label-free adaptation cannot replace it")
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))
    return child.eval()


@dataclass
class Fitted:
    """What label-free adaptation fits from the arrays: the head, its calibration, the pseudo-labels."""

    head: SiteHead
    calibration: Calibration
    pseudo: np.ndarray
    shift: dict[str, Any]


def fit_unlabeled(meta: BundleMeta, held: HeldOut, logits: np.ndarray, features: np.ndarray, absent: Sequence[int], *,
                  seed: int = 0, known: np.ndarray | None = None, refit_guard: bool = False) -> Fitted:
    """Steps 2-5 of the module docstring on the parent's outputs for the site's images (``logits``,
    ``features``) and its held-out reference ``held``; ``known``: labels a person gave (-1: none).
    ``refit_guard``: the features are a new backbone's (:mod:`.adapt_backbone`), so the OOD guard is fitted
    again on ``held`` (its axes), not only given the site's scores as reference."""
    classes = list(meta.classes)
    present = np.array([k not in absent for k in range(len(classes))])
    before = meta.logit_transform().without(absent).probabilities(logits)
    pseudo, _ = centroid_pseudo_labels(before, features, present, known)
    head_rows, head_labels, head_choice = np.arange(len(pseudo)), pseudo, None
    if known is not None and (known >= 0).any():
        head_rows, head_labels, head_choice = choose_head_labels(before, features, present, known, pseudo, seed=seed)
    head = fit_site_head(features[head_rows], head_labels, len(classes), seed=seed)
    # trust parts on the parent's validation images through the new head, weighted towards the site
    keep = present[held.targets]
    ref_logits, ref_features, ref_targets = head.logits(held.features[keep]), held.features[keep], held.targets[keep]
    ref_weights, site_weights, shift = domain_weights(ref_features, features, seed=seed)
    ood = None
    if meta.ood:
        guard = OODGuard.from_dict(meta.ood)
        if refit_guard:
            guard = OODGuard.fit(held.features, held.targets, n_components=len(guard.variances), quantile=guard.quantile)
        ood = guard.with_reference(guard.score(features)).to_dict()
    fitted_on = (f"the parent's {int(keep.sum())} validation images through the site head, weighted towards the site's "
                 f"{len(features)} images (chestxray adapt --unlabeled)")
    # a temperature at most: the site head decides, and a per-class transform fitted on the parent's own
    # validation images would move its decisions back towards them (measured: 90.7% -> 85.6% with 100 labels)
    calibration = calibrate_outputs(ref_logits, ref_targets, classes=classes, task="multiclass",
                                    features=ref_features, ood=ood, fitted_on=fitted_on, seed=seed,
                                    kinds=("none", "temperature"),
                                    coverage=site_coverage(meta), absent=absent, weights=ref_weights,
                                    test_weight=float(np.quantile(site_weights, 0.9)))
    if head_choice is not None:
        shift = {**shift, "head_fitted_on": head_choice}
    return Fitted(head, calibration, pseudo, shift)


def _known_labels(meta: BundleMeta, site: SiteImages, labels: str | Path | None) -> np.ndarray | None:
    """Per site image, the label a person gave in the CSV ``labels`` (``path,label``, as ``--suggest``
    writes it, blanks allowed), -1 where none; one-line errors for unknown classes or files."""
    if labels is None:
        return None
    try:
        table = pd.read_csv(labels, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise InputError(labels, f"cannot read the labels CSV ({err})") from None
    if not {"path", "label"} <= set(table.columns):
        raise InputError(labels, "the labels CSV needs the columns path and label (as --suggest writes it)")
    table = table[table["label"].str.strip() != ""]
    unknown = sorted(set(table["label"].str.strip()) - set(meta.classes))
    if unknown:
        raise InputError(labels, f"labels {', '.join(unknown)} are not the model's classes ({', '.join(meta.classes)})")
    where = {str(Path(p).resolve()): i for i, p in enumerate(site.paths)}
    known = np.full(len(site.paths), -1)
    missing = [p for p in table["path"] if str(Path(p).resolve()) not in where]
    if missing:
        raise InputError(labels, f"{len(missing)} labelled file(s) are not among the site's readable images, "
                                 f"e.g. {missing[0]}")
    for path, label in zip(table["path"], table["label"].str.strip()):
        known[where[str(Path(path).resolve())]] = list(meta.classes).index(label)
    return known


def reference_held_out(parent: ChestXrayNet, meta: BundleMeta, reference: str | Path | Samples, *,
                       cache_dir: str | Path | None = None, progress: bool = True) -> HeldOut:
    """A held-out reference for a bundle without ``heldout.npz`` (trained before it existed): the parent's
    outputs on ``reference``, labelled images of the population it was trained for that it never trained
    on (e.g. the validation images of its run's ``split.csv``, or its source's test split). Every class of
    the model needs an image; images the bundle trained on are warned about (their scores are too good)."""
    local = load_local(meta, reference, cache_dir=cache_dir, progress=progress, min_per_class=1)
    logits, features = model_outputs(parent, local.images)
    return HeldOut(np.asarray(logits, np.float32), np.asarray(features, np.float32), np.asarray(local.targets))


def run_reference(bundle_dir: str | Path, meta: BundleMeta) -> Samples | None:
    """The validation images of the run that trained the bundle: the ``val`` rows of the ``split.csv`` in the
    run folder above the bundle, when every one is still there and is, by content, one of the bundle's own
    validation images (its ``seen_images`` record); ``None`` otherwise."""
    split = Path(bundle_dir).parent / "split.csv"
    if not split.is_file() or not meta.seen_images:
        return None
    try:
        table = pd.read_csv(split, dtype=str, keep_default_na=False)
        table = table[table["subset"] == "val"]
    except (OSError, ValueError, KeyError):
        return None
    paths = table["path"].tolist()
    if table.empty or not set(table["label"]) <= set(meta.classes) or not all(Path(p).is_file() for p in paths):
        return None
    seen = check_seen(meta.seen_images, paths)
    if seen is None or seen.n_val != len(paths) or seen.n_train:
        return None
    frame = pd.DataFrame({"path": paths, "label": table["label"].tolist(), "split": "",
                          "patient_id": table.get("patient_id", pd.Series([""] * len(paths))).tolist(),
                          "source": str(split)})
    return Samples(frame, list(meta.classes), "multiclass", str(split))


def _adapted_backbone(parent: ChestXrayNet, meta: BundleMeta, bundle_dir: Path, site: SiteImages, absent: Sequence[int],
                      reference: str | Path | Samples | None, *, epochs: int, seed: int,
                      cache_dir: str | Path | None, progress: bool) -> tuple[ChestXrayNet, HeldOut, dict[str, Any]]:
    """The parent with its backbone adapted to the site (:func:`.adapt_backbone.adapt_backbone`), and its
    held-out reference through the new backbone: the run's validation images (:func:`run_reference`) or
    ``reference``, since the stored ``heldout.npz`` features are the old backbone's."""
    from .adapt_backbone import adapt_backbone

    ref = reference if reference is not None else run_reference(bundle_dir, meta)
    if ref is None:
        raise ChestXrayError(f"{bundle_dir}: --backbone-epochs needs labelled images of the bundle's own kind that it "
                             "did not train on, to refit the prediction sets through the new backbone; its run "
                             "folder's split.csv is not beside it: give --reference DATA")
    local = load_local(meta, ref, cache_dir=cache_dir, progress=progress, min_per_class=1, warn_seen=reference is not None)
    present = np.array([k not in absent for k in range(len(meta.classes))])

    def report(epoch: int, record: Any) -> None:
        if progress:
            console.print(f"backbone epoch {epoch}/{epochs}: loss {record.loss[-1]:.3f}, pseudo-labels changed "
                          f"{100 * record.pseudo_changed[-1]:.1f}%", soft_wrap=True, highlight=False)

    child, record = adapt_backbone(parent, site.images, present, epochs=epochs, seed=seed, on_epoch=report)
    ref_logits, ref_features = model_outputs(child, local.images)
    held = HeldOut(np.asarray(ref_logits, np.float32), np.asarray(ref_features, np.float32), np.asarray(local.targets))
    return child, held, {**record.to_dict(), "reference": f"{len(local.images)} labelled images ({local.samples.origin})"}


def adapt_unlabeled(bundle: str | Path, data: str | Path | Sequence[str | Path], out: str | Path, *,
                    site_classes: Sequence[str] | None = None, seed: int = 0, cache_dir: str | Path | None = None,
                    progress: bool = True, labels: str | Path | None = None, onnx: bool = True,
                    reference: str | Path | Samples | None = None, backbone_epochs: int = 0) -> UnlabeledResult:
    """Adapt ``bundle`` to a site from its unlabelled images (see the module docstring); write the child to
    ``out``. ``labels``: a CSV (``path,label``) of the images a person labelled, e.g. those ``--suggest``
    chose; they keep their labels and anchor the centroids. ``reference``: labelled images standing in for
    the bundle's ``heldout.npz`` (:func:`reference_held_out`), for bundles trained without one.
    ``backbone_epochs``: first train the backbone on the site's images for that many epochs (SHOT-IM,
    :mod:`.adapt_backbone`; 0: the parent's backbone is kept); its reference is the run's validation images
    (:func:`run_reference`) or ``reference``."""
    bundle_dir, out = Path(bundle), Path(out)
    if out.resolve() == bundle_dir.resolve():
        raise ChestXrayError(f"{out}: the child bundle needs its own folder (not the parent's)")
    parent, meta = load_bundle(bundle_dir)
    if isinstance(parent, EnsembleNet) or meta.task != "multiclass":
        raise ChestXrayError(f"{bundle_dir}: label-free adaptation needs a single multi-class model "
                             "(not a cross-validation ensemble or a multi-label model)")
    held: HeldOut | None = None  # with backbone_epochs: made through the new backbone below (heldout.npz is stale)
    if not backbone_epochs:
        held = (reference_held_out(parent, meta, reference, cache_dir=cache_dir, progress=progress)
                if reference is not None else load_held_out(bundle_dir, meta))
    if held is None and not backbone_epochs:
        raise ChestXrayError(f"{bundle_dir}: the bundle has no held-out reference (heldout.npz, written by chestxray "
                             "train since label-free adaptation exists); give --reference DATA (labelled images of "
                             "its own kind that it did not train on), retrain it, or adapt with labels")
    absent = site_absent(meta, site_classes)
    classes = list(meta.classes)
    site = site_images(meta, data, cache_dir=cache_dir, progress=progress)
    if len(site.images) < MIN_SITE_IMAGES:
        raise ChestXrayError(f"{data}: {len(site.images)} readable site images; label-free adaptation needs at "
                             f"least {MIN_SITE_IMAGES}")
    known = _known_labels(meta, site, labels)
    if known is not None and np.isin(known, absent).any():
        raise ChestXrayError(f"{labels}: labelled images of a class declared absent by --site-classes "
                             f"({', '.join(sorted({classes[k] for k in known if k in absent}))}); declare it present")
    logits, features = model_outputs(parent, site.images)
    parent_transform = meta.logit_transform()
    base, site_logits, site_features, backbone = parent, logits, features, None
    if backbone_epochs:
        base, held, backbone = _adapted_backbone(parent, meta, bundle_dir, site, absent, reference, epochs=backbone_epochs,
                                                 seed=seed, cache_dir=cache_dir, progress=progress)
        site_logits, site_features = model_outputs(base, site.images)
    fitted = fit_unlabeled(meta, held, site_logits, site_features, absent, seed=seed, known=known,
                           refit_guard=backbone is not None)
    head, calibration, pseudo, shift = fitted.head, fitted.calibration, fitted.pseudo, fitted.shift
    child_model = _with_head(base, head.weight, head.bias)
    after = calibration.transform.probabilities(head.logits(site_features))
    after_sets = ConformalSets.from_dict(calibration.conformal, classes).sets(after)
    before_sets = (ConformalSets.from_dict(meta.conformal, classes).sets(parent_transform.probabilities(logits))
                   if meta.conformal else None)
    def flagged(guard: dict[str, Any] | None, on: np.ndarray) -> np.ndarray | None:
        if not guard:
            return None
        fitted = OODGuard.from_dict(guard)
        return fitted.is_ood(fitted.score(on))

    before_ood, after_ood = flagged(meta.ood, features), flagged(calibration.ood, site_features)
    summary = label_free_summary(parent_transform.probabilities(logits), after, classes, before_sets=before_sets,
                                 after_sets=after_sets, before_ood=before_ood, after_ood=after_ood)
    summary.update(mode="unlabeled", absent_classes=[classes[k] for k in absent], domain_shift=shift,
                   labelled_by_a_person=int((known >= 0).sum()) if known is not None else 0,
                   pseudo_label_shares={name: round(float(np.mean(pseudo == k)), 4) for k, name in enumerate(classes)},
                   unreadable=[{"file": f, "reason": r} for f, r in site.failed],
                   method="each site image labelled by its nearest class centroid in feature space (centroids "
                          "weighted by the parent's probabilities; SHOT, Liang et al. 2020); a new classifier "
                          "layer fitted to those labels; transform, operating points and weighted split-conformal "
                          "sets (Tibshirani et al. 2019) refitted on the parent's validation images; OOD and "
                          "drift references refitted on the site's images"
                          + ("; first, the backbone trained on the site's images without labels (SHOT-IM, "
                             "classifier frozen)" if backbone else ""))
    if backbone:
        summary["backbone"] = backbone
    calibration.reference.update(n=int(len(after)), note=f"the site's {len(after)} unlabelled images",
                                 predicted_shares=summary["after"]["predicted_shares"],
                                 referral_rate=summary["after"].get("referred_share"))
    hashes = np.array([short_hash(p) or 0 for p in site.paths], dtype=np.uint64)
    lineage = site_lineage(bundle_dir, meta, "unlabeled", data,
                             fingerprint=data_fingerprint(hashes, [""] * len(hashes)), n_images=len(site.images),
                             n_unreadable=len(site.failed), absent_classes=summary["absent_classes"])
    extra = {**meta.extra, **calibration.extra_fields(), "calibration_choice": calibration.transform_choice,
             "adaptation": {k: v for k, v in summary.items() if k != "unreadable"}}
    child_meta = dataclasses.replace(meta, **calibration.bundle_fields(), lineage=lineage, extra=extra,
                                     created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    with staged_folder(out) as out_dir:  # nothing of the child in --out until all of it is written
        save_bundle(out_dir, child_model, child_meta)
        write_text(out_dir / REPORT_FILE, json.dumps(summary, indent=2) + "\n")
        exported = None
        if onnx:
            from ..deploy.export import PARITY_IMAGES, export_onnx

            exported = export_onnx(out_dir, parity_images=site.paths[:PARITY_IMAGES])
    out_dir = Path(out)
    if exported is not None:
        exported = dataclasses.replace(exported, path=out_dir / exported.path.name)
    return UnlabeledResult(out_dir, summary, site, exported)


def unlabeled_headline(result: UnlabeledResult) -> list[str]:
    """A few lines for the terminal: what changed, measured without labels, and what was not checked."""
    s = result.summary

    def shares(side: dict[str, Any]) -> str:
        return ", ".join(f"{name} {100 * v:.0f}%" for name, v in side["predicted_shares"].items())

    before, after = s["before"], s["after"]
    lines = [f"{s['n']} site images, {len(s['unreadable'])} unreadable; classes ruled out: "
             f"{', '.join(s['absent_classes']) or 'none'}",
             f"labels changed for {100 * s['changed_label_share']:.1f}% of the images",
             f"predicted shares: before {shares(before)}; after {shares(after)}",
             f"site vs validation images: domain classifier AUC {s['domain_shift']['domain_auc']:.2f} "
             "(0.5: indistinguishable)"]
    if "referred_share" in after:
        was = f"{100 * before['referred_share']:.1f}%" if "referred_share" in before else "n/a"
        lines.append(f"referred: before {was}, after {100 * after['referred_share']:.1f}% "
                     f"(mean set size {after['mean_set_size']:.2f})")
    return lines + [f"not checked: {s['unchecked']}"]


def suggest_labels(bundle: str | Path, data: str | Path | Sequence[str | Path], n: int, out_csv: str | Path, *,
                   site_classes: Sequence[str] | None = None, seed: int = 0, cache_dir: str | Path | None = None,
                   progress: bool = True) -> pd.DataFrame:
    """Write the ``n`` site images worth labelling first as a CSV (``path, label`` to fill in, the model's
    guess and its confidence); return the table."""
    model, meta = load_bundle(bundle)
    absent = site_absent(meta, site_classes)
    site = site_images(meta, data, cache_dir=cache_dir, progress=progress)
    logits, features = model_outputs(model, site.images)
    probs = meta.logit_transform().without(absent).probabilities(logits)
    rows = choose_for_labelling(probs, features, n, seed=seed)
    table = pd.DataFrame({"path": [site.paths[i] for i in rows], "label": "",
                          "model_guess": [meta.classes[int(probs[i].argmax())] for i in rows],
                          "model_confidence": [round(float(probs[i].max()), 4) for i in rows]})
    out_csv = Path(out_csv)
    write_text(out_csv, table.to_csv(index=False))
    return table
