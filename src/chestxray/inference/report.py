"""Self-contained HTML evaluation report: one file, images embedded as base64 PNG, inline CSS."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import precision_recall_curve, roc_curve

from chestxray.stats.metrics import interval_text, positives_matrix, reliability_curve
from chestxray.storage import make_folder, write_bytes, write_text

__all__ = ["plot_training_curves", "plot_lr_find", "write_report"]

NOTICE = (
    "Research software, not a diagnostic device. These figures describe this model on this test "
    "set only; they are no evidence of safety or performance in clinical use."
)

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
.notice { background: #fff3cd; border: 1px solid #e0c36c; padding: .8em 1em; border-radius: 4px; }
.headline { display: flex; flex-wrap: wrap; gap: 1em; }
.headline div { background: #f3f6fa; padding: .6em 1em; border-radius: 4px; }
.headline b { display: block; font-size: 1.3em; }
table { border-collapse: collapse; max-width: 100%; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: right; overflow-wrap: normal; }
th:first-child, td:first-child { text-align: left; }
table.rows { width: 100%; } table.rows td.path { text-align: left; overflow-wrap: anywhere; }
.path { overflow-wrap: anywhere; }
img { max-width: 100%; } .figures img { max-width: 49%; } .gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery figure { margin: 0; width: 220px; font-size: .85em; }
.gallery img { width: 220px; }
.bad { color: #b00020; } .card { background: #fafafa; border: 1px solid #ddd; padding: 0 1em; border-radius: 4px; }
.card table { display: block; overflow-x: auto; } .card code, .card pre { overflow-wrap: anywhere; white-space: pre-wrap; }
"""


def _new_figure(width: float = 6.0, height: float = 5.0) -> Figure:
    """A figure drawn by the Agg canvas, without pyplot's global state."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "Yes" if value else "No"
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _table(rows: dict[str, dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in ["class", *columns])
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{_cell(row[c])}</td>" for c in columns) + "</tr>"
        for name, row in rows.items()
    )
    return f"<table><tr>{head}</tr>{body}</table>"


# ----------------------------------------------------------------------------- figures


def _training_curves_figure(history: pd.DataFrame) -> Figure:
    """One panel each for losses, learning rate and other numeric columns, against epoch."""
    x_name = "epoch" if "epoch" in history else None
    numeric = [c for c in history.select_dtypes("number").columns if c not in ("epoch", "step", "seconds")]
    panels = {
        "loss": [c for c in numeric if "loss" in c],
        "learning rate": [c for c in numeric if c.startswith("lr")],
        # the training image side (progressive resizing) in its own panel: on the metrics axis it flattens them
        "training image size (px)": [c for c in numeric if c.endswith("_px") and history[c].nunique() > 1],
    }
    panels["metrics"] = [c for c in numeric if not c.endswith("_px") and
                         c not in panels["loss"] + panels["learning rate"]]
    panels = {title: cols for title, cols in panels.items() if cols}
    fig = _new_figure(5.0 * max(1, len(panels)), 4.0)
    for ax, (title, cols) in zip(fig.subplots(1, max(1, len(panels)), squeeze=False)[0], panels.items()):
        for col in cols:
            # loggers write train and validation values on separate rows: drop the gaps per column
            series = history[[col] + ([x_name] if x_name else [])].dropna()
            x = series[x_name] if x_name else series.index
            ax.plot(x, series[col], marker="o", markersize=3, label=col)
        ax.set(xlabel=x_name or "row", title=title, yscale="log" if title == "learning rate" else "linear")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    return fig


def plot_training_curves(history: pd.DataFrame, out_png: Path) -> Path:
    """Save the training curves (every numeric column of ``history`` against epoch) as a PNG."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(out_png, _png_bytes(_training_curves_figure(history)))
    return out_png


