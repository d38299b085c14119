"""Images and data sets: decoding, sources, the public data sets' adapters and their findings
vocabulary, the preprocessing cache, splits, the torch Dataset, the dataset audit and the DICOM
header check.

Each public name of the submodules is importable from here (``from chestxray.data import ...``) and
imported on first use, so that importing the subpackage stays light.

Not re-exported: ``audit`` (a submodule's name, or a name two
submodules define): import those from their module.
"""

from __future__ import annotations

from .. import _exports

_EXPORTS = {
    "audit": ("NEAR_DUPLICATE_MAX_DISTANCE", "AGAINST_SCOPE", "Spread", "ImageStats", "FileIssue", "DuplicatePair",
            "PatientOverlap", "ShortcutCheck", "AuditReport", "perceptual_hashes", "render_terminal"),
    "cache": ("ImageCache", "default_cache_dir", "fingerprint", "build_cache"),
    "dataset": ("CachedDataset", "EpochSampler", "epoch_seed", "to_model_input", "augment_batch", "photometric_batch",
                "mix_batch"),
    "decode": ("FIT_MODES", "CONTRASTS", "MAX_PIXELS", "MAX_FILE_BYTES", "IMAGE_SUFFIXES", "NPZ_SEPARATOR",
            "ImageInfo", "load_image", "decoding", "FitGeometry", "fit_geometry", "fit_square",
            "normalize_contrast", "Preprocessing", "preprocess", "probe_image", "content_hash", "is_image_file",
            "gray_array", "read_file", "read_capped", "find_images"),
    "hamming": ("Method", "close_pairs"),
    "dicomcheck": ("REASON_PREFIX", "HEADER_FIELDS", "HeaderPolicy", "DEFAULT_POLICY", "check_header",
            "header_summary", "HeaderCheck", "inspect_source", "check_source"),
    "sources": ("COLUMNS", "SPLIT_NAMES", "NO_FINDING", "Samples", "load_samples", "patient_id_from_name"),
    "splits": ("stratify_labels", "kfold_splits", "train_val_split", "save_split", "load_split"),
    "vocabulary": ("FINDINGS", "FORMATS", "PUBLIC_FORMATS", "UNCERTAIN_POLICIES", "VIEWS", "RATER_POLICIES", "MAPPINGS",
                   "SourceOptions", "label_mapping", "view_kind", "view_kept"),
    "public": ("PublicRows", "detect_format", "read_public"),
}
__all__, __getattr__, __dir__ = _exports(__name__, _EXPORTS)
