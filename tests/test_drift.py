"""Drift monitoring in serve: a rolling, bounded window against the training reference, in /healthz and
/metrics, with a log line when the state changes; the model card and the local Swagger UI."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import xray_array
from factories import BINARY_CLASSES, make_bundle, png_bytes
from fastapi.testclient import TestClient

from chestxray.trust.drift import DRIFTING, OK, WARMING_UP, DriftMonitor
from chestxray.inference.predict import load_model
from chestxray.serving.serve import create_app


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    predictor = load_model(make_bundle(tmp_path_factory.mktemp("drift") / "bundle"))
    labels = [r.label for r in predictor.predict([xray_array(seed=s) for s in range(24)])]  # as training does
    shares = {name: labels.count(name) / len(labels) for name in BINARY_CLASSES}
    monitor = DriftMonitor(BINARY_CLASSES, {"predicted_shares": shares}, window=20, min_window=10)
    with TestClient(create_app(predictor, api_key="", drift=monitor)) as client:
        yield client, monitor


def send(client: TestClient, array: np.ndarray) -> dict:
    response = client.post("/v1/predict", files={"file": ("x.png", png_bytes(array), "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_a_drifting_stream_changes_healthz_and_metrics_and_logs_once(served, caplog):
    client, monitor = served
    assert client.get("/healthz").json()["drift"]["state"] == WARMING_UP
    for seed in range(100, 115):  # X-rays like the training ones
        send(client, xray_array(seed=seed))
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["drift"]["state"] == OK, health
    before = client.get("/metrics")
    assert before.headers["content-type"].startswith("text/plain")
    assert metric(before.text, "chestxray_drifting") == 0
    assert metric(before.text, "chestxray_window_size") == 15
    with caplog.at_level(logging.WARNING, logger="chestxray.drift"):
        for seed in range(200, 220):  # then inverted X-rays: a new scanner setting, say
            send(client, 255 - xray_array(seed=seed))
    drift = client.get("/healthz").json()["drift"]
    assert drift["state"] == DRIFTING and any("OOD percentile" in r for r in drift["reasons"])
    assert drift["window"] == 20  # bounded: the window never grows past its size
    after = client.get("/metrics").text
    assert metric(after, "chestxray_drifting") == 1
    assert metric(after, "chestxray_window_ood_percentile_median") > 75
    assert sum(float(line.split()[-1]) for line in after.splitlines()
               if line.startswith("chestxray_predictions_total{")) == 35
    changes = [r for r in caplog.records if "drift state drifting" in r.getMessage()]
    assert len(changes) == 1


def test_memory_is_bounded_and_missing_references_are_not_checked():
    monitor = DriftMonitor(["a", "b"], None, window=50, min_window=5)
    for i in range(10_000):
        monitor.record("a" if i % 2 else "b", 50.0, False, False)
    status = monitor.status()
    assert status["window"] == 50 and status["state"] == OK
    assert len(monitor._labels) == 50 and len(monitor._percentiles) == 50
    assert any("predicted-class shares" in n for n in status["not_checked"])
    shifted = DriftMonitor(["a", "b"], {"predicted_shares": {"a": 0.5, "b": 0.5}, "referral_rate": 0.1},
                           window=50, min_window=5)
    for _ in range(50):
        shifted.record("a", 40.0, False, True)
    reasons = shifted.status()["reasons"]
    assert any("shares moved" in r for r in reasons) and any("referral rate 100%" in r for r in reasons)


def test_model_card_and_offline_docs_are_served(served):
    client, _ = served
    card = client.get("/v1/model/card")
    assert card.status_code == 200 and card.headers["content-type"].startswith("text/markdown")
    assert "## Intended use" in card.text or "**Intended use:**" in card.text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower() and "/static/swagger-ui/" in docs.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert client.get(f"/static/swagger-ui/{asset}").status_code == 200
