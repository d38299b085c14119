"""Runners: the numeric core of inference, shared by training-time scoring, prediction, evaluation,
export and serving.

A *runner* is a callable taking float images ``(N, 1, S, S)`` in [0, 1] and returning
``(logits (N, C), features (N, F))`` as numpy arrays (ARCHITECTURE.md, inference contract).
:class:`TorchRunner` runs a PyTorch model, :class:`OnnxRunner` an onnxruntime session of the
exported graph. :func:`run_images` feeds a runner uint8 squares ``(N, S, S)`` in batches: the one
path from cached or decoded images to model outputs. Runners hold no per-call state, so one
runner may serve several threads.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import SCORING_BATCH
from ..errors import InputError, first_line

if TYPE_CHECKING:  # torch is imported only by the torch runner: the ONNX path runs without it
    import torch

    from .models import ChestXrayNet, EnsembleNet

__all__ = ["Runner", "TorchRunner", "OnnxRunner", "as_runner", "run_images", "DEFAULT_BATCH", "INPUT_NAME",
           "OUTPUT_NAMES", "PRECISION_KEY", "QUANTIZATION_KEY"]

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
DEFAULT_BATCH = SCORING_BATCH
"""Images per runner call wherever a set of images is scored (:data:`chestxray.constants.SCORING_BATCH`)."""
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "features")
"""The input and output names of the ONNX graph."""
PRECISION_KEY = "chestxray.precision"
"""ONNX metadata entry: ``int8`` in a model quantized by ``quantize.py``; absent in an FP32 one."""
QUANTIZATION_KEY = "chestxray.quantization"
"""ONNX metadata entry: JSON of a quantized model's settings, calibration data and parity figures."""


class TorchRunner:
    """The PyTorch runner: float images (N, 1, S, S) in [0, 1] -> (logits, features) numpy arrays.

    The model is put in eval mode and in the channels-last memory layout (about 1.5x the CPU
    throughput at batch 16, Lite0 at 224 px), so every inference runs the same convolutions.
    """

    backend = "torch"

    def __init__(self, model: ChestXrayNet | EnsembleNet) -> None:
        import torch

        self.model = model.eval().to(memory_format=torch.channels_last)
        self.device = next(model.parameters()).device

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from .models import logits_and_features

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
            logits, features = logits_and_features(self.model, x)
        return logits.float().cpu().numpy(), features.float().cpu().numpy()


class OnnxRunner:
    """An onnxruntime session as a runner: ``runner(images float32 (N, 1, S, S)) -> (logits, features)``.

    CUDA is used when onnxruntime offers it, else the CPU with ``threads`` intra-op threads (default:
    :func:`default_threads`). The session is read-only, so one runner may serve several threads.
    ``metadata`` holds the graph's custom metadata (see ``bundle.check_onnx``); an INT8 graph
    (``chestxray export --quantize int8``) runs the same way and says so in :attr:`backend`.
    """

    def __init__(self, onnx_path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise InputError(self.path, "ONNX model not found (create it with `chestxray export BUNDLE --format onnx`)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle workers sleep instead of spinning: spinning threads starve the decoding threads of a
        # server, and on a busy shared CPU spinning made batch-16 inference 2-3x slower (measured).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
        providers = [p for p in wanted if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for any bad file
            raise InputError(self.path, f"not a loadable ONNX model ({first_line(err)})") from None
        names = tuple(o.name for o in self.session.get_outputs())
        if names != OUTPUT_NAMES:
            raise InputError(self.path, f"ONNX outputs are {names}, expected {OUTPUT_NAMES}")
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        width = self.session.get_outputs()[0].shape[-1] if self.session.get_outputs()[0].shape else None
        self.n_outputs: int | None = width if isinstance(width, int) else None
        """Class scores per image the graph gives (``None``: not fixed in the graph)."""

    @property
    def backend(self) -> str:
        """``"onnx"``, or ``"onnx-int8"`` for a quantized graph."""
        return "onnx-int8" if self.metadata.get(PRECISION_KEY) == "int8" else "onnx"

    @property
    def quantization(self) -> dict[str, Any] | None:
        """How a quantized graph was made: settings, calibration data, parity figures (None: FP32)."""
        text = self.metadata.get(QUANTIZATION_KEY)
        return json.loads(text) if text else None

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, C) and features (N, F) for float images (N, 1, S, S) in [0, 1]."""
        logits, features = self.session.run(OUTPUT_NAMES, {INPUT_NAME: np.ascontiguousarray(images, np.float32)})
        return logits, features


def default_threads() -> int:
    """Compute threads for a runner: torch's setting when torch is loaded (so one setting governs both
    backends), else the cores this process may run on."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def as_runner(model: Runner | torch.nn.Module) -> Runner:
    """``model`` as a runner: a PyTorch module is wrapped in a :class:`TorchRunner`, a runner is returned as is."""
    torch = sys.modules.get("torch")  # without torch loaded, nothing can be a torch module
    return TorchRunner(model) if torch is not None and isinstance(model, torch.nn.Module) else model


def run_images(runner: Runner, images: np.ndarray, batch_size: int = DEFAULT_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """``(logits (N, C), features (N, F))`` of uint8 squares ``(N, S, S)``, in batches of ``batch_size``.

    The uint8 values are divided by 255 (the model's input contract). With no images the arrays
    are empty, ``(0, 0)``.
    """
    outputs = [runner(np.asarray(images[i:i + batch_size], dtype=np.float32)[:, None] / 255.0)
               for i in range(0, len(images), batch_size)]
    if not outputs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])
