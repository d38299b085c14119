"""What makes a prediction trustworthy: calibration fitted on held-out images, the referral rule,
lineage, the drift monitor and label-free site adaptation.

Each public name of the submodules is importable from here (``from chestxray.trust import ...``) and
imported on first use, so that importing the subpackage stays light.

Not re-exported: ``referral`` (a submodule's name): import it from :mod:`chestxray.trust.referral`.
"""

from __future__ import annotations

from .. import _exports

_EXPORTS = {
    "calibration": ("Calibration", "calibrate", "calibrate_outputs", "fit_guard", "MIN_GUARD_IMAGES"),
    "drift": ("DEFAULT_WINDOW", "MIN_WINDOW", "MEDIAN_PERCENTILE_LIMIT", "FLAGGED_SHARE_LIMIT",
            "SHARE_DISTANCE_LIMIT", "REFERRAL_EXCESS_LIMIT", "DriftMonitor"),
    "label_free": ("centroid_pseudo_labels", "SiteHead", "fit_site_head", "domain_weights", "label_free_summary",
            "choose_for_labelling", "choose_head_labels", "HEAD_C", "HEAD_CHOICE_FOLDS", "HEAD_CHOICE_REPEATS",
            "WEIGHT_RANGE"),
    "lineage": ("HASH_BITS", "HASH_NAME", "short_hash", "short_hashes", "encode_hashes", "decode_hashes",
            "seen_images_record", "merge_seen", "SeenCheck", "check_seen", "data_fingerprint", "describe_lineage",
            "lineage_record"),
    "referral": ("UNCERTAIN", "OUT_OF_DISTRIBUTION", "NOT_FRONTAL", "UNREADABLE", "KINDS", "reason_kind",
            "referral_reasons", "refer_mask"),
}
__all__, __getattr__, __dir__ = _exports(__name__, _EXPORTS)
