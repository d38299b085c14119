"""REST API and web page over a loaded model (FastAPI + uvicorn).

``POST /v1/predict`` takes one image or DICOM as the multipart field ``file``; ``GET /v1/model``
describes the model; ``GET /healthz`` is the liveness probe; ``GET /`` is a self-contained page.

Safety: uploads are read in memory only, counted while streaming and refused above
``max_upload_bytes`` (413); unreadable files get 415 or 422 with ``{"error": ...}``, never a 500;
with an API key, ``/v1/*`` needs ``X-API-Key`` or ``Authorization: Bearer``. All inference runs on
ONE thread (concurrent torch passes collapse on few cores); requests that queue while it is busy
are run together as one batch.

Hostile clients: :class:`GuardedH11Protocol` closes a connection that has not sent a whole request
head within :data:`HEADER_TIMEOUT_S` of opening or of its previous answer (idle and slow-header
connections), and refuses connections beyond :data:`MAX_CONNECTIONS_PER_CLIENT` per client address
or :data:`MAX_CONNECTIONS` in all; an upload must arrive within :data:`BODY_TIMEOUT_S` and, after the first
:data:`BODY_GRACE_S`, at :data:`MIN_BODY_RATE` bytes a second at least (408: a body sent a byte a second
frees its request slot within seconds); at most :data:`MAX_ACTIVE_REQUESTS` requests run at once and
:data:`MAX_ACTIVE_PER_CLIENT` from one address (503 beyond; ``/healthz`` always answers). HEAD is answered
wherever GET is. A client that hangs up mid-upload is one log line, not a traceback. Idle
connections cost no request slot: uvicorn's own ``limit_concurrency`` counted them, so 64 idle
sockets made every request 503.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..constants import DEFAULT_BACKEND, SCORING_BATCH
from ..dicom.inferencelog import audit_upload, trail_from_environment
from ..data.decode import IMAGE_SUFFIXES, load_image
from ..stats.conformal import check_coverage
from ..data.dicomcheck import DEFAULT_POLICY, HeaderCheck
from ..trust.drift import DriftMonitor
from ..trust.lineage import describe_lineage
from ..errors import ChestXrayError, InputError
from ..model.modelcard import render_model_card
from ..inference.predict import BACKENDS, load_model

__all__ = ["MULTIPART_OVERHEAD_BYTES", "BODY_TIMEOUT_S", "MAX_CONNECTIONS_PER_CLIENT", "ApiError",
           "PredictionOut", "ModelOut", "ErrorOut", "InferenceQueue", "GuardedH11Protocol", "guarded_protocol",
           "uvicorn_options", "create_app", "serve", "app_from_environment", "background_server"]

API_KEY_ENV = "CHESTXRAY_API_KEY"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MULTIPART_OVERHEAD_BYTES = 16 * 1024
"""Room for the multipart boundaries and part headers around the file itself."""
MAX_BATCH = SCORING_BATCH
STATIC_DIR = Path(__file__).with_name("static")
SWAGGER_PREFIX = "/static/swagger-ui"
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
_IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
_DICOM_TYPES = ("application/dicom", "application/dicom+octet-stream")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_SERVE_ENV = "CHESTXRAY_SERVE_"
HEADER_TIMEOUT_S = 10.0
"""Seconds a connection may take to send a whole request head, from its opening or its previous answer."""
KEEP_ALIVE_S = 5
"""Seconds an idle keep-alive connection is kept after an answer (uvicorn's ``timeout_keep_alive``)."""
BODY_TIMEOUT_S = 60.0
"""Seconds an upload may take to arrive once its headers are in (408 beyond)."""
BODY_GRACE_S = 5.0
"""Seconds an upload may take before :data:`MIN_BODY_RATE` applies."""
MIN_BODY_RATE = 32 * 1024
"""Bytes a second an upload must average after :data:`BODY_GRACE_S` (408 below): slow bodies cannot hold
request slots."""
MAX_CONNECTIONS_PER_CLIENT = 32
"""Open connections allowed from one client address; more are answered 503 and closed. Behind a
reverse proxy every client has the proxy's address: raise it there (``serve(max_per_client=...)``)."""
MAX_CONNECTIONS = 1000
"""Open connections allowed in all; more are answered 503 and closed."""
MAX_ACTIVE_REQUESTS = 64
"""Requests handled at once (each may hold an upload in memory); more are answered 503."""
MAX_ACTIVE_PER_CLIENT = 16
"""Requests handled at once from one client address, so that other addresses keep capacity (503 beyond).
Lifted when the per-client connection cap is raised (behind a reverse proxy every client has its address)."""
MAX_HEADER_BYTES = 16 * 1024
"""Largest request head (h11's ``max_incomplete_event_size``): a longer one gets 400 and is closed."""
log = logging.getLogger("chestxray.serve")
T = TypeVar("T")


class ApiError(Exception):
    """A request the API refuses: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class PredictionOut(BaseModel):
    """Answer of ``POST /v1/predict``."""

    label: str = Field(description="Most probable class (multi-label: classes at 0.5 or more, joined by '|').")
    probabilities: dict[str, float] = Field(description="Calibrated probability of each class (the bundle's logit transform).")
    ood: bool = Field(description="True when the image does not look like the training X-rays: distrust the label.")
    ood_score: float | None = Field(description="Distance to the training images (null: no guard in the bundle).")
    ood_percentile: float | None = Field(
        None, description="Share (0-100) of held-out training X-rays with a lower ood_score: 50 is typical, "
                          "the flag starts near 99 (null: no guard, or a bundle without held-out scores).")
    typicality: str | None = Field(
        None, description="What ood_percentile means, in words: 'less typical than 82% of training X-rays: usual' "
                          "(usual below 90, unusual up to the guard's threshold, then flagged; null: not checked).")
    model_id: str = Field(description="<arch>@<first 12 hex digits of the weights' sha256>: which weights answered.")
    latency_ms: float = Field(description="Server time from the received upload to the answer.")
    cam_png: str | None = Field(None, description="Base64 PNG of the Grad-CAM overlay (with ?cam=true).")
    prediction_set: list[str] | None = Field(
        None, description="Classes the conformal sets cannot rule out at the bundle's coverage (null: not "
                          "checked, the bundle has no conformal sets).")
    coverage: float | None = Field(None, description="Coverage of prediction_set (null: not checked).")
    refer: bool = Field(False, description="Do not act on the label: the set holds more or fewer than one "
                                           "class, the image is out of distribution or its header fails the check.")
    reasons: list[str] = Field(default_factory=list, description="Why the prediction is referred.")
    cautions: list[str] = Field(default_factory=list, description="E.g. the label's training images came from "
                                                                  "another source than the others'.")
    header: dict[str, str] | None = Field(None, description="The DICOM header fields checked (null: not a DICOM, "
                                                             "not checked).")
    adaptation: str | None = Field(None, description="The site adaptation in use (null: the model as trained).")


class ModelOut(BaseModel):
    """Answer of ``GET /v1/model``."""

    model_id: str
    arch: str
    task: str
    classes: list[str]
    image_size: int
    fit_mode: str
    contrast: str
    temperature: float
    ood_guard: bool
    ood_threshold: float | None = Field(description="ood_score above which an image is flagged (null: no guard).")
    conformal: dict[str, Any] | None = Field(
        None, description="Conformal sets: score, the coverage served (serve --coverage) and the one they were "
                          "fitted at (fitted_coverage), per-class calibration counts and thresholds at the served "
                          "coverage (null: not fitted).")
    source_confound: dict[str, Any] | None = Field(
        None, description="Per class, the metadata-only one-vs-rest AUC on the training images and the classes "
                          "flagged (null: not measured).")
    operating_points: dict[str, dict[str, float]] = Field(
        description="Per class, thresholds on its probability chosen on the validation images: youden (best "
                    "sensitivity + specificity) and sensitivity_90/95 (the highest reaching that sensitivity). "
                    "A class is called when its probability is at or above the threshold.")
    metrics: dict[str, Any]
    trained_on: dict[str, Any] | None
    calibration: str = Field("", description="The logit transform applied before the softmax (none, temperature, "
                                             "bias or vector scaling).")
    adaptation: str | None = Field(None, description="The site adaptation in use (null: the model as trained).")
    lineage: dict[str, Any] | None = Field(None, description="Parent bundle id and weights sha256, local data "
                                                             "fingerprint, images per class, mode and date.")
    train_fingerprint: str
    created: str
    version: str
    server_version: str
    backend: str = Field(description="What computes the answers: torch, onnx (FP32) or onnx-int8.")
    quantization: dict[str, Any] | None = Field(
        None, description="onnx-int8 only: how the model was quantized and calibrated, and its parity with the "
                          "FP32 model on real X-rays (label agreement, largest probability difference).")
    max_upload_bytes: int


class ErrorOut(BaseModel):
    """Body of every refused request."""

    error: str


class InferenceQueue:
    """Runs every model call on one dedicated thread; images that arrive while it is busy are
    predicted together (up to ``max_batch``) in the next pass, so load raises throughput instead
    of oversubscribing the cores."""

    def __init__(self, predictor: Any, max_batch: int = MAX_BATCH) -> None:
        self.predictor = predictor
        self.max_batch = max_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chestxray-inference")
        self._waiting: list[tuple[np.ndarray, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None

    async def predict(self, image: np.ndarray) -> Any:
        """The predictor's :class:`Prediction` for one decoded image."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((image, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run any other model call (e.g. Grad-CAM) on the inference thread, in turn."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
            try:
                predictions = await self.call(self.predictor.predict, [image for image, _ in batch])
            except Exception as err:  # noqa: BLE001 - handed to every waiting request
                predictions = [err] * len(batch)
            for (_, future), prediction in zip(batch, predictions):
                if future.done():  # the client went away
                    continue
                if isinstance(prediction, Exception):
                    future.set_exception(prediction)
                else:
                    future.set_result(prediction)

    def close(self) -> None:
        """Stop the inference thread once its current work is done."""
        self._executor.shutdown(wait=True, cancel_futures=True)


class _SecurityHeaders:
    """Headers for every response: no MIME sniffing, no referrer, and no caching of API answers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                if scope["path"].startswith("/v1/"):
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus what uvicorn lacks against hostile clients: a deadline for each
    request head, and caps on the open connections per client address and in all.

    The limits are class attributes: :func:`guarded_protocol` makes a subclass with others.
    """

    header_timeout: float = HEADER_TIMEOUT_S
    max_per_client: int = int(os.environ.get(_SERVE_ENV + "MAX_PER_CLIENT") or MAX_CONNECTIONS_PER_CLIENT)
    max_connections: int = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        host = self.client[0] if self.client else None
        if len(self.connections) > self.max_connections:
            self._refuse("too many open connections to the server")
        elif host is not None and sum(getattr(c, "client", None) is not None and c.client[0] == host
                                      for c in self.connections) > self.max_per_client:
            self._refuse(f"too many open connections from {host}")
        else:
            self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_deadline()  # the next request head has the same deadline (slow keep-alive requests)

    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        self._deadline = self.loop.call_later(self.header_timeout, self._deadline_passed)

    def _disarm_deadline(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:  # no request head came in time
            self.transport.close()

    def _refuse(self, reason: str) -> None:
        body = f'{{"error": "{reason}"}}'.encode()
        self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
        self.transport.close()


def guarded_protocol(header_timeout: float = HEADER_TIMEOUT_S, max_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
                     max_connections: int = MAX_CONNECTIONS) -> type[GuardedH11Protocol]:
    """:class:`GuardedH11Protocol` with other limits (for one server process: not picklable for workers)."""
    if header_timeout <= 0 or max_per_client < 1 or max_connections < 1:
        raise ChestXrayError("the header timeout and the connection limits must be positive")
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": header_timeout, "max_per_client": max_per_client, "max_connections": max_connections})


def uvicorn_options(protocol: type[GuardedH11Protocol] = GuardedH11Protocol) -> dict[str, Any]:
    """The uvicorn settings every chestxray server runs with (``serve`` and ``background_server``)."""
    return {"http": protocol, "timeout_keep_alive": KEEP_ALIVE_S, "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
            "limit_concurrency": None, "server_header": False}


class _RequestLimit:
    """At most ``limit`` requests in progress, and ``per_client`` from one client address; more are
    answered 503 at once (``/healthz`` is exempt)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_ACTIVE_REQUESTS, per_client: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.per_client = limit if per_client is None else per_client
        self.active = 0
        self.by_client: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("?", 0))[0]
        if self.active >= self.limit or self.by_client.get(client, 0) >= self.per_client:
            whose = "at once" if self.active >= self.limit else "from your address at once"
            await JSONResponse({"error": f"server busy: too many requests {whose}, retry shortly"}, status_code=503,
                               headers={"Retry-After": "1"})(scope, receive, send)
            return
        self.active += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            self.by_client[client] -= 1
            if not self.by_client[client]:
                del self.by_client[client]


class _HeadAsGet:
    """HEAD answered wherever GET is: the GET answer's status and headers, without its body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


def create_app(predictor: Any, *, api_key: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, cam_predictor: Any | None = None,
               max_batch: int = MAX_BATCH, audit: Any | None = None,
               drift: DriftMonitor | None = None, source: str | None = None, url: str | None = None,
               max_active_per_client: int = MAX_ACTIVE_PER_CLIENT) -> FastAPI:
    """The FastAPI app serving ``predictor`` (a :class:`chestxray.predict.Predictor`).

    ``audit`` (a :class:`chestxray.audittrail.AuditTrail`) gets one line per prediction.

    ``api_key`` (default: ``$CHESTXRAY_API_KEY``; ``""`` for none) protects ``/v1/*``. Grad-CAM (``?cam=true``) uses
    ``cam_predictor`` when given (a torch predictor beside an ONNX one), else ``predictor``. ``drift``: the
    drift monitor (default: one over the last 500 predictions against the bundle's reference). ``source``
    (the bundle folder) and ``url`` (where it is served) go into the line logged at startup.
    """
    meta = predictor.meta
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    queue = InferenceQueue(predictor, max_batch)
    decoder = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="chestxray-decode")
    model_id = meta.model_id
    explainer = cam_predictor or predictor
    preprocessing = meta.preprocessing()
    model_info = ModelOut(
        model_id=model_id, arch=meta.arch, task=meta.task, classes=list(meta.classes),
        image_size=meta.image_size, fit_mode=preprocessing.mode, contrast=preprocessing.contrast,
        temperature=meta.temperature, ood_guard=bool(meta.ood),
        ood_threshold=meta.ood["threshold"] if meta.ood else None, operating_points=meta.operating_points,
        conformal=_public_conformal(meta.conformal, predictor), source_confound=meta.source_confound, metrics=meta.metrics,
        trained_on=meta.extra.get("trained_on"), calibration=meta.logit_transform().describe(),
        adaptation=describe_lineage(meta.lineage), lineage=meta.lineage, train_fingerprint=meta.train_fingerprint,
        created=meta.created, version=meta.package_version, server_version=__version__,
        backend=predictor.backend, quantization=getattr(predictor.runner, "quantization", None),
        max_upload_bytes=max_upload_bytes)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # uvicorn's own lines say nothing of the model: say once which one answers, and how
        logging.getLogger("uvicorn.error").info("%s", startup_line(predictor, source, url, key is not None))
        yield
        queue.close()
        decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="chestxray", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Chest X-ray classification. A research tool, **not a diagnostic device**.")
    monitor = drift or DriftMonitor(list(meta.classes), _drift_reference(meta.extra.get("reference"), predictor))
    card = render_model_card(dataclasses.asdict(meta))
    app.add_middleware(_RequestLimit, per_client=max_active_per_client)
    app.add_middleware(_SecurityHeaders)
    app.add_middleware(_HeadAsGet)
    _add_error_handlers(app)
    guard = [Depends(_key_guard(key))] if key else []
    refusals = {status: {"model": ErrorOut} for status in (400, 401, 408, 413, 415, 422, 503)}

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, Any]:
        """Liveness probe, with the drift state of the recent predictions against the training reference."""
        return {"status": "ok", "drift": monitor.status()}

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prediction counters and the drift window's figures in the Prometheus text format."""
        return Response(monitor.metrics(), media_type=PROMETHEUS_TYPE)

    @app.get("/v1/model/card", dependencies=guard, tags=["model"], response_class=PlainTextResponse,
             responses={401: refusals[401]})
    async def model_card() -> Response:
        """The model card (Markdown): intended use, training data, evaluation, calibration, conformal
        coverage, known failure modes, OOD behaviour and how to adapt the model to a site."""
        return Response(card, media_type="text/markdown; charset=utf-8")

    _add_local_docs(app)

    @app.get("/v1/model", response_model=ModelOut, dependencies=guard, tags=["model"],
             responses={401: refusals[401]})
    async def model() -> ModelOut:
        """Classes, architecture, image size, calibration, validation metrics and training data of the model."""
        return model_info

    @app.post("/v1/predict", response_model=PredictionOut, response_model_exclude_unset=True,
              dependencies=guard, tags=["model"], responses=refusals, openapi_extra=_UPLOAD_SCHEMA)
    async def predict(request: Request,
                      cam: bool = Query(False, description="Add a Grad-CAM overlay as base64 PNG (cam_png).")
                      ) -> PredictionOut:
        """Classify one chest X-ray (PNG, JPEG, BMP, TIFF or DICOM) sent as the multipart field ``file``."""
        data, filename, content_type = await _read_upload(request, max_upload_bytes)
        start = time.perf_counter()
        image, header = await asyncio.get_running_loop().run_in_executor(
            decoder, _decode_upload, data, filename, content_type, meta.image_size, predictor)
        prediction = await queue.predict(image)
        if not getattr(prediction, "error", None):
            prediction = predictor.with_header(prediction, header)  # the referral, header reasons included
        if audit is not None:
            await asyncio.get_running_loop().run_in_executor(
                decoder, audit_upload, audit, data, prediction, meta, f"api:{request.client.host if request.client else '?'}",
                (time.perf_counter() - start) * 1000, filename or "<upload>")
        if getattr(prediction, "error", None):
            raise ApiError(422, prediction.error)
        monitor.record(prediction.label, prediction.ood_percentile, prediction.ood, prediction.refer)
        extra = {}
        if cam:
            if explainer.model is None:
                raise ApiError(400, "Grad-CAM needs a PyTorch model: serve with the torch backend")
            extra["cam_png"] = base64.b64encode(await queue.call(explainer.gradcam_png, image)).decode("ascii")
        answer = {k: v for k, v in prediction.to_dict().items() if k not in ("file", "error")}  # the CLI's form
        return PredictionOut(**answer, latency_ms=round((time.perf_counter() - start) * 1000, 2), **extra)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:  # browsers ask for it: an answer, not a 404 in the log
        return Response(status_code=204)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def serve(bundle_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, backend: str = DEFAULT_BACKEND, *,
          workers: int = 1, threads: int | None = None, api_key: str | None = None,
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, log_level: str = "info",
          max_per_client: int = MAX_CONNECTIONS_PER_CLIENT, coverage: float | None = None,
          header_check: bool = True) -> None:
    """Serve the bundle's model with uvicorn until interrupted (Ctrl-C).

    ``backend`` is ``torch``, ``onnx`` (needs ``chestxray export`` first), ``onnx-int8`` (needs
    ``chestxray export --quantize int8``) or ``auto`` (ONNX when the bundle has it, else torch; see
    ``predict.load_model``). Each of the ``workers``
    processes loads its own model and computes with ``threads`` threads (default: torch's, the cores, divided
    among the workers; on a CPU shared with other busy processes, 1 thread avoids the collapse of
    oversubscribed torch threads). ``max_per_client``: open connections allowed from one address
    (see :data:`MAX_CONNECTIONS_PER_CLIENT`). ``coverage`` (of the conformal prediction sets, default the
    bundle's) and ``header_check`` (refer DICOMs whose header says they are not frontal chest
    radiographs) as for ``chestxray predict``.
    """
    if backend not in BACKENDS:
        raise ChestXrayError(f"unknown backend '{backend}': use {', '.join(BACKENDS)}")
    if workers < 1 or (threads is not None and threads < 1):
        raise ChestXrayError(f"workers and threads must be at least 1, not {workers} and {threads}")
    if not 1 <= port <= 65535:
        raise ChestXrayError(f"--port {port}: a port is 1 to 65535")
    if max_upload_bytes < 1 or max_per_client < 1:
        raise ChestXrayError(f"the upload limit and the per-client connection cap must be at least 1, not "
                             f"{max_upload_bytes} and {max_per_client}")
    threads = threads or max(1, torch.get_num_threads() // workers)
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if host not in _LOOPBACK and not key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model "
                    "(set %s)", host, API_KEY_ENV)
    if coverage is not None:
        check_coverage(coverage)
    settings = {"BUNDLE": str(Path(bundle_dir).resolve()), "BACKEND": backend, "MAX_UPLOAD": str(max_upload_bytes),
                "THREADS": str(threads), "COVERAGE": "" if coverage is None else repr(float(coverage)),
                "HEADER_CHECK": "1" if header_check else "0"}
    protocol = guarded_protocol(max_per_client=max_per_client)
    options = {"host": host, "port": port, "log_level": log_level, **uvicorn_options(protocol)}
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    settings["URL"] = url
    trust = {"coverage": coverage, "header_check": header_check, "url": url, "max_per_client": max_per_client}
    if workers == 1:
        uvicorn.run(_app_for_bundle(settings["BUNDLE"], backend, key, max_upload_bytes, threads, **trust), **options)
        return
    _app_for_bundle(settings["BUNDLE"], backend, key, max_upload_bytes, threads, **trust)  # fail here, not in every worker
    os.environ.update({_SERVE_ENV + name: value for name, value in settings.items()})
    os.environ[_SERVE_ENV + "MAX_PER_CLIENT"] = str(max_per_client)  # read by each worker's GuardedH11Protocol
    options["http"] = GuardedH11Protocol  # a class the worker processes can import
    if key:
        os.environ[API_KEY_ENV] = key
    uvicorn.run("chestxray.serving.serve:app_from_environment", factory=True, workers=workers, **options)