def plot_lr_find(lrs: list[float], losses: list[float], suggestion: float, out_png: Path) -> Path:
    """Save the learning-rate finder's curve (smoothed training loss against the rate, log scale) with
    the suggested rate marked, as a PNG."""
    fig = _new_figure(6.0, 4.0)
    ax = fig.subplots()
    ax.plot(lrs, losses, label="smoothed training loss")
    ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggestion {suggestion:.2e}")
    finite = [(lr, loss) for lr, loss in zip(lrs, losses) if np.isfinite(loss)]
    if finite:
        nearest = min(finite, key=lambda point: abs(np.log(point[0] / suggestion)))
        ax.plot(*nearest, marker="o", markersize=8, color="tab:red")
    ax.set(xscale="log", xlabel="learning rate of the head", ylabel="loss", title="learning-rate finder")
    ax.legend()
    out_png = Path(out_png)
    make_folder(out_png.parent, "output folder")
    write_bytes(out_png, _png_bytes(fig))
    return out_png


def _confusion_png(metrics: dict[str, Any], classes: list[str]) -> bytes:
    fig = _new_figure(1.2 * len(classes) + 3, 1.0 * len(classes) + 2.5)
    ax = fig.subplots()
    sns.heatmap(np.array(metrics["confusion_matrix"]), annot=True, fmt="d", cmap="Blues", cbar=False,
                xticklabels=classes, yticklabels=classes, ax=ax)
    ax.set(xlabel="predicted", ylabel="truth", title="Confusion matrix (counts)")
    return _png_bytes(fig)


def _curves_png(positives: np.ndarray, probs: np.ndarray, classes: list[str], kind: str) -> bytes:
    """One-vs-rest ROC (``kind="roc"``) or precision-recall curves of every class with both labels."""
    fig = _new_figure()
    ax = fig.subplots()
    for k, name in enumerate(classes):
        if positives[:, k].all() or not positives[:, k].any():
            continue
        if kind == "roc":
            x, y, _ = roc_curve(positives[:, k], probs[:, k])
        else:
            y, x, _ = precision_recall_curve(positives[:, k], probs[:, k])
        ax.plot(x, y, label=name)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC curves (one-vs-rest)")
    else:
        ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall curves")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right" if kind == "roc" else "lower left")
    return _png_bytes(fig)


def _reliability_png(y_true: np.ndarray, probs: np.ndarray, title: str) -> bytes:
    curve = reliability_curve(y_true, probs)
    n_bins = len(curve["bin_count"])
    centres = (np.arange(n_bins) + 0.5) / n_bins
    fig = _new_figure()
    ax = fig.subplots()
    ax.bar(centres, np.array(curve["bin_accuracy"], dtype=float), width=1 / n_bins, edgecolor="k",
           alpha=0.7, label="accuracy")
    ax.plot(np.array(curve["bin_confidence"], dtype=float), np.array(curve["bin_accuracy"], dtype=float),
            "o", color="C1", label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max probability)", ylabel="accuracy", title=title)
    ax.legend(loc="upper left")
    return _png_bytes(fig)


# ----------------------------------------------------------------------------- sections


def _headline(metrics: dict[str, Any]) -> str:
    if "per_label" in metrics:
        items = {"mean ROC-AUC": interval_text(metrics, "mean_auc", percent=False)}
    else:
        items = {
            "accuracy": interval_text(metrics, "accuracy"),
            "balanced accuracy": interval_text(metrics, "balanced_accuracy"),
            "macro F1": interval_text(metrics, "macro_f1", percent=False),
            "macro ROC-AUC": interval_text(metrics, "macro_auc", percent=False),
        }
    cards = "".join(f"<div>{html.escape(k)}<b>{html.escape(v)}</b></div>" for k, v in items.items())
    how = metrics.get("bootstrap") or "bootstrap over whole images (not stratified)"
    return (f'<p>{metrics["n"]} test images. Intervals: {html.escape(how)}.</p>'
            f'<div class="headline">{cards}</div>')


def _gallery(errors_gallery: list[dict]) -> str:
    figures = "".join(
        f"<figure>{_img(item['image_png'], str(item['file']))}<figcaption><span class=\"path\">"
        f"{html.escape(str(item['file']))}</span><br>"
        f"truth: <b>{html.escape(str(item['truth']))}</b><br>predicted: <b>{html.escape(str(item['prediction']))}"
        f"</b> ({100 * item['confidence']:.1f}%)</figcaption></figure>"
        for item in errors_gallery
    )
    return f'<h2>Most confident errors</h2><div class="gallery">{figures}</div>'


