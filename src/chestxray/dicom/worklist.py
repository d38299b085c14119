"""Worklist scoring: a CSV of image paths or study UIDs in, one result row per image out, resumable.

The worklist has a ``path`` column (image or DICOM files) or a ``study_instance_uid`` column (studies
retrieved by WADO-RS from ``dicomweb``), or both (either per row). Results are appended to ``out``
entry by entry, each entry's rows in one write, flushed to disk; a run that is interrupted and started
again skips the entries already in ``out`` (by their ``worklist_key``); an entry named by several rows
is scored once. Every row has the
StudyInstanceUID, SOPInstanceUID and accession number (DICOM inputs), the model id and a UTC timestamp.
"""

from __future__ import annotations

__all__ = ["PATH_COLUMN", "STUDY_COLUMN", "WorklistResult", "read_worklist", "score_worklist", "audit_assessments"]

import csv
import io
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from .inferencelog import AuditTrail, audit_assessment, local_caller, sha256_bytes
from ..data.decode import _is_dicom, read_file
from .dicomresult import assess, assessments_table, patient_fields, read_dataset
from ..constants import SCORING_BATCH
from ..trust.referral import referral
from ..errors import ChestXrayError, InputError

PATH_COLUMN = "path"
STUDY_COLUMN = "study_instance_uid"
_ALIASES = {"path": PATH_COLUMN, "file": PATH_COLUMN, "studyinstanceuid": STUDY_COLUMN,
            "study_instance_uid": STUDY_COLUMN, "study_uid": STUDY_COLUMN}


@dataclass
class WorklistResult:
    """How a run went: entries found in the worklist, already done before, scored now, and failed."""

    out: Path
    entries: int
    skipped: int
    scored: int
    failed: int
    duplicates: int = 0
    """Rows naming an entry an earlier row of the worklist names too: each entry is scored once."""


def read_worklist(path: str | Path) -> list[tuple[str, str]]:
    """The worklist's entries as ``(kind, value)``: ``("path", file)`` or ``("study", uid)``, in order
    (CSV; tab-separated for ``.tsv``).

    Relative paths are taken from the worklist's folder. A malformed CSV raises :class:`InputError`.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False,
                            sep="\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(path, f"not a readable CSV worklist ({' '.join(str(err).split())})") from None
    columns = {_ALIASES[c.strip().lower()]: c for c in table.columns if c.strip().lower() in _ALIASES}
    if not columns:
        raise InputError(path, f"needs a '{PATH_COLUMN}' or a '{STUDY_COLUMN}' column "
                               f"(found: {', '.join(table.columns) or 'none'})")
    entries = []
    for row in table.to_dict("records"):
        file = row.get(columns.get(PATH_COLUMN, ""), "").strip()
        study = row.get(columns.get(STUDY_COLUMN, ""), "").strip()
        if file:
            entries.append(("path", str(Path(file) if Path(file).is_absolute() else path.parent / file)))
        elif study:
            entries.append(("study", study))
    return entries


def score_worklist(predictor: Any, worklist: str | Path, out: str | Path, *, dicomweb: str | None = None,
                   batch_size: int = SCORING_BATCH, audit: AuditTrail | None = None) -> WorklistResult:
    """Score every entry of ``worklist`` not yet in ``out`` and append its rows to ``out`` (CSV), with the
    predictor's header check and conformal coverage."""
    entries = read_worklist(worklist)
    unique = list(dict.fromkeys(entries))  # a repeated row is scored once, at its first place
    out = Path(out)
    done = _done_keys(out)
    todo = [(kind, value) for kind, value in unique if _key(kind, value) not in done]
    if any(kind == "study" for kind, _ in todo) and not dicomweb:
        raise ChestXrayError(f"{worklist}: study UIDs need --dicomweb URL to retrieve them")
    columns = ["worklist_key", "path", *assessments_table([], predictor.classes).columns, "error", "timestamp"]
    scored = failed = 0
    web = None
    for chunk in _chunks(todo, batch_size):
        rows: list[dict[str, Any]] = []
        files = [value for kind, value in chunk if kind == "path"]
        rows += _score_files(predictor, files, audit)
        for kind, value in chunk:
            if kind == "study":
                from .dicomweb import client

                web = web or client(dicomweb)
                rows += _score_study(predictor, web, value, audit)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for row in rows:
            row["timestamp"] = stamp
        failed += sum(1 for row in rows if row.get("error"))
        scored += len({row["worklist_key"] for row in rows})
        _append(out, pd.DataFrame(rows).reindex(columns=columns))
    return WorklistResult(out, len(entries), len(unique) - len(todo), scored, failed, len(entries) - len(unique))


