"""A model's answer about a DICOM instance, as the PACS keeps it: header check, prediction and
referral (:func:`assess`), encoded as a Comprehensive SR in the source's study (:func:`build_sr`),
optionally with the Grad-CAM overlay as a Secondary Capture image (:func:`build_cam_image`), and read
back (:func:`read_sr`). ``docs/dicom-sr.md`` describes the SR content item by item.

UIDs of the results are derived from the source instance and the model id, so assessing the same
instance twice (a restart half-way) gives the same objects, never duplicates in the PACS.
"""

from __future__ import annotations

__all__ = ["NOTICE", "MANUFACTURER", "SCHEME", "CR_STORAGE", "DX_PRESENTATION_STORAGE", "DX_PROCESSING_STORAGE",
           "SECONDARY_CAPTURE_STORAGE", "ACCEPTED_CLASSES", "SR_SERIES_NUMBER", "CAM_SERIES_NUMBER", "PATIENT_KEYWORDS",
           "TITLE", "FINDING", "PROBABILITY", "REFERRAL", "REFER", "NO_REFER", "REASON", "OOD_PERCENTILE",
           "ALGORITHM_NAME", "ALGORITHM_VERSION", "ALGORITHM_PARAMETERS", "COMMENT", "SOURCE", "NOT_ASSESSED",
           "Assessment", "assessments_table", "read_dataset", "assess", "patient_fields", "result_uid", "build_sr",
           "build_cam_image", "read_sr"]

import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ..data.dicomcheck import DEFAULT_POLICY, check_header
from ..trust.referral import referral
from ..constants import SET_SEPARATOR
from ..errors import InputError
from ..stats.metrics import PERCENTILE_DECIMALS, PROBABILITY_DECIMALS, rounded

NOTICE = ("Not a diagnostic device: produced by a research model (chestxray). It has not been cleared for "
          "clinical use; a qualified reader must make every diagnostic decision.")
MANUFACTURER = "chestxray"
SCHEME = "99CHESTXRAY"
"""Private coding scheme (PS3.16: designators starting with 99) of the model's classes and items."""
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ACCEPTED_CLASSES = (CR_STORAGE, DX_PRESENTATION_STORAGE, DX_PROCESSING_STORAGE, SECONDARY_CAPTURE_STORAGE)
"""CR and DX storage, and Secondary Capture: de-identified and digitised X-rays often travel as SC
with Modality CR or DX. The header check still refers any instance whose Modality is not CR/DX/DR."""
SR_SERIES_NUMBER = 9901
CAM_SERIES_NUMBER = 9902
PATIENT_KEYWORDS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber")

# the content items' concept names (value, scheme, meaning); see docs/dicom-sr.md
TITLE = ("18748-4", "LN", "Diagnostic imaging report")
FINDING = ("121071", "DCM", "Finding")
PROBABILITY = "probability"
REFERRAL = ("referral", SCHEME, "Referral")
REFER = ("refer", SCHEME, "Refer: do not rely on this result")
NO_REFER = ("no-refer", SCHEME, "No referral")
REASON = ("referral-reason", SCHEME, "Referral reason")
OOD_PERCENTILE = ("ood-percentile", SCHEME, "Out-of-distribution percentile")
ALGORITHM_NAME = ("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = ("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = ("111002", "DCM", "Algorithm Parameters")
COMMENT = ("121106", "DCM", "Comment")
SOURCE = ("260753009", "SCT", "Source")
NOT_ASSESSED = "not assessed"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass
class Assessment:
    """What the model says about one instance. ``label`` is empty when it was not classified (the
    header check failed or the pixels could not be read); ``reasons`` then say why."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str
    label: str
    probabilities: dict[str, float]
    ood: bool
    ood_percentile: float | None
    refer: bool
    reasons: list[str]
    model_id: str
    weights_sha256: str
    header: list[str] = field(default_factory=list)
    error: str | None = None
    """Why the pixels could not be classified (``None``: they were, or the header check stopped them)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)

    def to_audit(self) -> dict[str, Any]:
        """The ``result`` of an inference-log line, as :meth:`Prediction.to_audit
        <chestxray.inference.predict.Prediction.to_audit>` words it (``label`` null when not classified)."""
        if not self.label:
            return {"label": None}
        return {"label": self.label,
                "probabilities": {c: rounded(p, PROBABILITY_DECIMALS) for c, p in self.probabilities.items()},
                "ood": self.ood, "ood_percentile": rounded(self.ood_percentile, PERCENTILE_DECIMALS)}