def _calibration_section(metrics: dict[str, Any], y_true: np.ndarray, probs: np.ndarray,
                         before: dict[str, Any] | None) -> str:
    if before is None:
        title = f"Reliability diagram (ECE {metrics['ece']:.3f})"
        verdict = ""
    else:
        title = f"Reliability diagram (ECE {before['ece']:.3f} before, {metrics['ece']:.3f} after calibration)"
        verdict = f"<p>{html.escape(calibration_verdict(before['ece'], metrics['ece'], before.get('transform')))}</p>"
    return f"<h2>Calibration</h2>{verdict}{_img(_reliability_png(y_true, probs, title), title)}"


def calibration_verdict(ece_before: float, ece_after: float, transform: str | None = None) -> str:
    """One plain sentence: did the bundle's calibration improve the ECE on these images or make it worse?"""
    what = f"The bundle's calibration ({transform})" if transform else "The bundle's calibration"
    if transform and transform.startswith("none"):
        return f"The bundle applies no calibration: ECE {ece_after:.3f} on these images."
    if ece_after > ece_before + 1e-9:
        return (f"{what} made the calibration WORSE on these images: expected calibration error "
                f"{ece_before:.3f} without it, {ece_after:.3f} with it.")
    return f"{what} lowered the expected calibration error on these images from {ece_before:.3f} to {ece_after:.3f}."


def _unlabeled_section(summary: dict[str, Any]) -> str:
    """What a label-free site adaptation changed, measured without labels."""
    before, after = summary["before"], summary["after"]

    def shares(side: dict[str, Any]) -> str:
        return ", ".join(f"{name} {100 * v:.0f}%" for name, v in side["predicted_shares"].items())

    rows = [("predicted class shares", shares(before), shares(after)),
            ("mean confidence", _cell(before["mean_confidence"]), _cell(after["mean_confidence"]))]
    if "referred_share" in after:
        rows.append(("referred", f"{100 * before['referred_share']:.1f}%" if "referred_share" in before else "–",
                     f"{100 * after['referred_share']:.1f}%"))
    body = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                   for a, b, c in rows)
    ruled_out = ", ".join(summary.get("absent_classes") or []) or "none"
    return (f"<h2>Site adaptation without labels</h2><p>{summary['n']} site images; classes ruled out: "
            f"{html.escape(ruled_out)}; labels changed for {100 * summary['changed_label_share']:.1f}% of them. "
            f"{html.escape(summary['method'])}.</p><table><tr><th></th><th>before</th><th>after</th></tr>{body}"
            f"</table><p>{html.escape(summary['unchecked'])}.</p>")


def _adaptation_section(summary: dict[str, Any]) -> str:
    """Before/after of a site adaptation, estimated by k-fold inside the local sample."""
    if summary.get("mode") == "unlabeled":
        return _unlabeled_section(summary)
    before, after, diff = summary["before"], summary["after"], summary["difference"]

    def share(metrics: dict[str, Any], name: str) -> str:
        low, high = metrics["ci"][name]
        value = metrics[name]
        return "–" if value is None else f"{100 * value:.1f}% ({100 * (low or 0):.1f}–{100 * (high or 0):.1f})"

    rows = [("accuracy", share(before, "accuracy"), share(after, "accuracy")),
            ("balanced accuracy", share(before, "balanced_accuracy"), share(after, "balanced_accuracy")),
            ("macro ROC-AUC", _cell(before["macro_auc"]), _cell(after["macro_auc"])),
            ("ECE", _cell(before["ece"]), _cell(after["ece"]))]
    rows += [(f"sensitivity {name}", f"{100 * before['sensitivity'][name]:.1f}%", f"{100 * value:.1f}%")
             for name, value in after["sensitivity"].items()]
    sets = summary.get("conformal")
    if sets:
        def coverage(found: dict[str, Any] | None) -> str:
            if found is None:
                return "no sets"
            low, high = found["coverage_ci"]
            return f"{100 * found['coverage']:.1f}% ({100 * low:.1f}–{100 * high:.1f}), size {found['mean_set_size']:.2f}"

        rows.append((f"prediction-set coverage (target {100 * sets['target']:.0f}%)", coverage(sets["before"]),
                     coverage(sets["after"])))
    body = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                   for a, b, c in rows)
    low, high = diff["accuracy"]["ci"]
    counts = ", ".join(f"{k} {v}" for k, v in summary["class_counts"].items())
    worse = " Calibration is WORSE after adaptation on these images." if summary.get("ece_worse_after") else ""
    return (f"<h2>Site adaptation ({html.escape(summary['mode'])})</h2>"
            f"<p>Adapted with {summary['n']} local labels ({html.escape(counts)}). {html.escape(summary['method'])} "
            f"Accuracy difference {100 * diff['accuracy']['value']:+.1f} points (paired 95% bootstrap interval "
            f"{100 * (low or 0):+.1f} to {100 * (high or 0):+.1f}). Calibration chosen: "
            f"{html.escape(summary['calibration']['description'])}.{worse}</p>"
            f"<table><tr><th>out-of-fold</th><th>before (parent)</th><th>after (adapted)</th></tr>{body}</table>")