def _score_files(predictor: Any, files: list[str], audit: AuditTrail | None) -> list[dict]:
    rows: list[dict] = []
    if not files:
        return rows
    start = time.perf_counter()
    dicoms, others = [], []
    for file in files:
        try:
            data = read_file(file)  # decode's guard: type and size checked before a byte is read
        except InputError as err:
            rows.append({"worklist_key": _key("path", file), "path": file, "refer": True, "error": err.reason})
            continue
        if data and _is_dicom(data, file):
            try:
                dicoms.append((file, read_dataset(data, file), data))
            except InputError as err:
                rows.append({"worklist_key": _key("path", file), "path": file, "refer": True, "error": err.reason})
        else:
            others.append((file, data))
    assessments = assess(predictor, [(ds, data) for _, ds, data in dicoms]) if dicoms else []
    predictions = predictor.predict([data for _, data in others], names=[f for f, _ in others]) if others else []
    latency = (time.perf_counter() - start) * 1000 / max(1, len(files))
    table = assessments_table(assessments, predictor.classes)
    for (file, ds, data), row, assessment in zip(dicoms, table.to_dict("records"), assessments):
        rows.append({"worklist_key": _key("path", file), "path": file, **row, "error": assessment.error})
        audit_assessment(audit, source="predict", caller=local_caller(), data=data, assessment=assessment,
                         latency_ms=latency, patient=patient_fields(ds))
    meta = predictor.meta
    for (file, data), prediction in zip(others, predictions):
        refer, reasons = referral(prediction)
        row = prediction.to_row()  # the CLI's row: same rounding, same joins
        row.pop("file")
        rows.append({"worklist_key": _key("path", file), "path": file, **row, "refer": refer,
                     "reasons": "; ".join(reasons), "model_id": meta.model_id})
        if audit is not None:
            audit.record_prediction(prediction, meta, source="predict", caller=local_caller(),
                                    input_sha256=sha256_bytes(data), latency_ms=latency)
    return rows


def _score_study(predictor: Any, web: Any, uid: str, audit: AuditTrail | None) -> list[dict]:
    from .dicomweb import assess_study

    start = time.perf_counter()
    try:
        result = assess_study(predictor, web, uid)
    except ChestXrayError as err:
        return [{"worklist_key": _key("study", uid), "study_instance_uid": uid, "refer": True, "error": str(err)}]
    except Exception as err:  # noqa: BLE001 - one study's failure is its row's error, the run goes on
        return [{"worklist_key": _key("study", uid), "study_instance_uid": uid, "refer": True,
                 "error": f"cannot assess the study ({type(err).__name__}: {' '.join(str(err).split())})"}]
    latency = (time.perf_counter() - start) * 1000 / max(1, len(result.assessments))
    rows = [{"worklist_key": _key("study", uid), **row, "error": None}
            for row in assessments_table(result.assessments, predictor.classes).to_dict("records")]
    rows += [{"worklist_key": _key("study", uid), "study_instance_uid": uid, "refer": True,
              "error": f"{label}: {reason}"} for label, reason in result.failed]
    audit_assessments(audit, result, latency)
    if not rows:
        rows = [{"worklist_key": _key("study", uid), "study_instance_uid": uid, "refer": True,
                 "error": "no X-ray images in the study"}]
    return rows


def audit_assessments(audit: AuditTrail | None, result: Any, latency_ms: float) -> None:
    """Audit lines for the assessments of a :class:`~chestxray.dicomweb.StudyResult`."""
    for assessment in result.assessments:
        ds, data = result.datasets[assessment.sop_instance_uid]
        audit_assessment(audit, source="predict", caller=local_caller(), data=data, assessment=assessment,
                         latency_ms=latency_ms, patient=patient_fields(ds))


def _key(kind: str, value: str) -> str:
    return f"{kind}:{value}"


def _done_keys(out: Path) -> set[str]:
    if not out.is_file() or out.stat().st_size == 0:
        return set()
    try:
        done = pd.read_csv(out, dtype=str, keep_default_na=False, usecols=["worklist_key"])
    except (ValueError, pd.errors.ParserError) as err:
        raise InputError(out, f"cannot resume from this results file ({' '.join(str(err).split())})") from None
    return set(done["worklist_key"])


def _append(out: Path, rows: pd.DataFrame) -> None:
    """Append rows (with the header when the file is new) in one write, flushed to disk."""
    header = not out.is_file() or out.stat().st_size == 0
    text = io.StringIO()
    rows.to_csv(text, index=False, header=header)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8", newline="") as handle:
        handle.write(text.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