def app_from_environment() -> FastAPI:
    """App factory of each uvicorn worker process, configured by :func:`serve` through the environment."""
    env = {name: os.environ.get(_SERVE_ENV + name, "")
           for name in ("BUNDLE", "BACKEND", "MAX_UPLOAD", "THREADS", "COVERAGE", "HEADER_CHECK", "URL")}
    return _app_for_bundle(env["BUNDLE"], env["BACKEND"], None, int(env["MAX_UPLOAD"]), int(env["THREADS"]),
                           coverage=float(env["COVERAGE"]) if env["COVERAGE"] else None,
                           header_check=env["HEADER_CHECK"] != "0", url=env["URL"] or None,
                           max_per_client=int(os.environ.get(_SERVE_ENV + "MAX_PER_CLIENT") or MAX_CONNECTIONS_PER_CLIENT))


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1",
                      protocol: type[GuardedH11Protocol] = GuardedH11Protocol) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free port in a background thread, with :func:`serve`'s settings
    (``protocol``: other connection limits, see :func:`guarded_protocol`); yields its base URL.

    For tests, notebooks and benchmarks; the server stops when the block ends.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **uvicorn_options(protocol)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise ChestXrayError(f"the test server on {host}:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def startup_line(predictor: Any, source: str | None, url: str | None, keyed: bool) -> str:
    """What a server says when it starts: bundle, model id, backend, coverage, header check, URL."""
    level = getattr(predictor, "coverage", None)  # any predictor-like object is served
    coverage = f"prediction sets at {100 * level:g}% coverage" if level is not None else "no prediction sets"
    header = "DICOM header check on" if getattr(predictor, "header_policy", None) is not None else \
        "DICOM header check off"
    where = f"; page {url}, API docs {url.rstrip('/')}/docs" if url else ""
    return (f"chestxray {__version__} serving {source or 'a bundle'}: model {predictor.meta.model_id}, "
            f"backend {getattr(predictor, 'backend', '?')}, {coverage}, {header}, API key {'required' if keyed else 'not required'}"
            f"{where}")


def _app_for_bundle(bundle_dir: str, backend: str, api_key: str | None, max_upload_bytes: int,
                    threads: int, *, coverage: float | None = None, header_check: bool = True,
                    url: str | None = None, max_per_client: int = MAX_CONNECTIONS_PER_CLIENT) -> FastAPI:
    torch.set_num_threads(threads)  # the ONNX runner follows torch's setting
    predictor = load_model(bundle_dir, backend=backend, coverage=coverage,
                           header_policy=DEFAULT_POLICY if header_check else None)
    cam_predictor = load_model(bundle_dir, backend="torch") if predictor.backend != "torch" else None
    return create_app(predictor, api_key=api_key, max_upload_bytes=max_upload_bytes, cam_predictor=cam_predictor,
                      audit=trail_from_environment(), source=bundle_dir, url=url,
                      # behind a reverse proxy (a raised connection cap) every client has its address
                      max_active_per_client=MAX_ACTIVE_REQUESTS if max_per_client > MAX_CONNECTIONS_PER_CLIENT
                      else MAX_ACTIVE_PER_CLIENT)


def _key_guard(key: str) -> Callable[..., Any]:
    expected = key.encode()
    header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False)
    bearer_scheme = HTTPBearer(auto_error=False)

    async def require_key(header: str | None = Depends(header_scheme),
                          bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)) -> None:
        offered = header if header is not None else bearer.credentials if bearer else None
        # HTTP headers arrive decoded as Latin-1: compare their raw bytes with the key's UTF-8 bytes
        if offered is None or not secrets.compare_digest(offered.encode("latin-1"), expected):
            raise ApiError(401, "missing or wrong API key (send the X-API-Key header)")

    return require_key


