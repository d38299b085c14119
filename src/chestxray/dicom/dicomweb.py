"""DICOMweb in and out (dicomweb-client): retrieve a study by WADO-RS, assess its X-rays, and store the
structured reports back by STOW-RS."""

from __future__ import annotations

__all__ = ["TIMEOUT_S", "StudyResult", "client", "retrieve_study", "assess_study", "store_reports"]

import io
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

from .dicomresult import ACCEPTED_CLASSES, Assessment, assess, build_sr
from ..errors import ChestXrayError

TIMEOUT_S = 60.0


@dataclass
class StudyResult:
    """What came of one study: the assessments, the instances skipped (not X-ray storage) and, after
    STOW-RS, the SOP Instance UIDs of the reports stored."""

    study_instance_uid: str
    assessments: list[Assessment]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    datasets: dict[str, tuple[Dataset, bytes]] = field(default_factory=dict, repr=False)


def client(url: str, timeout: float = TIMEOUT_S) -> Any:
    """A DICOMweb client for ``url`` (the service root, e.g. ``http://pacs:8042/dicom-web``)."""
    from dicomweb_client.api import DICOMwebClient

    if not url.startswith(("http://", "https://")):
        raise ChestXrayError(f"--dicomweb {url!r}: expected an http:// or https:// URL of the DICOMweb root")
    return DICOMwebClient(url.rstrip("/"), timeout=timeout)


def retrieve_study(web: Any, study_instance_uid: str) -> list[tuple[Dataset, bytes]]:
    """Every instance of a study by WADO-RS, as ``(dataset, Part-10 bytes)``."""
    import requests

    try:
        datasets = web.retrieve_study(study_instance_uid)
    except requests.HTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        raise ChestXrayError(f"WADO-RS study {study_instance_uid}: HTTP {status} from {web.base_url}") from None
    except requests.RequestException as err:
        raise ChestXrayError(f"WADO-RS study {study_instance_uid}: cannot reach {web.base_url} ({err})") from None
    return [(ds, _part10(ds)) for ds in datasets]


def assess_study(predictor: Any, web: Any, study_instance_uid: str) -> StudyResult:
    """Retrieve a study and assess its CR, DX and Secondary Capture X-rays (other instances are skipped)."""
    instances = retrieve_study(web, study_instance_uid)
    if not instances:
        raise ChestXrayError(f"study {study_instance_uid}: no instances at {web.base_url}")
    images, skipped = [], []
    for ds, data in instances:
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in ACCEPTED_CLASSES and "PixelData" in ds and str(ds.get("Manufacturer", "")) != "chestxray":
            images.append((ds, data))
        else:
            skipped.append((str(ds.get("SOPInstanceUID", "?")), f"not an X-ray image ({_class_name(sop_class)})"))
    result = StudyResult(study_instance_uid, assess(predictor, images) if images else [], skipped)
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


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _class_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name if uid else "no SOP class"
