"""``MODEL_CARD.md``: what a bundle is, what it is for, and when not to trust it, from its ``model.json``.

The sections follow the Hugging Face model card (a YAML header, then model details, uses and
out-of-scope uses, bias, risks and limitations, training details, evaluation, and how to get
started), with the project's own: calibration, conformal coverage, the out-of-distribution guard,
source confounds and how to adapt the model to a site. Every figure is read from the bundle's
metadata (a plain dict, as ``model.json`` holds it), so the card cannot disagree with the model.
"""

from __future__ import annotations

__all__ = ["CARD_FILE", "render_model_card"]

from typing import Any

from ..stats.logit_transform import LogitTransform

CARD_FILE = "MODEL_CARD.md"


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def _interval(value: Any, interval: Any, percent: bool = True) -> str:
    fmt = _percent if percent else (lambda v: "n/a" if v is None else f"{float(v):.3f}")
    if not interval or interval[0] is None:
        return fmt(value)
    return f"{fmt(value)} (95% CI {fmt(interval[0])}–{fmt(interval[1])})"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def render_model_card(meta: dict[str, Any]) -> str:
    """The Markdown model card of a bundle's metadata (``model.json`` as a dict)."""
    extra = meta.get("extra") or {}
    trained = extra.get("trained_on") or {}
    classes = list(meta.get("classes", []))
    members = extra.get("members")
    preprocess = meta.get("preprocess") or {}
    header = ["---", "library_name: chestxray", "pipeline_tag: image-classification",
              "tags: [chest-x-ray, medical-imaging, research-only]", "---", ""]
    parts = [f"# Model card: {meta.get('arch', '?')} chest X-ray classifier"
             + (f" (ensemble of {members})" if members else ""),
             "> **Not a diagnostic device.** A research model: it must not be used to diagnose, treat or "
             "triage patients.",
             "## Model details",
             _table(["field", "value"], [
                 ["architecture", f"{meta.get('arch', '?')}" + (f", {members}-model ensemble" if members else "")],
                 ["task", meta.get("task", "?")], ["classes", ", ".join(classes)],
                 ["input", f"{meta.get('image_size', '?')} px grayscale, fit mode {preprocess.get('mode', 'pad')}, "
                           f"contrast {preprocess.get('contrast', 'none')}"],
                 ["created", meta.get("created", "?")], ["chestxray version", meta.get("package_version", "?")],
                 ["training-data fingerprint", f"`{meta.get('train_fingerprint', '')[:16]}`"]]),
             "## Uses",
             "**Intended use:** research on frontal chest radiographs like the training images: comparing "
             "models, studying datasets, triaging research data for human review. Every prediction comes "
             "with a prediction set, an out-of-distribution flag, a referral decision and its reasons.",
             "**Out-of-scope use:** any clinical decision; images unlike the training data (other "
             "populations — e.g. adults when the training images were children's —, hospitals, devices, "
             "lateral views, other body parts, other modalities such as CT); use without a reader for the "
             "images it refers.",
             _training_section(meta, trained),
             *([_adaptation_section(meta, extra)] if meta.get("lineage") else []),
             _evaluation_section(meta, extra),
             _calibration_section(meta),
             _conformal_section(meta),
             _ood_section(meta),
             _risks_section(meta),
             "## How to adapt to a site",
             "Measure before use: `chestxray evaluate BUNDLE SITE_DATA` on labelled images of the site "
             "gives its accuracy, calibration and the coverage of the prediction sets there. "
             "`chestxray adapt BUNDLE SITE_DATA --out NEW_BUNDLE` refits the calibration, the operating "
             "points, the conformal sets, the drift reference and the OOD reference on a labelled local "
             "sample (`--mode finetune` also continues training) and first estimates what that buys by "
             "k-fold inside the sample; never judge the child bundle on the images it was adapted on.",
             "## How to get started",
             "```python\nfrom chestxray import load_model\nmodel = load_model('path/to/bundle')\n"
             "print(model.predict('xray.dcm'))  # label, prediction_set, refer, reasons, cautions\n```"]
    return "\n".join(header) + "\n\n".join(parts) + "\n"


