"""DICOMweb in and out: retrieve a study by WADO-RS, assess its X-rays, and store the structured
reports back by STOW-RS (dicomweb-client).

A study's answer is read through :func:`chestxray.decode.read_capped`, the reader every input path
shares: more than :data:`MAX_STUDY_BYTES` is cut as it streams in (memory never holds more), and the
whole answer (connection, headers and body) must arrive within :data:`TIMEOUT_S` seconds in all, a
total deadline, not a per-read timeout that a drip feed would never trip. A part that is not a
readable DICOM instance (HTML, junk, a truncated file) is a failure of that instance, never a crash.
"""

from __future__ import annotations

__all__ = ["TIMEOUT_S", "StudyResult", "client", "retrieve_study", "assess_study", "store_reports"]

import http.client
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from pydicom.dataset import Dataset

from ..data.decode import MAX_FILE_BYTES, read_capped
from .dicomresult import ACCEPTED_CLASSES, Assessment, assess, build_sr, check_instance, read_dataset
from ..errors import ChestXrayError, InputError

TIMEOUT_S = 60.0
"""Seconds a study's whole WADO-RS answer may take (connecting, headers and body together)."""
MAX_STUDY_BYTES = MAX_FILE_BYTES
"""Largest WADO-RS answer for one study (1 GiB, the file limit): a longer one is cut as it streams in."""
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


@dataclass
class StudyResult:
    """What came of one study: the assessments, the instances skipped (not X-ray storage) and, after
    STOW-RS, the SOP Instance UIDs of the reports stored."""

    study_instance_uid: str
    assessments: list[Assessment]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    """Instances that could not be read (a junk or truncated part): ``(label, reason)``."""
    datasets: dict[str, tuple[Dataset, bytes]] = field(default_factory=dict, repr=False)


def client(url: str, timeout: float = TIMEOUT_S) -> Any:
    """A DICOMweb client for ``url`` (the service root, e.g. ``http://pacs:8042/dicom-web``)."""
    from dicomweb_client.api import DICOMwebClient

    if not url.startswith(("http://", "https://")):
        raise ChestXrayError(f"--dicomweb {url!r}: expected an http:// or https:// URL of the DICOMweb root")
    return DICOMwebClient(url.rstrip("/"), timeout=timeout)


def retrieve_study(web: Any, study_instance_uid: str, *, limit: int | None = None,
                   timeout: float | None = None) -> tuple[list[tuple[Dataset, bytes]], list[tuple[str, str]]]:
    """Every instance of a study by WADO-RS, as ``(dataset, Part-10 bytes)``, and the parts that are no
    readable instance as ``(label, reason)``. The answer is capped at ``limit`` bytes (default
    :data:`MAX_STUDY_BYTES`) and ``timeout`` seconds in all (default :data:`TIMEOUT_S`);
    :class:`ChestXrayError` when the server cannot be reached, refuses, or answers no multipart DICOM."""
    base = str(getattr(web, "base_url", web)).rstrip("/")
    url = f"{base}/studies/{quote(study_instance_uid, safe='')}"
    what = f"WADO-RS study {study_instance_uid}"
    content_type, body = fetch(url, what, accept='multipart/related; type="application/dicom"; transfer-syntax=*',
                               limit=MAX_STUDY_BYTES if limit is None else limit,
                               timeout=TIMEOUT_S if timeout is None else timeout)
    if not content_type.lower().startswith("multipart/related"):
        raise ChestXrayError(f"{what}: {base} answered {content_type or 'no content type'}, "
                             "not multipart/related DICOM")
    instances, failed = [], []
    for index, (part_type, data) in enumerate(_parts(content_type, body, what), 1):
        label = f"{what}, part {index}"
        if part_type and not part_type.lower().startswith(("application/dicom", "application/octet-stream")):
            failed.append((label, f"a {part_type.split(';')[0]} part, not a DICOM instance"))
            continue
        try:
            ds = read_dataset(data, label)
        except InputError as err:
            failed.append((label, err.reason))
            continue
        instances.append((ds, data))
    return instances, failed


