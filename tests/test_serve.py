"""Tests for chestxray.serve: every status the API answers, the page, Grad-CAM, API keys, uploads kept
in memory, the one-thread micro-batching queue, and a small load test on a real uvicorn server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import tempfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi import Request
from fastapi.testclient import TestClient
from PIL import Image

from chestxray.model.bundle import META_FILE
from chestxray.model.cam import LABELLED_MIN_SIDE
from chestxray.errors import ChestXrayError
from chestxray.inference.predict import Predictor, load_model
from chestxray.serving.serve import (MULTIPART_OVERHEAD_BYTES, ApiError, InferenceQueue, _read_upload, app_from_environment,
                             background_server, create_app, serve)
from conftest import xray_array
from factories import CLASSES, IMAGE_SIZE, build_tiny_bundle, make_bundle, png_bytes


def jpeg_bytes(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(xray_array(96, 80, seed)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + \
        chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def predictor(bundle: Path) -> Predictor:
    return load_model(bundle)


@pytest.fixture
def client(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.delenv("CHESTXRAY_API_KEY", raising=False)
    with TestClient(create_app(predictor)) as test_client:
        yield test_client


def post_file(client: TestClient, name: str, data: bytes, content_type: str | None = None, **params) -> httpx.Response:
    file = (name, data, content_type) if content_type else (name, data)
    return client.post("/v1/predict", files={"file": file}, params=params)


def assert_refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert all(word in body["error"].lower() for word in words), body


# ---------------------------------------------------------------------- 200


def test_png_prediction_matches_the_predictor(client: TestClient, predictor: Predictor, tmp_path: Path) -> None:
    data = png_bytes(seed=3)
    response = post_file(client, "chest.png", data)
    assert response.status_code == 200, response.text
    body = response.json()
    (tmp_path / "chest.png").write_bytes(data)
    expected = predictor.predict(tmp_path / "chest.png")
    assert body["label"] == expected.label
    assert body["probabilities"] == expected.to_dict()["probabilities"]  # the one serialised form, rounded
    assert sum(body["probabilities"].values()) == pytest.approx(1.0)
    assert body["ood"] is False and body["ood_score"] is None  # the bundle has no guard
    assert body["model_id"].startswith("resnet18") and body["latency_ms"] > 0
    assert "cam_png" not in body
    assert response.headers["cache-control"] == "no-store"


def test_dicom_prediction_matches_the_predictor(client: TestClient, predictor: Predictor, make_dicom) -> None:
    path = make_dicom("chest.dcm", (xray_array(90, 70, 5).astype(np.uint16) * 16), WindowCenter=2000,
                      WindowWidth=4000)
    response = post_file(client, "chest.dcm", path.read_bytes(), "application/dicom")
    assert response.status_code == 200, response.text
    assert response.json()["probabilities"] == predictor.predict(path).to_dict()["probabilities"]


def test_different_images_get_different_answers(client: TestClient) -> None:
    first = post_file(client, "a.png", png_bytes(seed=1)).json()["probabilities"]
    second = post_file(client, "b.jpg", jpeg_bytes(seed=7)).json()["probabilities"]
    assert max(abs(first[c] - second[c]) for c in CLASSES) > 1e-4


def test_cam_returns_a_decodable_png_overlay(client: TestClient) -> None:
    response = post_file(client, "a.png", png_bytes(seed=2), cam="true")
    assert response.status_code == 200, response.text
    overlay = Image.open(io.BytesIO(base64.b64decode(response.json()["cam_png"])))
    assert overlay.format == "PNG" and overlay.mode == "RGB"
    assert min(overlay.size) > max(IMAGE_SIZE, LABELLED_MIN_SIDE)  # titled, with a colour bar


def test_cam_without_a_torch_model_is_a_clear_400(predictor: Predictor) -> None:
    runner_only = Predictor(predictor.runner, predictor.meta)  # what the ONNX backend builds
    with TestClient(create_app(runner_only, api_key="")) as client:
        assert post_file(client, "a.png", png_bytes()).status_code == 200
        assert_refused(post_file(client, "a.png", png_bytes(), cam="true"), 400, "grad-cam", "torch")


@pytest.mark.parametrize(("threshold", "flagged"), [(0.0, True), (1e12, False)])
def test_ood_flag_and_score_come_from_the_bundle_guard(tmp_path: Path, threshold: float, flagged: bool) -> None:
    bundle = make_bundle(tmp_path / "guarded")  # a bundle with a fitted OOD guard
    meta = json.loads((bundle / META_FILE).read_text())
    meta["ood"]["threshold"] = threshold
    meta["operating_points"] = {meta["classes"][0]: {"youden": 0.4, "sensitivity_95": 0.1}}
    (bundle / META_FILE).write_text(json.dumps(meta))
    guarded = load_model(bundle)
    with TestClient(create_app(guarded, api_key="")) as client:
        body = post_file(client, "a.png", png_bytes(seed=20)).json()
        model = client.get("/v1/model").json()
        assert model["ood_threshold"] == threshold and model["operating_points"] == meta["operating_points"]
    assert body["ood"] is flagged
    expected = guarded.predict(png_bytes(seed=20))
    assert body["ood_score"] == expected.to_dict()["ood_score"] == pytest.approx(expected.ood_score, abs=0.005)
    assert body["ood_score"] > 0
    assert body["ood_percentile"] == round(float(guarded.guard.percentile(np.array([expected.ood_score]))[0]), 1)


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize("side", [80, 400])  # file over the limit; whole body over limit + multipart room
def test_upload_over_the_limit_is_413(predictor: Predictor, side: int) -> None:
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (side, side), dtype=np.uint8))
    with TestClient(create_app(predictor, max_upload_bytes=4000, api_key="")) as client:
        assert_refused(post_file(client, "big.png", big), 413, "limit")
        assert post_file(client, "small.png", png_bytes(np.zeros((8, 8), np.uint8))).status_code == 200


def test_a_body_without_content_length_is_cut_off_while_streaming() -> None:
    """An endless chunked upload: the server must stop reading soon after the limit."""
    limit, chunk = 100_000, 64 * 1024
    head = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    pulled = 0

    async def receive() -> dict:
        nonlocal pulled
        if pulled > 50 * limit:
            raise AssertionError(f"read {pulled} bytes of a body over the {limit}-byte limit")
        body = head if pulled == 0 else b"x" * chunk
        pulled += len(body)
        return {"type": "http.request", "body": body, "more_body": True}

    scope = {"type": "http", "method": "POST", "path": "/v1/predict", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b")]}
    with pytest.raises(ApiError) as refused:
        asyncio.run(_read_upload(Request(scope, receive), limit))
    assert refused.value.status == 413
    assert pulled <= limit + MULTIPART_OVERHEAD_BYTES + chunk


def test_lying_content_length_header_is_413_before_reading(client: TestClient) -> None:
    response = client.post("/v1/predict", content=b"x", headers={
        "content-type": "multipart/form-data; boundary=b", "content-length": str(10**12)})
    assert_refused(response, 413)


@pytest.mark.parametrize(("name", "data", "content_type"), [
    ("notes.txt", b"just some text\n", "text/plain"),
    ("report.pdf", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "application/pdf"),
])
def test_files_that_are_not_images_are_415(client: TestClient, name: str, data: bytes, content_type: str) -> None:
    assert_refused(post_file(client, name, data, content_type), 415, "unsupported")


def test_a_body_that_is_not_multipart_is_415(client: TestClient) -> None:
    response = client.post("/v1/predict", content=png_bytes(), headers={"content-type": "image/png"})
    assert_refused(response, 415, "multipart")


@pytest.mark.parametrize(("name", "data", "reason"), [
    ("cut.jpg", jpeg_bytes()[:600], "truncated"),
    ("text.png", b"this is not a picture at all", "not a readable image"),
    ("bad.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI" + b"\xff" * 40, "dicom"),
])
def test_corrupt_images_are_422(client: TestClient, name: str, data: bytes, reason: str) -> None:
    assert_refused(post_file(client, name, data), 422, reason)


def test_decompression_bomb_is_refused_with_422(client: TestClient) -> None:
    bomb = png_claiming(30000, 30000)
    assert len(bomb) < 200
    assert_refused(post_file(client, "bomb.png", bomb), 422, "bomb")


def test_missing_file_field_and_bad_query_are_422(client: TestClient) -> None:
    assert_refused(client.post("/v1/predict", files={"image": ("a.png", png_bytes())}), 422, "file")
    text_field = client.post("/v1/predict", data={"file": "a string, not a file"}, files={"x": ("x", b"")})
    assert_refused(text_field, 422, "file")
    assert_refused(post_file(client, "a.png", png_bytes(), cam="maybe"), 422, "cam")


def test_unknown_path_is_a_json_404(client: TestClient) -> None:
    assert_refused(client.get("/v2/nothing"), 404)


def test_an_unexpected_failure_is_a_json_500_without_details(predictor: Predictor) -> None:
    class Broken:
        meta, runner, backend, conformal = predictor.meta, predictor.runner, predictor.backend, None

        def predict(self, images):
            raise RuntimeError("secret internal detail")

    with TestClient(create_app(Broken(), api_key=""), raise_server_exceptions=False) as client:
        response = post_file(client, "a.png", png_bytes())
    assert response.status_code == 500 and response.json() == {"error": "internal error"}


# ---------------------------------------------------------------------- API key


@pytest.mark.parametrize("from_env", [False, True])
def test_api_key_guards_v1_but_not_health_or_page(predictor: Predictor, monkeypatch: pytest.MonkeyPatch,
                                                  from_env: bool) -> None:
    monkeypatch.setenv("CHESTXRAY_API_KEY", "s3cret-ключ" if from_env else "other")
    app = create_app(predictor) if from_env else create_app(predictor, api_key="s3cret-ключ")
    with TestClient(app) as client:
        assert_refused(client.get("/v1/model"), 401, "api key")
        assert_refused(post_file(client, "a.png", png_bytes()), 401)
        assert_refused(client.get("/v1/model", headers={"X-API-Key": "s3cret"}), 401)
        assert_refused(client.get("/v1/model", headers={"Authorization": "Bearer wrong"}), 401)
        good = {"X-API-Key": "s3cret-ключ".encode()}  # a non-ASCII key travels as its UTF-8 bytes
        assert client.get("/v1/model", headers=good).status_code == 200
        bearer = {"Authorization": "Bearer s3cret-ключ".encode()}
        assert client.post("/v1/predict", files={"file": ("a.png", png_bytes())}, headers=bearer).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200


def test_without_a_key_v1_is_open(client: TestClient) -> None:
    assert client.get("/v1/model").status_code == 200


# ---------------------------------------------------------------------- service and page


def test_health_and_model_description(client: TestClient, predictor: Predictor) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["drift"]["state"] == "warming up"
    model = client.get("/v1/model").json()
    meta = predictor.meta
    assert model["classes"] == CLASSES and model["image_size"] == IMAGE_SIZE and model["task"] == "multiclass"
    assert model["temperature"] == meta.temperature and model["metrics"] == meta.metrics
    assert model["trained_on"]["n_train"] == 24 and model["arch"] == "resnet18"
    assert model["version"] == meta.package_version and model["ood_guard"] is False
    assert model["ood_threshold"] is None and model["operating_points"] == {}
    assert model["max_upload_bytes"] == 20 * 1024 * 1024


def test_page_and_its_assets_are_served_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "not a diagnostic device" in page.text.lower()
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text and client.get(asset).status_code == 200


def test_openapi_documents_the_upload(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    upload = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]["properties"]["file"]["format"] == "binary"
    assert client.get("/docs").status_code == 200


# ---------------------------------------------------------------------- memory only, queue, load


def test_large_uploads_never_spill_to_disk(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self) -> None:
        raise AssertionError("the upload was written to a temporary file")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", refuse)
    noise = np.random.default_rng(2).integers(0, 255, (1200, 1200), dtype=np.uint8)
    data = png_bytes(noise)
    assert len(data) > 1024 * 1024  # above Starlette's default 1 MB spooling threshold
    assert post_file(client, "big.png", data).status_code == 200


def test_queue_runs_one_model_call_at_a_time_and_batches_waiting_images() -> None:
    release = threading.Event()
    calls: list[list[int]] = []
    active = []

    class Recorder:
        def predict(self, images):
            active.append(1)
            assert len(active) == 1, "two model calls overlapped"
            calls.append([int(image[0, 0]) for image in images])
            if len(calls) == 1:
                release.wait(10)
            active.pop()
            return [f"result {int(image[0, 0])}" for image in images]

    async def scenario() -> list[str]:
        queue = InferenceQueue(Recorder(), max_batch=3)
        first = asyncio.create_task(queue.predict(np.full((2, 2), 0, np.uint8)))
        await asyncio.sleep(0.1)  # the first call is now blocked on the inference thread
        rest = [asyncio.create_task(queue.predict(np.full((2, 2), i, np.uint8))) for i in range(1, 6)]
        await asyncio.sleep(0.1)
        release.set()
        results = await asyncio.gather(first, *rest)
        queue.close()
        return results

    results = asyncio.run(scenario())
    assert results == [f"result {i}" for i in range(6)]
    assert calls == [[0], [1, 2, 3], [4, 5]]


def test_concurrent_clients_on_a_real_server_all_succeed(predictor: Predictor) -> None:
    images = [png_bytes(seed=seed) for seed in range(4)]
    expected = [predictor.predict(image).probabilities for image in images]

    def client_session(base_url: str, client_index: int) -> list[tuple[int, int, dict]]:
        answers = []
        with httpx.Client(base_url=base_url, timeout=60) as http:
            for request_index in range(5):
                which = (client_index + request_index) % len(images)
                response = http.post("/v1/predict", files={"file": (f"{which}.png", images[which], "image/png")})
                answers.append((which, response.status_code, response.json()))
        return answers

    with background_server(create_app(predictor, api_key="")) as url, ThreadPoolExecutor(8) as pool:
        answers = [a for session in pool.map(lambda i: client_session(url, i), range(8)) for a in session]
    assert len(answers) == 40
    assert [status for _, status, _ in answers] == [200] * 40
    for which, _, body in answers:  # batched or not, every answer is its own image's
        assert body["probabilities"] == pytest.approx(expected[which], abs=1e-4)  # 4 decimals, batched or not


def test_worker_processes_build_their_app_from_the_environment(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"BUNDLE": str(bundle), "BACKEND": "torch", "MAX_UPLOAD": "12345", "THREADS": "1"}
    for name, value in settings.items():
        monkeypatch.setenv(f"CHESTXRAY_SERVE_{name}", value)
    monkeypatch.setenv("CHESTXRAY_API_KEY", "k")
    threads = torch.get_num_threads()
    try:
        with TestClient(app_from_environment()) as client:
            model = client.get("/v1/model", headers={"X-API-Key": "k"}).json()
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert model["max_upload_bytes"] == 12345 and model["backend"] == "torch" and model["classes"] == CLASSES


@pytest.mark.parametrize(("options", "message"), [({"backend": "tensorflow"}, "unknown backend"),
                                                  ({"workers": 0}, "at least 1"), ({"threads": 0}, "at least 1")])
def test_serve_refuses_bad_options_before_starting(bundle: Path, options: dict, message: str) -> None:
    with pytest.raises(ChestXrayError, match=message):
        serve(bundle, **options)


def test_serve_refuses_an_onnx_backend_without_an_export(bundle: Path) -> None:
    with pytest.raises(ChestXrayError, match="chestxray export"):
        serve(bundle, backend="onnx")


def test_the_server_says_which_model_answers_and_has_a_favicon(bundle: Path, caplog) -> None:
    import logging

    predictor = load_model(bundle)
    with caplog.at_level(logging.INFO, logger="uvicorn.error"):
        with TestClient(create_app(predictor, api_key="", source=str(bundle), url="http://127.0.0.1:8000/")) as c:
            assert c.get("/favicon.ico").status_code == 204
    line = next(r.getMessage() for r in caplog.records if r.name == "uvicorn.error" and "serving" in r.getMessage())
    assert str(bundle) in line and predictor.meta.model_id in line and "backend torch" in line
    assert "no prediction sets" in line and "header check on" in line and "http://127.0.0.1:8000/docs" in line
