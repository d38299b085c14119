"""Networks and what carries them: architectures, runners (the numeric core of inference), Grad-CAM,
the bundle format and its model card.

Each public name of the submodules is importable from here (``from chestxray.model import ...``) and
imported on first use, so that importing the subpackage stays light.
"""

from __future__ import annotations

from .. import _exports

_EXPORTS = {
    "bundle": ("SCHEMA_VERSION", "BundleMeta", "BundleSchema", "save_bundle", "load_bundle", "read_meta",
            "weights_digest", "check_onnx", "verify_file", "record_file", "ChangedFileError", "WEIGHTS_FILE",
            "META_FILE", "ONNX_FILE", "INT8_ONNX_FILE", "ONNX_WEIGHTS_KEY", "ONNX_ARCH_KEY", "RECORDED_FILES",
            "HELD_OUT_FILE", "HeldOut", "save_held_out", "load_held_out"),
    "cam": ("explained_member", "target_layer", "gradcam", "overlay", "to_png"),
    "modelcard": ("CARD_FILE", "render_model_card"),
    "models": ("ChestXrayNet", "EnsembleNet", "logits_and_features", "list_models", "create_model",
            "read_state_file", "load_state_strict", "load_backbone_state", "TXRV_PREFIX", "TXRV_WEIGHTS",
            "txrv_weights_path", "txrv_input_size", "weights_source"),
    "runners": ("Runner", "TorchRunner", "OnnxRunner", "as_runner", "run_images", "DEFAULT_BATCH", "INPUT_NAME",
            "OUTPUT_NAMES", "PRECISION_KEY", "QUANTIZATION_KEY"),
}
__all__, __getattr__, __dir__ = _exports(__name__, _EXPORTS)
