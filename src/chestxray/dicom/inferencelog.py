"""The audit trail: one JSON line per inference, from ``serve``, ``listen`` and ``predict``.

Each line: ``time`` (UTC ISO 8601), ``source`` (serve, listen, predict), ``caller`` (calling AE title,
API client address, or the local user), ``input_sha256``, ``sop_instance_uid`` and ``study_instance_uid``
(DICOM inputs), ``model_id``, ``weights_sha256``, ``result`` (label and probabilities, or the error),
``referral`` (``refer`` and ``reasons``), ``latency_ms``. Never pixel data. Patient fields (patient id,
name, birth date, sex, accession number) only when the trail is opened with ``patient_fields=True``.

Where: ``--audit-log PATH``, else ``$CHESTXRAY_AUDIT_LOG``, else ``$XDG_STATE_HOME/chestxray/audit.jsonl``
(``~/.local/state/chestxray/audit.jsonl``). Lines are appended under a lock, each with one ``write``
and flushed to disk, so concurrent writers in one process never interleave and a crash loses no line.
"""

from __future__ import annotations

__all__ = ["AUDIT_ENV", "PATIENT_FIELDS_ENV", "default_audit_path", "sha256_bytes", "local_caller", "AuditTrail",
           "audit_assessment", "audit_predictions", "audit_upload",
           "trail_from_environment"]

import getpass
import hashlib
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ChestXrayError

AUDIT_ENV = "CHESTXRAY_AUDIT_LOG"
PATIENT_FIELDS_ENV = "CHESTXRAY_AUDIT_PATIENT_FIELDS"


def default_audit_path() -> Path:
    """``$CHESTXRAY_AUDIT_LOG``, else ``$XDG_STATE_HOME/chestxray/audit.jsonl``."""
    if os.environ.get(AUDIT_ENV) and os.environ[AUDIT_ENV].lower() != "off":
        return Path(os.environ[AUDIT_ENV]).expanduser()
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "chestxray" / "audit.jsonl"


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of an input's bytes: the audit's input hash."""
    return hashlib.sha256(data).hexdigest()


def local_caller() -> str:
    """The user running a command-line inference."""
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


class AuditTrail:
    """Appends audit lines to ``path`` (created with its folder, mode 0600)."""

    def __init__(self, path: str | Path | None = None, *, patient_fields: bool = False) -> None:
        self.path = Path(path) if path else default_audit_path()
        self.patient_fields = patient_fields
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        except OSError as err:
            raise ChestXrayError(f"{self.path}: cannot write the audit trail ({err.strerror or err})") from None

    def record(self, *, source: str, caller: str, input_sha256: str, model_id: str, weights_sha256: str,
               result: dict[str, Any], refer: bool, reasons: list[str], latency_ms: float,
               sop_instance_uid: str | None = None, study_instance_uid: str | None = None,
               patient: dict[str, str] | None = None) -> dict[str, Any]:
        """Append one line and return it as a dict. ``patient`` is written only with ``patient_fields``."""
        line: dict[str, Any] = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "source": source,
            "caller": caller, "input_sha256": input_sha256, "sop_instance_uid": sop_instance_uid or None,
            "study_instance_uid": study_instance_uid or None, "model_id": model_id,
            "weights_sha256": weights_sha256, "result": result, "referral": {"refer": refer, "reasons": reasons},
            "latency_ms": round(float(latency_ms), 2)}
        if self.patient_fields and patient:
            line["patient"] = patient
        text = (json.dumps(line, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, text)
                os.fsync(fd)
            finally:
                os.close(fd)
        return line

    def record_prediction(self, prediction: Any, meta: Any, *, source: str, caller: str, input_sha256: str,
                          latency_ms: float, patient: dict[str, str] | None = None, **uids: str) -> dict[str, Any]:
        """The line of a :class:`~chestxray.inference.predict.Prediction` (its :meth:`to_audit` result and its
        :func:`~chestxray.trust.referral.referral`) by the model of ``meta``."""
        from ..trust.referral import referral

        refer, reasons = referral(prediction)  # its reasons hold the header check's, as the predictor ran it
        return self.record(source=source, caller=caller, input_sha256=input_sha256, model_id=meta.model_id,
                           weights_sha256=meta.provenance.get("weights_sha256", ""), result=prediction.to_audit(),
                           refer=refer, reasons=reasons, latency_ms=latency_ms, patient=patient, **uids)


def audit_assessment(trail: AuditTrail | None, *, source: str, caller: str, data: bytes, assessment: Any,
                     latency_ms: float, patient: dict[str, str] | None = None) -> None:
    """One line for a :class:`~chestxray.dicomresult.Assessment` of a DICOM instance (``data``: its bytes)."""
    if trail is None:
        return
    trail.record(source=source, caller=caller, input_sha256=sha256_bytes(data), model_id=assessment.model_id,
                 weights_sha256=assessment.weights_sha256, result=assessment.to_audit(), refer=assessment.refer,
                 reasons=assessment.reasons, latency_ms=latency_ms, sop_instance_uid=assessment.sop_instance_uid,
                 study_instance_uid=assessment.study_instance_uid, patient=patient)


def audit_predictions(trail: AuditTrail, predictions: list[Any], meta: Any, latency_ms: float) -> None:
    """One line per :class:`~chestxray.predict.Prediction` of files (``predict``; ``latency_ms``: the run's
    mean time per image)."""
    from ..data.decode import content_hash

    caller = local_caller()
    for prediction in predictions:
        try:
            digest, uids = content_hash(prediction.file), _dicom_uids(prediction.file)
        except Exception:  # noqa: BLE001 - unreadable: the prediction's error says why
            digest, uids = "", {}
        trail.record_prediction(prediction, meta, source="predict", caller=caller, input_sha256=digest,
                                latency_ms=latency_ms, **uids)


def _dicom_uids(file: str) -> dict[str, str]:
    if not file.lower().endswith((".dcm", ".dicom")):
        with open(file, "rb") as handle:
            if handle.read(132)[128:] != b"DICM":
                return {}
    import pydicom

    ds = pydicom.dcmread(file, stop_before_pixels=True, force=True)
    return {"sop_instance_uid": str(ds.get("SOPInstanceUID", "")), "study_instance_uid": str(ds.get("StudyInstanceUID", ""))}


def audit_upload(trail: AuditTrail, data: bytes, prediction: Any, meta: Any, caller: str, latency_ms: float,
                 name: str = "<upload>") -> None:
    """One line for an uploaded image (``serve``; ``prediction`` with its referral decided, the DICOM header
    check's reasons included): a DICOM upload also gets its UIDs."""
    from .dicomresult import patient_fields, read_dataset

    uids, patient = {}, None
    if len(data) > 132 and data[128:132] == b"DICM":
        try:
            ds = read_dataset(data, name)
            uids = {"sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
                    "study_instance_uid": str(ds.get("StudyInstanceUID", ""))}
            patient = patient_fields(ds)
        except Exception:  # noqa: BLE001 - the prediction's error says what was wrong
            pass
    trail.record_prediction(prediction, meta, source="serve", caller=caller, input_sha256=sha256_bytes(data),
                            latency_ms=latency_ms, patient=patient, **uids)


def trail_from_environment() -> AuditTrail | None:
    """The trail a server process writes: ``$CHESTXRAY_AUDIT_LOG`` (``off``: none), patient fields when
    ``$CHESTXRAY_AUDIT_PATIENT_FIELDS`` is 1."""
    if os.environ.get(AUDIT_ENV, "").lower() == "off":
        return None
    return AuditTrail(patient_fields=os.environ.get(PATIENT_FIELDS_ENV) == "1")