def assessments_table(assessments: list[Assessment], classes: list[str]) -> Any:
    """One row per assessment: the instance's UIDs and accession number, ``label``, each class's
    probability, ``ood``, ``ood_percentile``, ``refer``, ``reasons`` (joined by '; '), ``model_id``."""
    import pandas as pd

    rows = [{"study_instance_uid": a.study_instance_uid, "series_instance_uid": a.series_instance_uid,
             "sop_instance_uid": a.sop_instance_uid, "accession_number": a.accession_number, "label": a.label,
             **{c: rounded(a.probabilities.get(c), PROBABILITY_DECIMALS) for c in classes}, "ood": a.ood,
             "ood_percentile": rounded(a.ood_percentile, PERCENTILE_DECIMALS),
             "refer": a.refer, "reasons": "; ".join(a.reasons), "model_id": a.model_id} for a in assessments]
    return pd.DataFrame(rows, columns=["study_instance_uid", "series_instance_uid", "sop_instance_uid",
                                       "accession_number", "label", *classes, "ood", "ood_percentile", "refer",
                                       "reasons", "model_id"])


def read_dataset(data: bytes, name: str) -> Dataset:
    """A DICOM Part-10 file (or a bare dataset) parsed with its pixels; :class:`InputError` if it is not one."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as err:  # pydicom raises many types on broken input
        raise InputError(name, f"not a readable DICOM dataset ({' '.join(str(err).split()) or type(err).__name__})") \
            from None
    try:
        present = "SOPInstanceUID" in ds and "SOPClassUID" in ds
    except Exception:  # noqa: BLE001 - a broken element raises anything while the dataset is walked
        present = False
    if not present:  # random bytes parse (force=True) as a dataset of a few junk elements
        raise InputError(name, "not a readable DICOM dataset (no SOP Instance UID or SOP Class UID: junk, or not DICOM)")
    try:
        ds.SOPInstanceUID  # noqa: B018 - the value must decode
    except Exception as err:  # pydicom raises many types on broken input
        raise InputError(name, f"not a readable DICOM dataset ({' '.join(str(err).split()) or type(err).__name__})") \
            from None
    return ds


def check_instance(ds: Dataset, name: str) -> str:
    """The SOP Instance UID of a received instance that can be assessed; :class:`InputError` naming
    ``name`` for a bad UID, no image, or pixel data shorter than its header says (a truncated file).
    The one check ``listen`` (C-STORE) and DICOMweb apply before an instance is queued or assessed."""
    try:
        uid = str(ds.SOPInstanceUID)
        if not _UID.match(uid) or len(uid) > 64:
            raise InputError(name, f"invalid SOP Instance UID {uid[:80]!r}")
        if "PixelData" not in ds:
            raise InputError(name, f"{uid}: no pixel data")
        rows, columns = int(ds.Rows), int(ds.Columns)
        if rows <= 0 or columns <= 0:
            raise InputError(name, f"{uid}: invalid image size {columns}x{rows}")
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and not syntax.is_compressed:
            expected = rows * columns * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
            expected *= int(ds.get("NumberOfFrames", 1) or 1)
            if len(ds.PixelData) < expected:
                raise InputError(name, f"{uid}: truncated: pixel data is {len(ds.PixelData):,} bytes, "
                                       f"the header needs {expected:,}")
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom parses lazily: a broken element raises anything here
        raise InputError(name, f"not a readable DICOM dataset ({' '.join(str(err).split()) or type(err).__name__})") \
            from None
    return uid


def assess(predictor: Any, datasets: list[tuple[Dataset, bytes]]) -> list[Assessment]:
    """Header-check and predict DICOM instances (each a parsed dataset and its file bytes), in one batch.

    An instance whose header says it is not a frontal chest X-ray (under ``predictor.header_policy``;
    ``None``: no check) is not classified; it is referred with the reasons. So is one whose pixels
    cannot be decoded. One classified is referred for every reason its prediction gives (a conformal
    set of more or fewer than one class at ``predictor.coverage``, out of distribution).
    """
    policy = getattr(predictor, "header_policy", DEFAULT_POLICY)
    headers = [check_header(ds, policy) if policy is not None else [] for ds, _ in datasets]
    to_predict = [i for i, reasons in enumerate(headers) if not reasons]
    predictions = predictor.predict([datasets[i][1] for i in to_predict],
                                    names=[_name(datasets[i][0]) for i in to_predict]) if to_predict else []
    by_index = dict(zip(to_predict, predictions))
    meta = predictor.meta
    sha = meta.provenance.get("weights_sha256", "")
    results = []
    for i, (ds, _) in enumerate(datasets):
        prediction = by_index.get(i)
        label, probabilities, ood, percentile = "", {}, False, None
        if prediction is not None and not prediction.error:
            label, probabilities = prediction.label, prediction.probabilities
            ood, percentile = prediction.ood, prediction.ood_percentile
        refer, reasons = referral(prediction, headers[i])
        results.append(Assessment(
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")), study_instance_uid=str(ds.get("StudyInstanceUID", "")),
            series_instance_uid=str(ds.get("SeriesInstanceUID", "")), accession_number=str(ds.get("AccessionNumber", "")),
            label=label, probabilities=probabilities, ood=ood, ood_percentile=percentile, refer=refer,
            reasons=reasons, model_id=meta.model_id, weights_sha256=sha, header=headers[i],
            error=prediction.error if prediction is not None and prediction.error else None))
    return results



def patient_fields(ds: Dataset) -> dict[str, str]:
    """The patient-identifying fields of ``ds`` (for audit lines configured to keep them)."""
    return {k: str(ds.get(k)) for k in PATIENT_KEYWORDS if ds.get(k) not in (None, "")}


def result_uid(kind: str, source_uid: str, model_id: str) -> str:
    """A UID derived from what the result is about: the same inputs always give the same UID."""
    return generate_uid(entropy_srcs=[kind, source_uid, model_id])


def build_sr(source: Dataset, assessment: Assessment, *, algorithm: str) -> Dataset:
    """The Comprehensive SR of ``assessment`` in the study of ``source`` (see docs/dicom-sr.md)."""
    import highdicom as hd
    from highdicom.sr import CodeContentItem, ContainerContentItem, NumContentItem, TextContentItem
    from highdicom.sr import CodedConcept, ImageContentItem

    def code(triple: tuple[str, str, str]) -> CodedConcept:
        return CodedConcept(*triple)

    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[Any] = [
        ImageContentItem(code(SOURCE), source.SOPClassUID, source.SOPInstanceUID, relationship_type=contains)]
    if assessment.label:
        for name in assessment.label.split(SET_SEPARATOR):
            items.append(CodeContentItem(code(FINDING), CodedConcept(name, SCHEME, name), relationship_type=contains))
    else:
        items.append(TextContentItem(code(FINDING), NOT_ASSESSED, relationship_type=contains))
    for name, probability in assessment.probabilities.items():
        items.append(NumContentItem(CodedConcept(f"{PROBABILITY}:{name}", SCHEME, f"Probability of {name}"),
                                    float(probability), CodedConcept("1", "UCUM", "no units"),
                                    relationship_type=contains))
    if assessment.ood_percentile is not None:
        items.append(NumContentItem(code(OOD_PERCENTILE), float(assessment.ood_percentile),
                                    CodedConcept("%", "UCUM", "percent"), relationship_type=contains))
    items.append(CodeContentItem(code(REFERRAL), code(REFER if assessment.refer else NO_REFER),
                                 relationship_type=contains))
    items += [TextContentItem(code(REASON), reason[:1024], relationship_type=contains) for reason in assessment.reasons]
    items += [TextContentItem(code(ALGORITHM_NAME), algorithm, relationship_type=contains),
              TextContentItem(code(ALGORITHM_VERSION), assessment.model_id, relationship_type=contains),
              TextContentItem(code(ALGORITHM_PARAMETERS), f"weights_sha256={assessment.weights_sha256}",
                              relationship_type=contains),
              TextContentItem(code(COMMENT), NOTICE, relationship_type=contains)]
    root = ContainerContentItem(code(TITLE))
    root.ContentSequence = items
    with _quiet_about_source_names():
        return hd.sr.ComprehensiveSR(
            evidence=[_with_type2_fields(source)], content=root,
            series_instance_uid=result_uid("sr-series", source.get("SeriesInstanceUID", ""), assessment.model_id),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=result_uid("sr", source.SOPInstanceUID, assessment.model_id),
            instance_number=int(source.get("InstanceNumber") or 1), manufacturer=MANUFACTURER,
            is_complete=True, series_description=f"chestxray {assessment.model_id}"[:64])


def build_cam_image(source: Dataset, rgb: np.ndarray, model_id: str) -> Dataset:
    """The Grad-CAM overlay (H, W, 3 uint8 RGB) as a Secondary Capture image in a new series of the study."""
    import highdicom as hd

    orientation = tuple(str(v) for v in (source.get("PatientOrientation") or ("L", "F")))[:2]
    with _quiet_about_source_names():
        return hd.sc.SCImage.from_ref_dataset(
            ref_dataset=_with_type2_fields(source), pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8), photometric_interpretation="RGB",
            bits_allocated=8, coordinate_system="PATIENT", patient_orientation=orientation,
            series_instance_uid=result_uid("cam-series", source.get("SeriesInstanceUID", ""), model_id),
            series_number=CAM_SERIES_NUMBER, sop_instance_uid=result_uid("cam", source.SOPInstanceUID, model_id),
            instance_number=int(source.get("InstanceNumber") or 1), manufacturer=MANUFACTURER,
            series_description=f"chestxray Grad-CAM {model_id}"[:64])


def read_sr(ds: Dataset) -> dict[str, Any]:
    """The content of an SR written by :func:`build_sr` as a dict: ``source_sop_instance_uid, finding
    (list of class names, empty when not assessed), probabilities, ood_percentile, refer, reasons, model_id,
    weights_sha256, notice``."""
    out: dict[str, Any] = {"finding": [], "probabilities": {}, "reasons": [], "ood_percentile": None}
    for item in ds.ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        key = (name.get("CodeValue") or name.get("LongCodeValue"), name.CodingSchemeDesignator)
        if key == SOURCE[:2]:
            out["source_sop_instance_uid"] = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        elif key == FINDING[:2] and item.ValueType == "CODE":
            out["finding"].append(_code_value(item.ConceptCodeSequence[0]))
        elif key[1] == SCHEME and key[0].startswith(PROBABILITY + ":"):
            out["probabilities"][key[0].split(":", 1)[1]] = float(item.MeasuredValueSequence[0].NumericValue)
        elif key == OOD_PERCENTILE[:2]:
            out["ood_percentile"] = float(item.MeasuredValueSequence[0].NumericValue)
        elif key == REFERRAL[:2]:
            out["refer"] = _code_value(item.ConceptCodeSequence[0]) == REFER[0]
        elif key == REASON[:2]:
            out["reasons"].append(str(item.TextValue))
        elif key == ALGORITHM_VERSION[:2]:
            out["model_id"] = str(item.TextValue)
        elif key == ALGORITHM_PARAMETERS[:2]:
            out["weights_sha256"] = str(item.TextValue).partition("=")[2]
        elif key == COMMENT[:2]:
            out["notice"] = str(item.TextValue)
    return out


def _with_type2_fields(source: Dataset) -> Dataset:
    """The header of ``source`` with the patient and study fields a result copies present (empty when
    the source lacks them, as DICOM's type 2 allows), so that any source can be reported on."""
    header = Dataset()
    header.update({elem.tag: elem for elem in source if elem.tag != 0x7FE00010})
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if keyword not in header:
            setattr(header, keyword, "")
    return header


@contextmanager
def _quiet_about_source_names() -> Iterator[None]:
    """highdicom warns about the source's one-part patient names: the source's business, not ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        yield


def _code_value(code: Dataset) -> str:
    return str(code.get("CodeValue") or code.get("LongCodeValue"))


def _name(ds: Dataset) -> str:
    return f"SOPInstanceUID {ds.get('SOPInstanceUID', '?')}"
