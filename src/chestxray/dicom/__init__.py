"""The hospital's plumbing: DICOM SR results, DICOMweb, the DICOM node, worklists and the
per-inference log.

Each public name of the submodules is importable from here (``from chestxray.dicom import ...``) and
imported on first use, so that importing the subpackage stays light.

Not re-exported: ``listen`` (a submodule's name, or a name two
submodules define): import those from their module.
"""

from __future__ import annotations

from .. import _exports

_EXPORTS = {
    "dicomresult": ("NOTICE", "MANUFACTURER", "SCHEME", "CR_STORAGE", "DX_PRESENTATION_STORAGE",
            "DX_PROCESSING_STORAGE", "SECONDARY_CAPTURE_STORAGE", "ACCEPTED_CLASSES", "SR_SERIES_NUMBER",
            "CAM_SERIES_NUMBER", "PATIENT_KEYWORDS", "TITLE", "FINDING", "PROBABILITY", "REFERRAL", "REFER",
            "NO_REFER", "REASON", "OOD_PERCENTILE", "ALGORITHM_NAME", "ALGORITHM_VERSION", "ALGORITHM_PARAMETERS",
            "COMMENT", "SOURCE", "NOT_ASSESSED", "Assessment", "assessments_table", "read_dataset", "assess",
            "patient_fields", "result_uid", "build_sr", "build_cam_image", "read_sr"),
    "dicomweb": ("TIMEOUT_S", "StudyResult", "client", "retrieve_study", "assess_study", "store_reports"),
    "inferencelog": ("AUDIT_ENV", "PATIENT_FIELDS_ENV", "default_audit_path", "sha256_bytes", "local_caller",
            "AuditTrail", "audit_assessment", "audit_predictions", "audit_upload", "trail_from_environment"),
    "listen": ("SUCCESS", "SOP_CLASS_NOT_SUPPORTED", "OUT_OF_RESOURCES", "CANNOT_UNDERSTAND", "DEFAULT_AE_TITLE",
            "DEFAULT_PORT", "Destination", "ListenConfig", "SpoolFull", "Spool", "Listener"),
    "worklist": ("PATH_COLUMN", "STUDY_COLUMN", "WorklistResult", "read_worklist", "score_worklist",
            "audit_assessments"),
}
__all__, __getattr__, __dir__ = _exports(__name__, _EXPORTS)
