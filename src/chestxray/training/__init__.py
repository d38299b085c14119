"""A bundle made: options, training, a look before training, cross-validation, sweeps and site adaptation.

Each public name of the submodules is importable from here (``from chestxray.training import ...``) and
imported on first use, so that importing the subpackage stays light.

Not re-exported: ``REPORT_FILE``, ``adapt``, ``adapt_backbone``, ``adapt_unlabeled``, ``sweep`` (a submodule's name, or a name two
submodules define): import those from their module.
"""

from __future__ import annotations

from .. import _exports

_EXPORTS = {
    "adapt": ("MODES", "MIN_PER_CLASS", "DEFAULT_FOLDS", "FINETUNE_DEFAULTS", "REPORT_HTML", "LocalSample",
            "Adaptation", "AdaptationResult", "model_outputs", "site_absent", "load_local", "local_transform",
            "site_coverage", "site_calibration", "recalibration", "finetune", "finetune_config", "cross_fitted",
            "compare", "site_lineage", "headline"),
    "adapt_backbone": ("BackboneAdaptation", "BACKBONE_LR", "BACKBONE_BETA"),
    "adapt_unlabeled": ("fit_unlabeled", "reference_held_out", "run_reference", "UnlabeledResult", "suggest_labels",
                        "site_images"),
    "config": ("Interval", "Choices", "option", "validate", "declared_options", "TrainConfig", "RuntimeSettings",
            "make_config", "load_config", "load_runtime", "save_config"),
    "cv": ("cross_validate", "CVResult", "SCORES"),
    "look": ("show_batch", "lr_find", "batch_inputs", "BatchView", "LRFindRun", "SPLITS"),
    "sweep": ("SweepResult", "PruneTrial", "DEFAULT_SPACE", "default_space", "load_space", "check_space", "suggest",
            "trials_table"),
    "train": ("fit", "train_model", "prepare_data", "run_directory", "calibrate_on_validation", "bundle_meta",
            "model_meta", "drop_test_copies", "warm_start_config", "pretrained_config", "initial_model", "build_module",
            "make_loaders", "training_inputs", "find_lr", "smoothed_losses", "suggest_lr",
            "PreparedData", "RunResult", "ClassifierModule", "LRSearch", "LRFinding", "MONITOR"),
}
__all__, __getattr__, __dir__ = _exports(__name__, _EXPORTS)