def _training_section(meta: dict[str, Any], trained: dict[str, Any]) -> str:
    counts = trained.get("class_counts") or {}
    rows = [[name, counts.get(name, 0)] for name in meta.get("classes", [])]
    provenance = trained.get("provenance_files") or []
    text = [f"## Training details",
            f"**Training data:** `{trained.get('origin', 'not recorded')}`: {trained.get('n_train', '?')} training "
            f"and {trained.get('n_val', '?')} validation images (test split never used).",
            _table(["class", "images (train + validation)"], rows) if rows else "",
            "**Provenance and licences:** " + (
                f"the data folder carries {', '.join(f'`{f}`' for f in provenance)}; read them for where each "
                "image came from and under which licence." if provenance else
                "not recorded with the data; state the source and licence of every image before sharing "
                "this model (public chest X-ray sets carry per-image or non-commercial licences).")]
    config = (meta.get("extra") or {}).get("config") or {}
    if config:
        keys = ("epochs", "batch_size", "optimizer", "lr", "label_smoothing", "mixup", "augment", "seed")
        text.append("**Training procedure:** " + ", ".join(f"{k} {config[k]}" for k in keys if k in config) + ".")
    return "\n\n".join(t for t in text if t)


def _evaluation_section(meta: dict[str, Any], extra: dict[str, Any]) -> str:
    validation = extra.get("validation") or {}
    metrics = meta.get("metrics") or {}
    lines = ["## Evaluation"]
    if validation:
        lines.append(f"On the {validation.get('note', 'held-out images')}: accuracy "
                     f"{_interval(validation.get('accuracy'), validation.get('accuracy_ci'))}, balanced accuracy "
                     f"{_interval(validation.get('balanced_accuracy'), validation.get('balanced_accuracy_ci'))}, "
                     f"macro ROC-AUC {_interval(validation.get('macro_auc'), validation.get('macro_auc_ci'), False)} "
                     "(stratified bootstrap intervals).")
    elif metrics:
        lines.append("Validation figures (no intervals recorded): " + ", ".join(
            f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, (int, float))) + ".")
    else:
        lines.append("No evaluation recorded in the bundle.")
    site = (meta.get("lineage") or {}).get("data_fingerprint")
    lines.append(("These figures come from the adapting site's own images; they say nothing about another one."
                  if site else "These figures come from images like the training images; they say nothing about "
                  "another hospital.") + " Run `chestxray evaluate` on your own labelled test images: its report "
                 "gives every figure with a 95% interval.")
    return "\n\n".join(lines)


def _calibration_section(meta: dict[str, Any]) -> str:
    points = meta.get("operating_points") or {}
    fitted_on = (meta.get("conformal") or {}).get("fitted_on") or "validation images"
    if meta.get("calibration"):
        transform = LogitTransform.from_dict(meta["calibration"], len(meta.get("classes", [])))
        how = (f"chosen by cross-validated NLL on the {fitted_on} (the simplest candidate within one standard "
               "error of the best)")
    else:  # a bundle from before the choice of transforms
        transform = LogitTransform.from_temperature(float(meta.get("temperature", 1.0)))
        how = "fitted on the validation images"
    text = ["## Calibration", f"Logit transform applied before the softmax: {transform.describe()}, {how}."]
    if points:
        rows = [[name, *(f"{by.get(p):.3f}" if by.get(p) is not None else "–"
                         for p in ("youden", "sensitivity_90", "sensitivity_95"))] for name, by in points.items()]
        text.append(f"Operating points (thresholds on each class's probability, chosen on the {fitted_on}):\n\n"
                    + _table(["class", "youden", "sensitivity 90%", "sensitivity 95%"], rows))
    return "\n\n".join(text)


