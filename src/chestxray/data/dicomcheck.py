"""What a DICOM header says about whether an image is a frontal chest X-ray at all.

The one place that reads the header for that purpose: ``predict``, ``listen`` and ``serve`` call
:func:`check_header` (or :func:`check_source`) and refer, rather than silently classify, any image
whose header says it is not what the model was trained on. Every reason reads
``not_frontal_cxr: <what the header says>``, e.g. ``not_frontal_cxr: Modality CT``.
"""

from __future__ import annotations

__all__ = ["REASON_PREFIX", "HEADER_FIELDS", "HeaderPolicy", "DEFAULT_POLICY", "check_header", "header_summary",
           "HeaderCheck", "inspect_source", "check_source"]

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .decode import _dicom_errors, _is_dicom, _read_dicom, read_file

REASON_PREFIX = "not_frontal_cxr"
HEADER_FIELDS = ("Modality", "BodyPartExamined", "ViewPosition", "NumberOfFrames", "ImageType",
                 "PhotometricInterpretation", "Rows", "Columns")
"""The header fields the check reads, and that results and pages may show beside a prediction."""
_BACKSLASH = "\\"


@dataclass(frozen=True)
class HeaderPolicy:
    """What a header must say for the image to be classified (upper-case DICOM values).

    An absent or empty BodyPartExamined or ViewPosition is accepted: many chest X-rays lack them.
    """

    modalities: frozenset[str] = frozenset({"CR", "DX", "DR"})
    body_parts: frozenset[str] = frozenset({"CHEST", "THORAX", "LUNG", "TORAX", "THORAX_CHEST"})
    lateral_views: frozenset[str] = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})
    derived_image_types: frozenset[str] = frozenset({"SECONDARY"})
    """Values of ImageType's second item that mean a derived screenshot rather than an acquisition."""
    allow_multiframe: bool = False


DEFAULT_POLICY = HeaderPolicy()


def check_header(ds: Any, policy: HeaderPolicy = DEFAULT_POLICY) -> list[str]:
    """Reasons (``not_frontal_cxr: ...``) why the header of ``ds`` (a pydicom Dataset) says the image is
    not a single-frame frontal chest radiograph; empty when nothing is wrong."""
    reasons = []
    modality = _text(ds, "Modality")
    if modality not in policy.modalities:
        reasons.append(f"Modality {modality or 'missing'}")
    body_part = _text(ds, "BodyPartExamined")
    if body_part and body_part not in policy.body_parts:
        reasons.append(f"BodyPartExamined {body_part}")
    view = _text(ds, "ViewPosition")
    if view in policy.lateral_views:
        reasons.append(f"ViewPosition {view} (lateral)")
    frames = _int(ds, "NumberOfFrames")
    if frames > 1 and not policy.allow_multiframe:
        reasons.append(f"NumberOfFrames {frames} (multi-frame)")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if len(image_type) > 1 and image_type[1] in policy.derived_image_types:
        reasons.append(f"ImageType {_BACKSLASH.join(image_type)} (derived screenshot)")
    return [f"{REASON_PREFIX}: {reason}" for reason in reasons]


def header_summary(ds: Any) -> dict[str, str]:
    """The :data:`HEADER_FIELDS` present in ``ds`` as text."""
    summary = {}
    for keyword in HEADER_FIELDS:
        value = ds.get(keyword)
        if value is not None and value != "":
            summary[keyword] = _BACKSLASH.join(map(str, value)) if keyword == "ImageType" else str(value)
    return summary


@dataclass(frozen=True)
class HeaderCheck:
    """What a DICOM header said: its :data:`HEADER_FIELDS` (shown beside a prediction) and the reasons
    (``not_frontal_cxr: ...``) to refer the image instead of trusting its classification."""

    fields: dict[str, str]
    reasons: tuple[str, ...]


def inspect_source(source: str | Path | bytes, policy: HeaderPolicy = DEFAULT_POLICY,
                   name: str | None = None) -> HeaderCheck | None:
    """:func:`check_header` and :func:`header_summary` of a DICOM file or its bytes, in one parse;
    ``None`` for any other image format.

    An unreadable DICOM raises :class:`~chestxray.errors.InputError` naming the file.
    """
    label = name or ("<upload>" if isinstance(source, bytes) else str(source))
    data = source if isinstance(source, bytes) else read_file(source)
    if not data or not _is_dicom(data, label):
        return None
    ds = _read_dicom(data, label, stop_before_pixels=True)
    with _dicom_errors(label):
        return HeaderCheck(header_summary(ds), tuple(check_header(ds, policy)))


def check_source(source: str | Path | bytes, policy: HeaderPolicy = DEFAULT_POLICY,
                 name: str | None = None) -> list[str]:
    """:func:`check_header` of a DICOM file or its bytes; ``[]`` for any other image format.

    An unreadable DICOM raises :class:`~chestxray.errors.InputError` naming the file.
    """
    found = inspect_source(source, policy, name)
    return [] if found is None else list(found.reasons)


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip().upper()


def _int(ds: Any, keyword: str) -> int:
    try:
        return int(ds.get(keyword) or 1)
    except (TypeError, ValueError):
        return 1