def _operating_points_section(points: dict[str, dict[str, dict[str, Any]]]) -> str:
    def share(value: float | None, interval: list[float | None]) -> str:
        if value is None:
            return "–"
        low, high = interval
        return f"{100 * value:.1f}% ({100 * low:.1f}–{100 * high:.1f})"

    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(point.replace('_', ' '))}</td>"
        f"<td>{row['threshold']:.3f}</td><td>{share(row['sensitivity'], row['sensitivity_ci'])}</td>"
        f"<td>{share(row['specificity'], row['specificity_ci'])}</td></tr>"
        for name, by_point in points.items() for point, row in by_point.items())
    return ("<h2>Operating points</h2><p>Each class called positive when its probability reaches a threshold "
            "chosen on the validation images (one-vs-rest): at the best sensitivity + specificity (youden) "
            "or at the highest threshold that reached a target sensitivity there. Here is what they give on "
            "these images (95% Wilson intervals); a target reached on validation may be missed here.</p>"
            "<table><tr><th>class</th><th>point</th><th>threshold</th><th>sensitivity</th><th>specificity</th>"
            f"</tr>{rows}</table>")


def _with_interval(value: Any, interval: Any, percent: bool = True) -> str:
    if value is None:
        return "–"
    fmt = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.3f}")
    if not interval or interval[0] is None:
        return fmt(value)
    return f"{fmt(value)} ({fmt(interval[0])}–{fmt(interval[1])})"


