"""Numbers on numpy arrays: metrics and their intervals, logit transforms, conformal prediction sets,
the out-of-distribution guard. No torch.

Each public name of the submodules is importable from here (``from chestxray.stats import ...``) and
imported on first use, so that importing the subpackage stays light.
"""

from __future__ import annotations

from .. import _exports

_EXPORTS = {
    "conformal": ("SCORES", "DEFAULT_SCORE", "DEFAULT_COVERAGE", "RAPS_LAMBDA", "RAPS_K", "nonconformity",
            "ConformalSets", "check_coverage", "fit_conformal", "min_calibration_images", "set_metrics"),
    "logit_transform": ("KINDS", "TRAIN_KINDS", "SCALE_RANGE", "BIAS_RANGE", "DEFAULT_FOLDS", "ABSENT_LOGIT",
            "LogitTransform", "TransformChoice", "per_image_nll", "fit_logit_transform", "fold_indices",
            "choose_logit_transform"),
    "metrics": ("json_number", "json_safe", "bootstrap_ci", "classification_metrics", "multilabel_metrics",
            "interval_text", "accuracy_interval_text", "reliability_curve", "expected_calibration_error",
            "LogitScores", "logit_scores", "logits_to_probs", "fit_temperature", "positives_matrix",
            "operating_points", "at_operating_points", "proportion_interval", "risk_coverage",
            "accuracy_at_coverage", "accuracy_at_coverages", "COVERAGE_LEVELS"),
    "ood": ("power_normalise", "OODGuard", "cross_fitted_scores", "typicality"),
}
__all__, __getattr__, __dir__ = _exports(__name__, _EXPORTS)