def fetch(url: str, what: str, *, accept: str, limit: int, timeout: float) -> tuple[str, bytes]:
    """GET ``url``: ``(content type, body)``, the body read through :func:`read_capped` with at most
    ``limit`` bytes, everything within ``timeout`` seconds in all. At the deadline a watchdog shuts the
    socket, so a server that never answers, or drips its headers, costs ``timeout`` and no more."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ChestXrayError(f"{what}: {url!r} is not an http:// or https:// URL")
    deadline = time.monotonic() + timeout
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                                 context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read at once
            except OSError:
                pass

    watchdog = threading.Timer(timeout, cut)
    watchdog.daemon = True
    watchdog.start()
    where = f"{parts.scheme}://{parts.netloc}"
    try:
        connection.connect()
        if expired.is_set():
            raise TimeoutError
        connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                           headers={"Accept": accept, "Host": parts.netloc})
        response = connection.getresponse()
        if response.status != 200:
            raise ChestXrayError(f"{what}: HTTP {response.status} from {where}")
        body = read_capped(response.read, what, limit=limit, deadline=deadline, what="answer")
        if expired.is_set():
            raise TimeoutError
        return response.getheader("Content-Type", ""), body
    except InputError as err:
        reason = err.reason if not expired.is_set() else "no complete answer"
        raise ChestXrayError(f"{what}: {reason} from {where}" + (f" within {timeout:g} s" if expired.is_set() else "")) \
            from None
    except (OSError, http.client.HTTPException) as err:
        if expired.is_set() or time.monotonic() >= deadline:
            raise ChestXrayError(f"{what}: no complete answer from {where} within {timeout:g} s") from None
        raise ChestXrayError(f"{what}: cannot reach {where} ({type(err).__name__}: "
                             f"{' '.join(str(err).split()) or 'connection failed'})") from None
    finally:
        watchdog.cancel()
        connection.close()


def _parts(content_type: str, body: bytes, what: str) -> list[tuple[str, bytes]]:
    """The parts of a multipart body as ``(content type, bytes)``; :class:`ChestXrayError` when it is none."""
    match = _BOUNDARY.search(content_type)
    if not match:
        raise ChestXrayError(f"{what}: a multipart answer without a boundary")
    delimiter = b"--" + match.group(1).strip().encode("latin-1")
    pieces = body.split(delimiter)
    if len(pieces) < 3:
        raise ChestXrayError(f"{what}: a multipart answer without a complete part")
    parts = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):  # the closing delimiter
            break
        head, separator, data = piece.partition(b"\r\n\r\n")
        if not separator:
            raise ChestXrayError(f"{what}: a malformed multipart part (no header end)")
        headers = dict(line.split(":", 1) for line in head.decode("latin-1").split("\r\n") if ":" in line)
        part_type = next((v.strip() for k, v in headers.items() if k.strip().lower() == "content-type"), "")
        parts.append((part_type, data[:-2] if data.endswith(b"\r\n") else data))
    return parts


def assess_study(predictor: Any, web: Any, study_instance_uid: str) -> StudyResult:
    """Retrieve a study and assess its CR, DX and Secondary Capture X-rays (other instances are skipped;
    parts that are no readable instance are listed in ``failed``)."""
    instances, failed = retrieve_study(web, study_instance_uid)
    if not instances and not failed:
        raise ChestXrayError(f"study {study_instance_uid}: no instances at {getattr(web, 'base_url', web)}")
    images, skipped = [], []
    for ds, data in instances:
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in ACCEPTED_CLASSES and str(ds.get("Manufacturer", "")) != "chestxray":
            try:
                check_instance(ds, f"instance {ds.get('SOPInstanceUID', '?')}")
            except InputError as err:
                failed.append((err.path, err.reason))
                continue
            images.append((ds, data))
        else:
            skipped.append((str(ds.get("SOPInstanceUID", "?")), f"not an X-ray image ({_class_name(sop_class)})"))
    result = StudyResult(study_instance_uid, assess(predictor, images) if images else [], skipped, failed=failed)
    result.datasets = {str(ds.SOPInstanceUID): (ds, data) for ds, data in images}
    return result


def store_reports(web: Any, result: StudyResult, *, algorithm: str) -> list[str]:
    """STOW-RS the structured report of each assessment into the study; returns the stored SR UIDs."""
    import requests

    reports = [build_sr(result.datasets[a.sop_instance_uid][0], a, algorithm=algorithm) for a in result.assessments]
    if not reports:
        return []
    try:
        response = web.store_instances(reports, study_instance_uid=result.study_instance_uid)
    except requests.RequestException as err:
        raise ChestXrayError(f"STOW-RS to {web.base_url}: {err}") from None
    failed = {str(item.ReferencedSOPInstanceUID) for item in response.get("FailedSOPSequence", [])}
    if failed:
        raise ChestXrayError(f"STOW-RS to {web.base_url} refused {len(failed)} of {len(reports)} report(s)")
    result.stored = [str(r.SOPInstanceUID) for r in reports]
    return result.stored


def _class_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name if uid else "no SOP class"