async def _read_upload(request: Request, limit: int, timeout: float | None = None) -> tuple[bytes, str, str]:
    """The multipart field ``file`` read into memory, counting bytes while they stream in: returns
    the bytes, the client's file name (a label only, never a path) and the declared content type.
    An upload that takes more than ``timeout`` seconds (default :data:`BODY_TIMEOUT_S`) is refused (408)."""
    body_limit = limit + MULTIPART_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > body_limit):
        raise ApiError(413, f"upload larger than the limit of {_megabytes(limit)}")
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise ApiError(415, "send the image as multipart/form-data in the field 'file'")

    seconds = BODY_TIMEOUT_S if timeout is None else timeout
    loop = asyncio.get_running_loop()
    start = loop.time()
    final = start + seconds

    def allowed(received: int) -> float:
        """The deadline for the rest of the body: the total one, or sooner at the minimum rate."""
        return min(final, start + BODY_GRACE_S + received / MIN_BODY_RATE)

    async def counted() -> Any:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise ApiError(413, f"upload larger than the limit of {_megabytes(limit)}")
            budget.reschedule(allowed(received))
            yield chunk

    parser = MultiPartParser(request.headers, counted(), max_files=1, max_fields=8)
    parser.spool_max_size = body_limit  # keep the file in memory: nothing from a request touches the disk
    try:
        async with asyncio.timeout_at(allowed(0)) as budget:
            form = await parser.parse()
    except MultiPartException as err:
        raise ApiError(422, f"malformed multipart body ({err.message})") from None
    except ClientDisconnect:
        log.info("%s hung up during its upload", request.client.host if request.client else "a client")
        raise ApiError(400, "client disconnected during the upload") from None
    except TimeoutError:
        if loop.time() >= final:
            raise ApiError(408, f"upload not received within {seconds:g} s") from None
        raise ApiError(408, f"upload slower than {MIN_BODY_RATE // 1024} kB/s after {BODY_GRACE_S:g} s") from None
    upload = form.get("file")
    try:
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "no file in the multipart field 'file'")
        data = await upload.read()
        if len(data) > limit:
            raise ApiError(413, f"upload larger than the limit of {_megabytes(limit)}")
        return data, upload.filename or "", (upload.content_type or "").lower()
    finally:
        await form.close()