def _adaptation_section(meta: dict[str, Any], extra: dict[str, Any]) -> str:
    lineage = meta["lineage"]
    counts = ", ".join(f"{k} {v}" for k, v in (lineage.get("class_counts") or {}).items())
    rows = [["mode", lineage.get("mode", "?")], ["parent bundle", f"`{lineage.get('parent_id', '?')}`"],
            ["parent weights sha256", f"`{str(lineage.get('parent_weights_sha256', ''))[:16]}…`"],
            ["date", lineage.get("date", "?")]]
    if lineage.get("data_fingerprint"):
        rows += [["local data", f"`{lineage.get('data', '?')}`, fingerprint `{lineage['data_fingerprint']}`"],
                 ["local images", f"{lineage.get('n_images', '?')} ({counts})"]]
    if lineage.get("with_data"):
        rows.append(["also trained on", f"`{lineage['with_data']}`"])
    text = ["## Site adaptation",
            "This bundle was derived from another one"
            + (" and adapted to a site's labelled images." if lineage.get("data_fingerprint") else "."),
            _table(["field", "value"], rows)]
    adaptation = extra.get("adaptation") or {}
    before, after = adaptation.get("before") or {}, adaptation.get("after") or {}
    if before and after:
        accuracy = [_interval(m.get("accuracy"), (m.get("ci") or {}).get("accuracy")) for m in (before, after)]
        text.append(f"Estimated by {adaptation.get('folds', '?')}-fold inside the local sample (each fold adapted "
                    f"on the others, scored on itself): accuracy {accuracy[0]} before, {accuracy[1]} after; "
                    f"ECE {float(before.get('ece', 0)):.3f} before, {float(after.get('ece', 0)):.3f} after. "
                    + _set_coverage(adaptation.get("conformal")) +
                    "The calibration, operating points, conformal sets and drift reference below were fitted on the "
                    "local images; figures measured again on those images are optimistic.")
    return "\n\n".join(text)


def _set_coverage(conformal: dict[str, Any] | None) -> str:
    if not conformal or not conformal.get("after"):
        return ""
    before = conformal.get("before")
    return (f"Prediction-set coverage (target {_percent(conformal.get('target'))}): "
            + (f"{_interval(before['coverage'], before.get('coverage_ci'))} with the parent's sets, " if before else "")
            + f"{_interval(conformal['after']['coverage'], conformal['after'].get('coverage_ci'))} with sets refitted "
              "on the other folds. ")


def _conformal_section(meta: dict[str, Any]) -> str:
    conformal = meta.get("conformal")
    if not conformal:
        return ("## Conformal prediction sets\n\nNot fitted for this bundle: predictions carry no prediction "
                "set, and set size is not checked for referral.")
    rows = [[name, conformal.get("counts", {}).get(name, 0),
             "always in the set (too few images)" if t is None else f"{t:.4f}"]
            for name, t in (conformal.get("thresholds") or {}).items()]
    return "\n\n".join([
        "## Conformal prediction sets",
        f"Split conformal, class-conditional (Mondrian), score `{conformal.get('score')}`, target coverage "
        f"{_percent(conformal.get('coverage'))}, calibrated on the {conformal.get('fitted_on') or 'held-out images'}. "
        "For each class, an image of that class gets a set containing it with at least the target "
        "probability — on images exchangeable with the calibration images only. On shifted data the "
        "coverage falls below the target: measure it with `chestxray evaluate`. A prediction whose set "
        "holds more than one class (or none) is referred.",
        _table(["class", "calibration images", "largest admitted non-conformity"], rows)])


def _ood_section(meta: dict[str, Any]) -> str:
    ood = meta.get("ood")
    if not ood:
        return "## Out-of-distribution behaviour\n\nNo out-of-distribution guard in this bundle: not checked."
    return ("## Out-of-distribution behaviour\n\n"
            f"A Mahalanobis guard on the penultimate features ({ood.get('method', '?')}) flags images scoring "
            f"above {float(ood.get('threshold', 0)):.2f}, the {100 * float(ood.get('quantile', 0.99)):g}th "
            "percentile of held-out training X-rays: about 1% of in-distribution images are flagged by design. "
            "Photos, documents and other modalities score far above it; X-rays of another population or "
            "hospital often do not — the guard does not replace a local evaluation. Flagged images are referred.")


def _risks_section(meta: dict[str, Any]) -> str:
    confound = meta.get("source_confound") or {}
    lines = ["## Bias, risks and limitations",
             "- The model learns whatever separates the training images, including the hospital, device or "
             "dataset an image came from.",
             "- Each prediction set's guarantee holds only for images like the calibration images."]
    auc = confound.get("auc") or {}
    if auc:
        flagged = confound.get("flagged", [])
        lines.append(f"- Source confound (metadata-only classifier, one-vs-rest ROC-AUC, flagged at "
                     f"{float(confound.get('threshold', 0.8)):.2f} or more): "
                     + ", ".join(f"{name} {value:.2f}" + (" **flagged**" if name in flagged else "")
                                 for name, value in auc.items())
                     + ". Predictions of a flagged class carry a caution: they may reflect the image's origin.")
    else:
        lines.append("- Source confound: not measured for this bundle.")
    return "\n".join(lines)
