"""A bundle used: prediction, evaluation and the HTML report.

Each public name of the submodules is importable from here (``from chestxray.inference import ...``) and
imported on first use, so that importing the subpackage stays light.
"""

from __future__ import annotations

from .. import _exports

_EXPORTS = {
    "evaluation": ("EvaluationResult", "evaluate", "headline"),
    "predict": ("AUDITED", "Predictor", "Prediction", "PredictionRun", "load_model", "predict_files",
            "predict_paths", "predict_inputs", "predictions_table", "sharded_predict", "sharded_predictions",
            "call_operating_point", "expand_inputs", "apply_operating_point", "write_cams", "shard",
            "resolve_backend", "BACKENDS", "TTA_VIEWS"),
    "report": ("plot_training_curves", "plot_lr_find", "write_report"),
}
__all__, __getattr__, __dir__ = _exports(__name__, _EXPORTS)
