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

import getpass
import hashlib
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import ChestXrayError

AUDIT_ENV = "CHESTXRAY_AUDIT_LOG"


def default_audit_path() -> Path:
    """``$CHESTXRAY_AUDIT_LOG``, else ``$XDG_STATE_HOME/chestxray/audit.jsonl``."""
    if os.environ.get(AUDIT_ENV):
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


def prediction_result(prediction: Any) -> dict[str, Any]:
    """The ``result`` of an audit line for a :class:`~chestxray.predict.Prediction` (no pixels)."""
    if prediction.error:
        return {"error": prediction.error}
    return {"label": prediction.label, "probabilities": prediction.probabilities, "ood": prediction.ood,
            "ood_percentile": prediction.ood_percentile}