def _decode_upload(data: bytes, filename: str, content_type: str, image_size: int,
                   predictor: Any = None) -> tuple[np.ndarray, HeaderCheck | None]:
    """Decode the upload as prediction would (``load_image`` with ``min_side``) and check its DICOM
    header with ``predictor``'s policy; a refusal becomes 415 when nothing says the file is an image,
    else 422."""
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix not in IMAGE_SUFFIXES and content_type in _DICOM_TYPES:
        suffix = ".dcm"
    label = "upload" + (suffix if suffix in IMAGE_SUFFIXES else "")
    try:
        image = load_image(data, min_side=image_size, name=label)
        return image, predictor.inspect_header(data, label) if predictor is not None else None
    except InputError as err:
        claimed = suffix in IMAGE_SUFFIXES or content_type.startswith("image/") or content_type in _DICOM_TYPES
        looks_like_image = data.startswith(_IMAGE_SIGNATURES) or data[128:132] == b"DICM" or \
            data[8:12] == b"WEBP"
        if not (claimed or looks_like_image):
            raise ApiError(415, "unsupported file type: send a PNG, JPEG, BMP, TIFF or DICOM image") from None
        raise ApiError(422, err.reason) from None


def _public_conformal(conformal: dict[str, Any] | None, predictor: Any) -> dict[str, Any] | None:
    """The conformal sets as served: without their calibration scores (a few kB nobody reads here), at
    the served coverage (``serve --coverage``), with the coverage they were fitted at beside it."""
    if conformal is None or predictor.conformal is None:
        return None
    public = {k: v for k, v in conformal.items() if k != "calibration"}
    return {**public, "fitted_coverage": conformal["coverage"], "coverage": predictor.coverage,
            "thresholds": predictor.conformal.thresholds(predictor.coverage)}


