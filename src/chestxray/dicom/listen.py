"""``chestxray listen``: a DICOM node (pynetdicom Storage SCP) that answers X-rays with structured reports.

Flow, each step durable before the next::

    C-STORE received -> checked -> spool/incoming/<uid>.dcm (fsync'd) -> status Success to the sender
      -> inference thread: moved to spool/working/, header check + model -> SR (+ Grad-CAM SC) in
         spool/outbox/ (fsync'd) -> the instance removed
      -> delivery thread: C-STORE to the destination AE -> outbox removed

A restart resumes both folders; a destination that is down is retried with exponential back-off;
an object the destination keeps refusing is moved to spool/failed/ with the reason, never dropped.

DIMSE statuses: CR, DX and Secondary Capture storage are accepted; any other storage SOP class is refused with 0x0122
(SOP class not supported); a dataset that cannot be parsed or has no usable image gets 0xC000 (cannot
understand); a spool without room, or a dataset over :data:`MAX_DATASET_BYTES`, gets 0xA700 (out of
resources). Calling AE titles outside the allow-list are rejected at association (A-ASSOCIATE-RJ, calling AE
title not recognised).

Hostile peers: a received dataset streams to a file in ``spool/receiving/`` as it arrives (pynetdicom's
chunked receiving), and stops being written past the size limit, so a huge C-STORE costs neither memory
nor disk; a connection must send its association request within :data:`ACSE_TIMEOUT_S`, an idle
association is closed after :data:`NETWORK_TIMEOUT_S`; at most :data:`MAX_ASSOCIATIONS` connections in all
and :data:`MAX_ASSOCIATIONS_PER_ADDRESS` from one address are served (more are closed at once). A destination
answering 0xA7xx (out of resources, transient) gets the back-off of a destination that is down; what was
moved to ``failed/`` after :attr:`ListenConfig.max_attempts` refusals is put back in the outbox every
:attr:`ListenConfig.retry_failed_s` seconds and at every start.
"""

from __future__ import annotations

__all__ = ["SUCCESS", "SOP_CLASS_NOT_SUPPORTED", "OUT_OF_RESOURCES", "CANNOT_UNDERSTAND", "DEFAULT_AE_TITLE",
           "DEFAULT_PORT", "Destination", "ListenConfig", "SpoolFull", "Spool", "Listener", "listen"]

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import DEFAULT_BACKEND, LISTEN_BATCH
from .inferencelog import AuditTrail, audit_assessment
from ..data.dicomcheck import DEFAULT_POLICY, HeaderPolicy
from .dicomresult import (ACCEPTED_CLASSES, Assessment, assess, build_cam_image, build_sr, check_instance,
                          patient_fields, read_dataset)
from ..data.decode import read_capped
from ..errors import ChestXrayError, InputError

log = logging.getLogger("chestxray.listen")

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
DEFAULT_AE_TITLE = "CHESTXRAY"
DEFAULT_PORT = 11112
MAX_DATASET_BYTES = 256 * 2**20
"""Largest C-STORE dataset accepted (256 MiB; a chest X-ray is 5 to 60 MB): a larger one is refused with
0xA700 and its bytes are dropped as they arrive."""
ACSE_TIMEOUT_S = 10.0
"""Seconds a connection may take to request an association (and to answer a release)."""
DIMSE_TIMEOUT_S = 30.0
"""Seconds a peer may take to complete a DIMSE message once it started it."""
NETWORK_TIMEOUT_S = 30.0
"""Seconds an association may stay silent before it is closed."""
MAX_ASSOCIATIONS = 64
"""Connections (associations and connections that have not asked for one yet) served at once."""
MAX_ASSOCIATIONS_PER_ADDRESS = 16
"""Connections served at once from one address: more are closed at once, so that one sender (or an
attacker holding idle sockets) cannot lock out the others."""
RETRY_FAILED_S = 3600.0
"""Seconds between two returns of ``failed/`` results to the outbox (0: only at start)."""
_PARTIAL = ".part"


