"""The values several modules must agree on, each written once.

- :data:`SET_SEPARATOR`: joins the classes of a multi-label label (NIH ChestX-ray14's "Finding Labels"),
  a prediction set and the classes called at an operating point, in CSV rows and tables;
- :data:`MULTILABEL_THRESHOLD`: a multi-label class is called when its probability is at least this
  (``>=`` everywhere: labels, metrics, the drift reference, the evaluation's error gallery);
- :data:`SCORING_BATCH`, :data:`LISTEN_BATCH`: images per model call;
- :data:`DEFAULT_BACKEND`: what the CLI, ``predict_files``, ``serve`` and ``listen`` run a bundle on;
- :data:`DEFAULT_IMAGE_SIZE`: the default training size, also the audit's cache size (so that a training
  run on the audited files reuses the audit's cache).
"""

from __future__ import annotations

__all__ = ["SET_SEPARATOR", "MULTILABEL_THRESHOLD", "SCORING_BATCH", "LISTEN_BATCH", "DEFAULT_BACKEND", "DEFAULT_IMAGE_SIZE"]

SET_SEPARATOR = "|"
MULTILABEL_THRESHOLD = 0.5
SCORING_BATCH = 16
"""Images per runner call wherever a set of images is scored (validation, calibration, evaluation,
prediction, a worklist, serve's micro-batches); bench/bench_scoring_batch.py measures the choice."""
LISTEN_BATCH = 8
"""Images the DICOM node assesses in one call (its value since the node was written; not measured)."""
DEFAULT_BACKEND = "auto"
"""ONNX when the bundle has ``model.onnx`` (parity-checked, its weights digest matching), else torch.
``load_model`` alone defaults to ``"torch"``: its callers may need the PyTorch model itself (Grad-CAM,
fine-tuning), which an ONNX predictor does not hold."""
DEFAULT_IMAGE_SIZE = 256
"""``TrainConfig.image_size``'s default, in pixels."""