def _drift_reference(reference: dict[str, Any] | None, predictor: Any) -> dict[str, Any]:
    """The bundle's drift reference, without its referral rate when the sets are served at another
    coverage than the one it was measured at (larger sets refer more: that rate would not compare)."""
    reference = dict(reference or {})
    if predictor.conformal is not None and predictor.coverage != predictor.conformal.coverage:
        reference.pop("referral_rate", None)
    return reference


def _add_local_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the assets of the ``swagger-ui-bundle`` package, served here, so the page
    works on a network without internet access (FastAPI's default loads them from a CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from swagger_ui_bundle import swagger_ui_path

    app.mount(SWAGGER_PREFIX, StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="chestxray API",
                                   swagger_js_url=f"{SWAGGER_PREFIX}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{SWAGGER_PREFIX}/swagger-ui.css",
                                   swagger_favicon_url=f"{SWAGGER_PREFIX}/favicon-32x32.png")


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.3g} MB"


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal is ``{"error": "..."}``; an unexpected failure is answered 500 (uvicorn logs it)."""

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return error(err.status, err.message, {"WWW-Authenticate": "Bearer"} if err.status == 401 else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return error(422, problems or "invalid request")

    @app.exception_handler(ChestXrayError)
    async def model_error(_: Request, err: ChestXrayError) -> JSONResponse:
        return error(422, str(err))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        return error(500, "internal error")


_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "A chest X-ray: PNG, JPEG, BMP, TIFF or DICOM."}}}}}}}