@dataclass(frozen=True)
class Destination:
    """Where results go: ``AE@host:port``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AE@host:port`` -> :class:`Destination`; a clear error otherwise."""
        match = re.fullmatch(r"([^@]{1,16})@([^:@]+):(\d{1,5})", text.strip())
        if not match or not 0 < int(match.group(3)) < 65536:
            raise ChestXrayError(f"destination {text!r}: expected AE_TITLE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
        return cls(match.group(1), match.group(2), int(match.group(3)))


@dataclass
class ListenConfig:
    """Settings of a :class:`Listener` (see ``chestxray listen --help``)."""

    spool: Path
    destination: Destination | None = None
    ae_title: str = DEFAULT_AE_TITLE
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allowed_callers: Sequence[str] = ()
    cam: bool = False
    min_free_bytes: int = 64 * 1024 * 1024
    """Free space the spool's disk must keep after a received instance is written; below it the
    instance is refused (0xA700), so results and the queue's own files always have room."""
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    max_attempts: int = 20
    """Refusals by the destination of one object before it is moved to ``failed/``."""
    batch_size: int = LISTEN_BATCH
    max_dataset_bytes: int = MAX_DATASET_BYTES
    max_associations: int = MAX_ASSOCIATIONS
    max_per_address: int = MAX_ASSOCIATIONS_PER_ADDRESS
    acse_timeout_s: float = ACSE_TIMEOUT_S
    dimse_timeout_s: float = DIMSE_TIMEOUT_S
    network_timeout_s: float = NETWORK_TIMEOUT_S
    retry_failed_s: float = RETRY_FAILED_S

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ChestXrayError(f"--port {self.port}: a port is 1 to 65535")
        for name in ("max_dataset_bytes", "max_associations", "max_per_address", "max_attempts", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ChestXrayError(f"listen: {name} must be at least 1 (got {getattr(self, name)})")
        for name in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s", "retry_base_s", "retry_max_s"):
            if not float(getattr(self, name)) > 0:
                raise ChestXrayError(f"listen: {name} must be positive (got {getattr(self, name)})")
        if self.min_free_bytes < 0 or self.retry_failed_s < 0:
            raise ChestXrayError("listen: the free-space reserve and the failed/ retry period cannot be negative")


class SpoolFull(Exception):
    """The spool's disk has no room for a received instance."""


class Spool:
    """The durable queue: ``incoming/`` (received, to assess), ``working/`` (being assessed),
    ``outbox/`` (results to deliver), ``failed/`` (what could not be reported or delivered, with the reason)."""

    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = Path(root)
        self.incoming, self.working, self.outbox, self.failed, self.receiving = (
            self.root / name for name in ("incoming", "working", "outbox", "failed", "receiving"))
        self.min_free_bytes = min_free_bytes
        try:
            for folder in (self.incoming, self.working, self.outbox, self.failed, self.receiving):
                folder.mkdir(parents=True, exist_ok=True)
            for stale in self.receiving.iterdir():  # a receipt cut short: never acknowledged, the sender resends
                stale.unlink(missing_ok=True)
        except OSError as err:
            raise ChestXrayError(f"--spool {self.root}: cannot use it as a spool ({err.strerror or err})") from None
        for partial in self.root.rglob(f"*{_PARTIAL}"):  # a write cut short: never acknowledged, the sender resends
            partial.unlink(missing_ok=True)
        for claimed in self.pending(self.working):  # being assessed when the node stopped: assess again
            self.release(claimed)

    def claim(self, path: Path) -> Path:
        """Move an incoming instance (and its caller note) to ``working/``, so that the same UID received
        again meanwhile is a new file, not one we are about to remove."""
        target = self.working / path.name
        os.replace(path, target)
        note = path.with_suffix(".caller")
        if note.exists():
            os.replace(note, target.with_suffix(".caller"))
        return target

    def release(self, claimed: Path) -> None:
        """Put a claimed instance back in ``incoming/`` to be assessed again (unless the same UID was
        received again meanwhile: the newer copy wins)."""
        for path in (claimed, claimed.with_suffix(".caller")):
            if not path.exists():
                continue
            if (self.incoming / path.name).exists():
                path.unlink()
            else:
                os.replace(path, self.incoming / path.name)

    def accept(self, data: bytes, sop_instance_uid: str) -> Path:
        """Write a received instance to ``incoming/`` durably; :class:`SpoolFull` when there is no room."""
        if shutil.disk_usage(self.incoming).free - len(data) < self.min_free_bytes:
            raise SpoolFull(f"less than {self.min_free_bytes // 2**20} MiB would be left on the spool's disk")
        try:
            return _write_durably(self.incoming / f"{sop_instance_uid}.dcm", data)
        except OSError as err:
            raise SpoolFull(err.strerror or str(err)) from None

    def retry_failed(self) -> int:
        """Put the results the destination refused too often (``failed/<uid>.dcm`` beside its ``.json``
        state) back in the outbox, their count of refusals reset; returns how many."""
        moved = 0
        for state in sorted(self.failed.glob("*.json")):
            result = state.with_suffix(".dcm")
            if result.exists():
                os.replace(result, self.outbox / result.name)
                moved += 1
            state.unlink(missing_ok=True)
        return moved

    def pending(self, folder: Path, limit: int | None = None) -> list[Path]:
        """The ``.dcm`` files of ``folder``, oldest first."""
        files = sorted(folder.glob("*.dcm"), key=lambda p: (_mtime(p), p.name))
        return files[:limit] if limit else files


class Listener:
    """The DICOM node: a Storage SCP, an inference thread and a delivery thread over one :class:`Spool`."""

    def __init__(self, predictor: Any, config: ListenConfig, audit: AuditTrail | None = None, *,
                 explainer: Any | None = None) -> None:
        self.predictor = predictor
        self.explainer = explainer or predictor
        """The torch predictor Grad-CAM runs on (``predictor`` itself unless that one runs ONNX)."""
        self.config = config
        self.audit = audit
        self.spool = Spool(config.spool, config.min_free_bytes)
        self._work = threading.Event()
        self._deliver = threading.Event()
        self._stop = threading.Event()
        self._server: Any = None
        self._threads: list[threading.Thread] = []
        self._next_delivery = 0.0
        self._failed_retried = time.monotonic()
        self._failures = 0
        self.delivered = 0
        self.algorithm = f"chestxray {predictor.meta.arch}".strip()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> tuple[str, int]:
        """Start the SCP and the worker threads; returns the bound ``(host, port)``."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        config = self.config
        ae = _timed_ae(config.ae_title, config)
        ae.maximum_associations = config.max_associations
        for context in AllStoragePresentationContexts:
            syntaxes = ALL_TRANSFER_SYNTAXES if context.abstract_syntax in ACCEPTED_CLASSES else None
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        if config.allowed_callers:
            ae.require_calling_aet = list(config.allowed_callers)
        _receive_to_files(self.spool.receiving, config.max_dataset_bytes)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)]
        try:
            self._server = ae.start_server((config.host, config.port), block=False, evt_handlers=handlers)
        except (OSError, OverflowError, ValueError) as err:
            raise ChestXrayError(f"cannot listen on {config.host}:{config.port} "
                                 f"({getattr(err, 'strerror', None) or err})") from None
        self._server.verify_request = self._admit  # the per-address cap, before a thread is spent on it
        moved = self.spool.retry_failed()
        if moved:
            log.warning("%d result(s) from failed/ put back in the outbox", moved)
        self._failed_retried = time.monotonic()
        for target, name in ((self._assess_loop, "chestxray-assess"), (self._delivery_loop, "chestxray-deliver")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._work.set()
        self._deliver.set()
        return self._server.server_address[:2]

    def stop(self) -> None:
        """Stop receiving, let the threads finish the object at hand, and return."""
        self._stop.set()
        self._work.set()
        self._deliver.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        for thread in self._threads:
            thread.join(timeout=60)

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing waits in ``incoming/``, ``working/`` or ``outbox/`` (or ``timeout``); True when idle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(self.spool.pending(f) for f in (self.spool.incoming, self.spool.working, self.spool.outbox)):
                return True
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------ receiving

    def _admit(self, request: Any, client_address: Any) -> bool:
        """socketserver's ``verify_request``: False (the socket is closed at once) beyond the caps."""
        server = self._server
        if server is None:
            return False
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        active = server.active_associations
        if len(active) >= self.config.max_associations:
            log.warning("refused a connection from %s: %d connections already served", host, len(active))
            return False
        mine = sum(1 for assoc in active if _address(assoc) == host)
        if mine >= self.config.max_per_address:
            log.warning("refused a connection from %s: %d connections from that address already", host, mine)
            return False
        return True

    def _on_store(self, event: Any) -> int:
        path = _received_path(event)
        try:
            return self._store(event, path)
        finally:
            if path is not None:
                _OVERSIZE.discard(str(path))
                path.unlink(missing_ok=True)  # pynetdicom removes it too; the memory was never used

    def _store(self, event: Any, path: Path | None) -> int:
        if event.context.abstract_syntax not in ACCEPTED_CLASSES:
            log.warning("refused %s from %s: SOP class %s is not CR, DX or Secondary Capture storage", _uid_text(event),
                        _caller(event), event.context.abstract_syntax)
            return SOP_CLASS_NOT_SUPPORTED
        if path is not None and str(path) in _OVERSIZE:
            log.warning("refused %s from %s: dataset over the limit of %s bytes", _uid_text(event), _caller(event),
                        f"{self.config.max_dataset_bytes:,}")
            return OUT_OF_RESOURCES
        try:
            if path is not None:
                with path.open("rb") as handle:
                    data = read_capped(handle.read, "received dataset", limit=self.config.max_dataset_bytes,
                                       what="dataset")
            else:
                data = event.encoded_dataset(include_meta=True)
            ds = read_dataset(data, "received dataset")
            uid = check_instance(ds, "received dataset")
        except InputError as err:
            log.warning("refused a dataset from %s: %s", _caller(event), err)
            return CANNOT_UNDERSTAND
        except OSError as err:
            log.error("refused a dataset from %s: cannot read it back (%s)", _caller(event), err.strerror or err)
            return OUT_OF_RESOURCES
        try:
            self.spool.accept(data, uid)
        except SpoolFull as err:
            log.error("refused %s from %s: spool full (%s)", uid, _caller(event), err)
            return OUT_OF_RESOURCES
        try:
            (self.spool.incoming / f"{uid}.caller").write_text(_caller(event))
        except OSError:  # only the audit's caller is lost; the instance is safe
            pass
        self._work.set()
        return SUCCESS

    # ------------------------------------------------------------------ assessing

    def _assess_loop(self) -> None:
        while not self._stop.is_set():
            self._work.wait(timeout=1.0)
            self._work.clear()
            try:
                while not self._stop.is_set() and self._assess_batch():
                    pass
            except Exception:  # noqa: BLE001 - e.g. the disk went away; keep the thread, retry
                _log_failure("assessing the spool failed; retrying in 5 s")
                time.sleep(5.0)

    def _assess_batch(self) -> bool:
        """Assess up to ``batch_size`` spooled instances; False when there was nothing to do or no room."""
        files = self.spool.pending(self.spool.incoming, self.config.batch_size)
        if not files:
            return False
        received = []
        for path in files:
            try:
                path = self.spool.claim(path)
                data = path.read_bytes()
                received.append((path, read_dataset(data, path.name), data))
            except (OSError, InputError) as err:  # checked on receipt: only a disk fault gets here
                log.error("%s: %s; moved to failed/", path.name, err)
                _move(path, self.spool.failed)
        if not received:
            return True
        try:
            assessments = assess(self.predictor, [(ds, data) for _, ds, data in received])
        except Exception:  # noqa: BLE001 - a model failure must not stop the node; the files stay queued
            _log_failure("inference failed; the %d instance(s) stay in the spool, retrying in 5 s", len(received))
            for path, _, _ in received:
                self.spool.release(path)
            time.sleep(5.0)
            return False
        for index, ((path, ds, data), assessment) in enumerate(zip(received, assessments)):
            try:
                self._write_results(ds, data, assessment)
            except OSError as err:  # no room for the results: keep the instances, try again later
                log.error("cannot write the results of %s (%s); will retry", path.name, err.strerror or err)
                for claimed, _, _ in received[index:]:
                    self.spool.release(claimed)
                time.sleep(1.0)
                return False
            except Exception as err:  # noqa: BLE001 - an instance we cannot report on is kept, not lost
                _log_failure("cannot build the results of %s; moved to failed/", path.name)
                _write_durably(self.spool.failed / f"{path.stem}.reason", f"{type(err).__name__}: {err}\n".encode())
                _move(path, self.spool.failed)
                continue
            self._audit(path, ds, data, assessment)
            path.unlink(missing_ok=True)
            path.with_suffix(".caller").unlink(missing_ok=True)
        self._deliver.set()
        return True

    def _write_results(self, ds: Any, data: bytes, assessment: Assessment) -> None:
        import io

        objects = [build_sr(ds, assessment, algorithm=self.algorithm)]
        if self.config.cam and assessment.label and self.explainer.model is not None:
            from ..model.cam import overlay

            image, heatmap, _ = self.explainer.gradcam(data)
            objects.append(build_cam_image(ds, overlay(image, heatmap), assessment.model_id))
        for result in objects:
            buffer = io.BytesIO()
            result.save_as(buffer, enforce_file_format=True)
            _write_durably(self.spool.outbox / f"{result.SOPInstanceUID}.dcm", buffer.getvalue())

    def _audit(self, path: Path, ds: Any, data: bytes, assessment: Assessment) -> None:
        caller_file = path.with_suffix(".caller")
        caller = caller_file.read_text() if caller_file.is_file() else "unknown"
        audit_assessment(self.audit, source="listen", caller=caller, data=data, assessment=assessment,
                         latency_ms=(time.time() - _mtime(path)) * 1000, patient=patient_fields(ds))

    # ------------------------------------------------------------------ delivering

    def _delivery_loop(self) -> None:
        while not self._stop.is_set():
            wait = max(0.0, self._next_delivery - time.monotonic())
            self._deliver.wait(timeout=min(wait, 1.0) if wait else 1.0)
            self._deliver.clear()
            if self._stop.is_set() or time.monotonic() < self._next_delivery:
                continue
            if self.config.destination is None:
                continue
            if self.config.retry_failed_s and time.monotonic() - self._failed_retried > self.config.retry_failed_s:
                self._failed_retried = time.monotonic()
                moved = self.spool.retry_failed()
                if moved:
                    log.warning("%d result(s) from failed/ put back in the outbox", moved)
            files = self.spool.pending(self.spool.outbox)
            if files:
                try:
                    self._deliver_files(files)
                except Exception as err:  # noqa: BLE001 - the results stay in the outbox
                    self._back_off(f"delivery failed ({type(err).__name__}: {err})")

    def _deliver_files(self, files: list[Path]) -> None:
        from pydicom import dcmread

        destination = self.config.destination
        datasets = []
        for path in files:
            try:
                datasets.append((path, dcmread(path)))
            except Exception as err:  # noqa: BLE001 - written by us; a disk fault
                log.error("%s: unreadable result (%s); moved to failed/", path.name, err)
                _move(path, self.spool.failed)
        ae = _timed_ae(self.config.ae_title, self.config)
        for sop_class in sorted({str(ds.SOPClassUID) for _, ds in datasets}):
            ae.add_requested_context(sop_class)
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not assoc.is_established:
            self._back_off(f"cannot associate with {destination.ae_title}@{destination.host}:{destination.port}")
            return
        try:
            for path, ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None:  # connection lost mid-way
                    self._back_off("the association was lost")
                    return
                if code == SUCCESS or 0xB000 <= code <= 0xBFFF:  # success or warning: stored
                    path.unlink(missing_ok=True)
                    path.with_suffix(".json").unlink(missing_ok=True)
                    self.delivered += 1
                elif 0xA700 <= code <= 0xA7FF:  # out of resources: transient, as a destination that is down
                    self._back_off(f"{destination.ae_title} is out of resources (status 0x{code:04X})")
                    return
                else:
                    self._refused(path, code)
            self._failures = 0
        finally:
            if assoc.is_established:
                assoc.release()

    def _back_off(self, reason: str) -> None:
        delay = min(self.config.retry_max_s, self.config.retry_base_s * 2 ** self._failures)
        self._failures += 1
        self._next_delivery = time.monotonic() + delay
        log.warning("%s; %d result(s) wait in the outbox, next try in %.1f s", reason,
                    len(self.spool.pending(self.spool.outbox)), delay)

    def _refused(self, path: Path, code: int) -> None:
        state_file = path.with_suffix(".json")
        state = json.loads(state_file.read_text()) if state_file.is_file() else {"attempts": 0}
        state["attempts"] += 1
        state["last_status"] = f"0x{code:04X}"
        if state["attempts"] >= self.config.max_attempts:
            log.error("%s refused %d times by the destination (status 0x%04X); moved to failed/",
                      path.name, state["attempts"], code)
            _write_durably(state_file, json.dumps(state).encode())
            _move(path, self.spool.failed)
            _move(state_file, self.spool.failed)
            return
        _write_durably(state_file, json.dumps(state).encode())
        log.warning("%s refused by the destination (status 0x%04X), attempt %d", path.name, code, state["attempts"])


def listen(bundle: str | Path, config: ListenConfig, *, backend: str = DEFAULT_BACKEND,
           audit: AuditTrail | None = None, coverage: float | None = None,
           header_policy: HeaderPolicy | None = DEFAULT_POLICY) -> None:
    """Load the bundle and run a :class:`Listener` until interrupted (Ctrl-C).

    ``backend``, ``coverage`` (of the conformal prediction sets) and ``header_policy`` (``None``: no
    header check) as for :func:`chestxray.predict.load_model`; with ``config.cam`` a torch model is
    loaded beside an ONNX one for Grad-CAM."""
    from ..inference.predict import load_model

    predictor = load_model(bundle, backend=backend, coverage=coverage, header_policy=header_policy)
    explainer = load_model(bundle, backend="torch") if config.cam and predictor.model is None else None
    listener = Listener(predictor, config, audit, explainer=explainer)
    host, port = listener.start()
    where = (f"{config.destination.ae_title}@{config.destination.host}:{config.destination.port}"
             if config.destination else "nowhere (no --dest: results stay in the outbox)")
    log.warning("listening as %s on %s:%d, model %s; results to %s; spool %s", config.ae_title, host, port,
                predictor.meta.model_id, where, config.spool)
    try:
        while True:
            time.sleep(3600)
    finally:
        listener.stop()


def _log_failure(message: str, *args: Any) -> None:
    """An unexpected failure in one log line naming it; its traceback at debug level only."""
    import sys

    err = sys.exc_info()[1]
    log.error(message + " (%s: %s)", *args, type(err).__name__, " ".join(str(err).split()))
    log.debug("traceback", exc_info=True)


_OVERSIZE: set[str] = set()
"""Files of datasets still arriving that passed the size limit (their further bytes are dropped)."""


class _CappedFile:
    """The file pynetdicom streams a received dataset into, that stops writing past ``limit`` bytes:
    the rest of an oversized dataset is dropped as it arrives and the file is emptied (memory and disk
    stay bounded); the C-STORE handler then refuses it."""

    def __init__(self, handle: Any, limit: int) -> None:
        self._handle = handle
        self._limit = limit
        self._written = 0

    def write(self, data: bytes) -> int:
        if self.name in _OVERSIZE:
            return len(data)
        self._written += len(data)
        if self._written > self._limit:
            _OVERSIZE.add(self.name)
            self._handle.truncate(0)
            return len(data)
        return self._handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _receive_to_files(folder: Path, limit: int) -> None:
    """Make pynetdicom stream every received C-STORE dataset to a capped file in ``folder`` instead of
    memory (process-wide: the listener started last sets the folder and the limit)."""
    import tempfile

    from pynetdicom import _config, dimse_messages

    def capped(*args: Any, **kwargs: Any) -> _CappedFile:
        return _CappedFile(tempfile.NamedTemporaryFile(*args, **{**kwargs, "dir": folder}), limit)

    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = capped


def _received_path(event: Any) -> Path | None:
    try:
        return Path(event.dataset_path)
    except (AttributeError, TypeError, ValueError):  # not received to a file
        return None


def _timed_ae(ae_title: str, config: ListenConfig) -> Any:
    """A pynetdicom AE with the listener's ACSE, DIMSE and network timeouts."""
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.acse_timeout, ae.dimse_timeout = config.acse_timeout_s, config.dimse_timeout_s
    ae.network_timeout = config.network_timeout_s
    return ae


def _address(assoc: Any) -> str | None:
    try:
        return assoc.requestor.address
    except AttributeError:
        return None


def _write_durably(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file, fsync'd and renamed: all or nothing."""
    partial = path.with_name(path.name + _PARTIAL)
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise
    return path


def _move(path: Path, folder: Path) -> None:
    if path.exists():
        os.replace(path, folder / path.name)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _caller(event: Any) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.ae_title}@{requestor.address}"


def _uid_text(event: Any) -> str:
    try:
        return str(event.request.AffectedSOPInstanceUID)
    except AttributeError:
        return "an instance"
