"""A bundle exported: ONNX with a parity check, INT8 quantization.

Each public name of the submodules is importable from here (``from chestxray.deploy import ...``) and
imported on first use, so that importing the subpackage stays light.
"""

from __future__ import annotations

from .. import _exports

_EXPORTS = {
    "export": ("PARITY_IMAGES", "export_onnx", "ExportResult", "quiet_tools", "DEFAULT_OPSET", "MIN_OPSET",
            "PROB_TOLERANCE", "FEATURE_TOLERANCE"),
    "quantize": ("MIN_AGREEMENT", "DEFAULT_CALIBRATION_IMAGES", "DEFAULT_PARITY_IMAGES", "MIN_CALIBRATION_IMAGES",
            "MIN_PARITY_IMAGES", "CALIBRATION_BATCH", "QuantSettings", "Parity", "QuantizeResult",
            "quantize_bundle", "check_parity", "FP32_PARTS", "fp32_nodes"),
}
__all__, __getattr__, __dir__ = _exports(__name__, _EXPORTS)