def _per_class_section(metrics: dict[str, Any]) -> str:
    """Per-class table, each figure with its 95% interval (Wilson for proportions, bootstrap for AUC)."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{_with_interval(r['precision'], r.get('precision_ci'))}</td>"
        f"<td>{_with_interval(r['sensitivity'], r.get('sensitivity_ci'))}</td>"
        f"<td>{_with_interval(r['specificity'], r.get('specificity_ci'))}</td><td>{_cell(r['f1'])}</td>"
        f"<td>{_with_interval(r['roc_auc'], r.get('roc_auc_ci'), percent=False)}</td><td>{_cell(r['pr_auc'])}</td>"
        f"<td>{r['support']}</td></tr>" for name, r in metrics["per_class"].items())
    return ("<h2>Per class</h2><p>Precision, sensitivity and specificity in % with 95% Wilson intervals; "
            "ROC-AUC with a stratified bootstrap interval.</p><table><tr><th>class</th><th>precision</th>"
            "<th>sensitivity</th><th>specificity</th><th>F1</th><th>ROC-AUC</th><th>PR-AUC</th><th>support</th>"
            f"</tr>{rows}</table>")


def _conformal_section(conformal: dict[str, Any] | None) -> str:
    if conformal is None:
        return "<h2>Prediction sets</h2><p>Not checked: the bundle has no conformal sets.</p>"
    target = conformal["target_coverage"]
    rows = []
    for name, r in conformal["per_class"].items():
        below = r["coverage_ci"][1] is not None and r["coverage_ci"][1] < target
        flag = ' <b class="bad">below the target</b>' if below else ""
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{r['n']}</td>"
                    f"<td>{_with_interval(r['coverage'], r['coverage_ci'])}{flag}</td>"
                    f"<td>{_with_interval(r['mean_set_size'], r['mean_set_size_ci'], percent=False)}</td></tr>")
    overall = (f"coverage {_with_interval(conformal['coverage'], conformal['coverage_ci'])}%, mean set size "
               f"{_with_interval(conformal['mean_set_size'], conformal['mean_set_size_ci'], percent=False)}, "
               f"{100 * conformal['single_class_share']:.1f}% single-class sets, "
               f"{100 * conformal['empty_share']:.1f}% empty")
    return (f"<h2>Prediction sets</h2><p>Class-conditional split conformal (score {html.escape(conformal['score'])}), "
            f"target coverage {100 * target:g}% per class, calibrated on the {html.escape(conformal['fitted_on'])}. "
            "The guarantee holds only for images exchangeable with those; on shifted data coverage falls below "
            f"the target, and this table shows by how much. Overall: {overall}. Intervals: Wilson (coverage), "
            "stratified bootstrap (set size).</p><table><tr><th>class</th><th>images</th><th>coverage %</th>"
            f"<th>mean set size</th></tr>{''.join(rows)}</table>")


def _selective_section(selective: dict[str, Any]) -> str:
    curve = selective["risk_coverage"]
    referral = selective["referral"]
    fig = _new_figure(6.0, 4.0)
    ax = fig.subplots()
    ax.plot(curve["coverage"], curve["accuracy"], label="most confident first")
    if referral["accuracy_kept"] is not None:
        ax.plot([referral["kept_share"]], [referral["accuracy_kept"]], "o", color="C3",
                label="kept by the referral rule")
    ax.set(xlabel="share of predictions kept (coverage)", ylabel="accuracy on the kept predictions",
           xlim=(0, 1.02), ylim=(0, 1.02), title="Risk-coverage")
    ax.legend(loc="lower left")
    at = "; ".join(f"at {level}: {_with_interval(r['accuracy'], r['accuracy_ci'])}% ({r['kept']} kept)"
                   for level, r in selective["at_coverage"].items())
    kept = _with_interval(referral["accuracy_kept"], referral["accuracy_kept_ci"])
    referred = _with_interval(referral["accuracy_referred"], referral["accuracy_referred_ci"])
    return (f"<h2>Risk-coverage and referral</h2><p>Accuracy of the most confident predictions {at}. The "
            f"referral rule ({html.escape(', '.join(referral['checks']))}) referred {referral['referred']} images "
            f"and kept {100 * referral['kept_share']:.1f}%: accuracy {kept}% on those kept, {referred}% on those "
            "referred (95% Wilson intervals).</p>" + _img(_png_bytes(fig), "risk-coverage curve"))


PATH_COLUMNS = ("file",)
"""Listing columns that hold paths: the only cells that may break inside a word (anywhere, to fit the page)."""


def _listing_cell(column: str, value: Any) -> str:
    if column in PATH_COLUMNS:
        return f'<td class="path">{_cell(value)}</td>'
    if column == "prediction_set" and value == "":
        return "<td>(none)</td>"  # an empty conformal set: no class fits
    if column == "prediction_set" and isinstance(value, str):
        return f"<td>{html.escape(value.replace('|', ', '))}</td>"
    return f"<td>{_cell(value)}</td>"


def _rows_table(frame: pd.DataFrame, columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_listing_cell(c, v) for c, v in zip(columns, row)) + "</tr>"
                   for row in frame[columns].itertuples(index=False))
    return f'<table class="rows"><tr>{head}</tr>{body}</table>'


def _listings_section(predictions: pd.DataFrame, classes: list[str], link: str | None) -> str:
    """Every error and every image flagged out of distribution, by file (relative to the data root)."""
    rated = predictions[predictions["prediction"] != ""].copy()
    rated["probability"] = [rated.at[i, label] if label in classes else None
                            for i, label in zip(rated.index, rated["prediction"])]
    columns = [c for c in ("file", "truth", "prediction", "probability", "prediction_set", "refer", "ood_percentile")
               if c in rated.columns]
    errors = rated[rated["truth"] != rated["prediction"]]
    parts = [f"<h2>All errors ({len(errors)})</h2>",
             _rows_table(errors, columns) if len(errors) else "<p>None.</p>"]
    if rated["ood"].dtype == bool or set(rated["ood"].unique()) <= {True, False}:
        flagged = rated[rated["ood"].astype(bool)]
        parts += [f"<h2>Flagged out of distribution ({len(flagged)})</h2>",
                  _rows_table(flagged, columns) if len(flagged) else "<p>None.</p>"]
    else:
        parts.append("<h2>Flagged out of distribution</h2><p>Not checked: the bundle has no guard.</p>")
    if link:
        parts.append(f'<p>Every image with its probabilities, set and flags: <a href="{html.escape(link)}">'
                     f"{html.escape(link)}</a> (next to this report).</p>")
    return "".join(parts)


def _model_card_section(card: str) -> str:
    from markdown_it import MarkdownIt

    body = card.split("---\n", 2)[-1] if card.startswith("---") else card  # without the YAML header
    rendered = MarkdownIt("commonmark").enable("table").render(body.replace("\n# ", "\n### ", 1))
    return f'<h2>Model card</h2><div class="card">{rendered}</div>'


def write_report(
    out_path: Path,
    *,
    title: str,
    metrics: dict,
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    history: pd.DataFrame | None = None,
    errors_gallery: list[dict] | None = None,
    notes: list[str] | None = None,
    metrics_before_calibration: dict | None = None,
    predictions: pd.DataFrame | None = None,
    predictions_link: str | None = None,
    model_card: str | None = None,
    adaptation: dict | None = None,
) -> Path:
    """Write one self-contained HTML report of ``metrics`` (from ``classification_metrics`` or
    ``multilabel_metrics``) with its tables and figures; return ``out_path``.

    ``errors_gallery`` items: ``{"image_png": bytes, "file", "truth", "prediction", "confidence"}``.
    ``predictions`` (evaluate's ``predictions.csv`` frame, files relative to the data root) gives the
    tables of all errors and of the images flagged out of distribution; ``predictions_link`` names the
    CSV file beside the report; ``model_card`` is the bundle's Markdown card.
    ``metrics_before_calibration``: ``{"ece": ..., "transform": description}`` of the uncalibrated
    model; ``adaptation``: a site adaptation's summary (``adaptation.json``), shown as its own section.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    multilabel = "per_label" in metrics
    positives = positives_matrix(y_true, len(classes))
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes or [])
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="notice">{html.escape(NOTICE)}</p>',
        f"<ul>{notes_html}</ul>" if notes_html else "",
        _headline(metrics),
    ]
    if multilabel:
        parts += ["<h2>Per label</h2>", _table(metrics["per_label"], ["roc_auc", "pr_auc", "f1", "support"])]
    else:
        parts += [_per_class_section(metrics),
                  "<h2>Confusion matrix</h2>", _img(_confusion_png(metrics, classes), "confusion matrix")]
        if "conformal" in metrics:
            parts.append(_conformal_section(metrics["conformal"]))
        if metrics.get("selective"):
            parts.append(_selective_section(metrics["selective"]))
    parts += [
        '<h2>ROC and precision-recall curves</h2><div class="figures">',
        _img(_curves_png(positives, probs, classes, "roc"), "ROC curves"),
        _img(_curves_png(positives, probs, classes, "pr"), "precision-recall curves"),
        "</div>",
    ]
    if metrics.get("operating_points"):
        parts.append(_operating_points_section(metrics["operating_points"]))
    if not multilabel:
        parts.append(_calibration_section(metrics, y_true, probs, metrics_before_calibration))
    if adaptation:
        parts.append(_adaptation_section(adaptation))
    if history is not None:
        parts += ["<h2>Training curves</h2>", _img(_png_bytes(_training_curves_figure(history)), "training curves")]
    if errors_gallery:
        parts.append(_gallery(errors_gallery))
    if predictions is not None:
        parts.append(_listings_section(predictions, classes, predictions_link))
    if model_card:
        parts.append(_model_card_section(model_card))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    out_path = Path(out_path)
    make_folder(out_path.parent, "report folder")
    write_text(out_path, page)
    return out_path
