"""The HTML report is one self-contained file with the headline, class names and figures."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.image import imsave
from scipy.special import softmax

from chestxray.stats.metrics import accuracy_interval_text, classification_metrics, interval_text, multilabel_metrics
from chestxray.inference.report import plot_training_curves, write_report

CLASSES = ["normal", "pneumonia", "covid"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def tiny_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    imsave(buffer, np.random.default_rng(seed).random((16, 16)), format="png", cmap="gray")
    return buffer.getvalue()


def history() -> pd.DataFrame:
    # as a logger writes it: train and validation values on separate rows
    return pd.DataFrame({
        "epoch": [0, 0, 1, 1, 2, 2],
        "train_loss": [1.1, None, 0.8, None, 0.6, None],
        "val_loss": [None, 1.0, None, 0.9, None, 0.85],
        "val_acc": [None, 0.5, None, 0.6, None, 0.65],
        "lr": [1e-3, None, 5e-4, None, 1e-4, None],
    })


def test_multiclass_report_is_self_contained(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3))
    logits[np.arange(60), y] += 1.5
    probs = softmax(logits, axis=1)
    metrics = classification_metrics(y, probs, CLASSES, n_boot=50)
    before = classification_metrics(y, softmax(3 * logits, axis=1), CLASSES, n_boot=10)
    gallery = [
        {"image_png": tiny_png(i), "file": f"img_{i}.png", "truth": "covid", "prediction": "normal", "confidence": 0.9}
        for i in range(2)
    ]
    out = write_report(tmp_path / "report" / "report.html", title="Test <run>", metrics=metrics, y_true=y,
                       probs=probs, classes=CLASSES, history=history(), errors_gallery=gallery,
                       notes=["trained on synthetic data"], metrics_before_calibration=before)
    assert list(tmp_path.rglob("*.*")) == [out]
    page = out.read_text(encoding="utf-8")
    pngs = embedded_pngs(page)
    # confusion matrix, ROC, PR, reliability, training curves, and the gallery
    assert len(pngs) == 5 + len(gallery) and all(p.startswith(PNG_SIGNATURE) for p in pngs)
    assert gallery[0]["image_png"] in pngs
    for text in [*CLASSES, accuracy_interval_text(metrics), interval_text(metrics, "macro_auc", percent=False),
                 "not a diagnostic device", "trained on synthetic data", "img_1.png", "Test &lt;run&gt;",
                 f"{before['ece']:.3f} before"]:
        assert text in page, text
    assert 'src="http' not in page and "<script" not in page and "<link" not in page


def test_multilabel_report_shows_per_label_table(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((80, 3)) < 0.4).astype(int)
    probs = np.clip(0.4 * y + 0.6 * rng.random(y.shape), 0, 1)
    metrics = multilabel_metrics(y, probs, CLASSES, n_boot=50)
    page = write_report(tmp_path / "ml.html", title="multi-label", metrics=metrics, y_true=y, probs=probs,
                        classes=CLASSES).read_text(encoding="utf-8")
    assert len(embedded_pngs(page)) == 2  # ROC and PR curves only
    assert "Per label" in page and "Confusion matrix" not in page
    assert interval_text(metrics, "mean_auc", percent=False) in page
    assert all(name in page for name in CLASSES)


def test_plot_training_curves_writes_png(tmp_path: Path) -> None:
    out = plot_training_curves(history(), tmp_path / "run" / "curves.png")
    assert out.read_bytes().startswith(PNG_SIGNATURE)
