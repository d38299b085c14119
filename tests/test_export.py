"""Tests for chestxray.export: ONNX parity with PyTorch, dynamic batch, both exporters, ensembles,
no file left behind by a failed check, stale exports refused, and the ONNX backend of load_model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from chestxray.model.bundle import BundleMeta, load_bundle, save_bundle
from chestxray.errors import ChestXrayError, InputError
from chestxray.deploy.export import PROB_TOLERANCE, ExportResult, export_onnx
from chestxray.model.models import EnsembleNet, create_model
from chestxray.inference.predict import load_model
from chestxray.model.runners import OUTPUT_NAMES, OnnxRunner, TorchRunner
from conftest import xray_array
from factories import CLASSES, IMAGE_SIZE, build_tiny_bundle

pytestmark = pytest.mark.slow  # every test here exports (or loads) ONNX graphs: tens of seconds


def float_batch(n: int, seed: int = 0) -> np.ndarray:
    """``n`` different synthetic X-rays as model input (n, 1, S, S) in [0, 1]."""
    squares = [xray_array(IMAGE_SIZE, IMAGE_SIZE, seed + i) for i in range(n)]
    return np.stack(squares)[:, None].astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    return export_onnx(build_tiny_bundle(tmp_path_factory.mktemp("bundle")))


def test_export_writes_a_checked_model_into_the_bundle(exported: ExportResult) -> None:
    assert exported.path.name == "model.onnx" and exported.path.is_file()
    assert exported.exporter == "dynamo" and exported.opset == 18
    assert exported.max_prob_diff < PROB_TOLERANCE and exported.n_images >= 3
    assert exported.batch_sizes == (1, exported.n_images)
    graph = onnx.load(str(exported.path)).graph
    assert [i.name for i in graph.input] == ["image"] and tuple(o.name for o in graph.output) == OUTPUT_NAMES
    assert not list(exported.path.parent.glob("*.data")) and not list(exported.path.parent.glob("*.partial"))


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_onnx_matches_torch_at_any_batch_size(exported: ExportResult, batch: int) -> None:
    model, meta = load_bundle(exported.path.parent)
    images = float_batch(batch, seed=10)
    logits, features = OnnxRunner(exported.path)(images)
    expected_logits, expected_features = TorchRunner(model)(images)
    assert logits.shape == (batch, len(CLASSES)) and features.shape == expected_features.shape
    assert np.abs(logits - expected_logits).max() < 1e-4 * max(1.0, np.abs(expected_logits).max())
    assert np.abs(features - expected_features).max() < 1e-3 * max(1.0, np.abs(expected_features).max())
    assert np.ptp(expected_logits) > 0.1  # logits spread: a real comparison, not of near-constants


def test_onnx_backend_predicts_like_torch(exported: ExportResult) -> None:
    images = [xray_array(120, 90, seed) for seed in range(3)]
    torch_predictions = load_model(exported.path.parent).predict(images)
    onnx_predictions = load_model(exported.path.parent, backend="onnx").predict(images)
    for ours, reference in zip(onnx_predictions, torch_predictions):
        assert ours.label == reference.label
        assert ours.probabilities == pytest.approx(reference.probabilities, abs=PROB_TOLERANCE)


def test_real_x_rays_join_the_parity_check(course_data: Path, tmp_path: Path) -> None:
    real = sorted((course_data / "test").rglob("*.jp*g"))[:2]
    result = export_onnx(build_tiny_bundle(tmp_path / "b"), opset=17, parity_images=real)
    assert result.n_images == 3 + len(real) and result.max_prob_diff < PROB_TOLERANCE
    assert result.exporter == "legacy" and result.opset == 17
    assert onnx.load(str(result.path)).opset_import[0].version == 17


def test_ensemble_exports_with_parity(tmp_path: Path) -> None:
    torch.manual_seed(1)
    members = [create_model("resnet18", num_classes=len(CLASSES), weights="none") for _ in range(2)]
    for member in members:
        torch.nn.init.normal_(member.backbone.get_classifier().weight, std=0.5)
    bundle = save_bundle(tmp_path / "ensemble", EnsembleNet(members).eval(),
                         BundleMeta(classes=CLASSES, image_size=IMAGE_SIZE))
    result = export_onnx(bundle, out=tmp_path / "elsewhere" / "ensemble.onnx", opset=17)
    assert result.path == tmp_path / "elsewhere" / "ensemble.onnx"
    _, features = OnnxRunner(result.path)(float_batch(2))
    member_features = members[0].features(torch.from_numpy(float_batch(2))).shape[1]
    assert features.shape == (2, 2 * member_features)  # both members' features side by side


def test_failed_parity_leaves_no_file_and_keeps_the_previous_export(exported: ExportResult, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = Path(shutil.copytree(exported.path.parent, tmp_path / "bundle"))
    before = (bundle / "model.onnx").read_bytes()
    run = OnnxRunner.__call__

    def drifting(self: OnnxRunner, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = run(self, images)
        return logits + np.linspace(0, 0.05, logits.shape[1], dtype=np.float32), features

    monkeypatch.setattr(OnnxRunner, "__call__", drifting)
    for target in (None, tmp_path / "fresh.onnx"):
        with pytest.raises(ChestXrayError, match="parity"):
            export_onnx(bundle, out=target, opset=17)
    assert (bundle / "model.onnx").read_bytes() == before
    assert not (tmp_path / "fresh.onnx").exists()
    assert not list(tmp_path.rglob("*.partial"))


def test_stale_export_is_refused(exported: ExportResult, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(exported.path.parent, tmp_path / "bundle"))
    assert load_model(bundle, backend="onnx").runner.metadata["chestxray.classes"] == ",".join(CLASSES)
    model, meta = load_bundle(bundle)
    with torch.no_grad():
        model.backbone.get_classifier().bias.add_(1.0)
    save_bundle(bundle, model, meta)  # retrained into the same folder; model.onnx is now stale
    with pytest.raises(InputError, match="export it again"):
        load_model(bundle, backend="onnx")


def test_bad_requests_are_clear_errors(exported: ExportResult, tmp_path: Path) -> None:
    with pytest.raises(ChestXrayError, match="opset 11 is too old"):
        export_onnx(exported.path.parent, out=tmp_path / "x.onnx", opset=11)
    with pytest.raises(InputError, match="not found"):
        OnnxRunner(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(InputError, match="not a loadable ONNX model"):
        OnnxRunner(tmp_path / "junk.onnx")


def test_auto_backend_takes_onnx_when_the_bundle_has_it(exported: ExportResult, tmp_path: Path) -> None:
    assert load_model(exported.path.parent, backend="auto").backend == "onnx"
    plain = Path(shutil.copytree(exported.path.parent, tmp_path / "plain"))
    (plain / "model.onnx").unlink()
    assert load_model(plain, backend="auto").backend == "torch"


def test_auto_backend_falls_back_to_torch_on_a_stale_export(exported: ExportResult, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    bundle = Path(shutil.copytree(exported.path.parent, tmp_path / "bundle"))
    model, meta = load_bundle(bundle)
    with torch.no_grad():
        model.backbone.get_classifier().bias.add_(1.0)
    save_bundle(bundle, model, meta)
    assert load_model(bundle, backend="auto").backend == "torch"
    assert "export it again" in caplog.text and "using the torch backend" in caplog.text


def test_onnx_prediction_never_imports_torch(exported: ExportResult, tmp_path: Path) -> None:
    """The ONNX path is what makes `chestxray predict` start fast: torch, timm and scikit-learn stay unloaded."""
    image = tmp_path / "x.png"
    Image.fromarray(xray_array(60, 80)).save(image)
    code = ("import sys; from chestxray.predict import load_model, predict_paths; "
            f"p = load_model({str(exported.path.parent)!r}, backend='auto'); "
            f"table = predict_paths(p, [{str(image)!r}], progress=False); "
            "assert p.backend == 'onnx' and table['error'].isna().all(), table; "
            "print(sorted(m for m in ('torch', 'timm', 'sklearn', 'lightning') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def _swap_in_another_graph(bundle: Path, name: str = "model.onnx") -> None:
    """Replace the bundle's graph by another model's (other classifier weights) that carries the
    original's metadata, weights digest included: what only the recorded sha256 can tell apart."""
    proto = onnx.load(str(bundle / name))
    for tensor in proto.graph.initializer:
        if len(tensor.dims) == 2 and tensor.dims[0] == len(CLASSES) and tensor.data_type == onnx.TensorProto.FLOAT:
            values = onnx.numpy_helper.to_array(tensor)
            values = values + np.random.default_rng(0).normal(0, 1, values.shape).astype(np.float32)
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
            break
    else:
        raise AssertionError("no classifier weights in the graph")
    onnx.save(proto, str(bundle / name))


def test_export_records_the_graph_sha256_in_model_json(exported: ExportResult) -> None:
    from chestxray.provenance import file_sha256

    files = json.loads((exported.path.parent / "model.json").read_text())["files"]
    assert files == {"model.safetensors": file_sha256(exported.path.parent / "model.safetensors"),
                     "model.onnx": file_sha256(exported.path)}


@pytest.mark.parametrize("backend", ["onnx", "auto", "onnx-int8"])
def test_a_swapped_graph_is_refused_whatever_the_backend(exported: ExportResult, tmp_path: Path,
                                                         backend: str) -> None:
    bundle = Path(shutil.copytree(exported.path.parent, tmp_path / "bundle"))
    name = "model.int8.onnx" if backend == "onnx-int8" else "model.onnx"
    if backend == "onnx-int8":  # stands for a quantized graph: recorded the way quantize_bundle records it
        shutil.copyfile(bundle / "model.onnx", bundle / name)
        from chestxray.model.bundle import record_file
        record_file(bundle, name)
    assert load_model(bundle, backend=backend).backend.startswith("onnx")  # loads before the swap
    _swap_in_another_graph(bundle, name)
    swapped, original = OnnxRunner(bundle / name), OnnxRunner(exported.path)
    assert swapped.metadata == original.metadata  # the metadata alone cannot tell
    assert not np.allclose(swapped(float_batch(2))[0], original(float_batch(2))[0])  # other predictions
    with pytest.raises(ChestXrayError, match="sha256") as raised:
        load_model(bundle, backend=backend)
    assert type(raised.value).__name__ == "ChangedFileError"  # auto does not fall back to torch on it
    message = str(raised.value)
    assert message.startswith(str(bundle / name)) and "sha256" in message and "\n" not in message


def test_a_bundle_from_before_the_hashes_loads_and_keeps_its_older_checks(exported: ExportResult,
                                                                          tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(exported.path.parent, tmp_path / "bundle"))
    data = json.loads((bundle / "model.json").read_text())
    del data["files"]
    (bundle / "model.json").write_text(json.dumps(data))
    assert load_model(bundle, backend="onnx").backend == "onnx"
    assert load_model(bundle, backend="torch").backend == "torch"
    model, meta = load_bundle(bundle)
    with torch.no_grad():
        model.backbone.get_classifier().bias.add_(1.0)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, bundle / "model.safetensors")
    with pytest.raises(InputError, match="model.safetensors: sha256 .* differs"):  # provenance still holds
        load_model(bundle, backend="torch")
    with pytest.raises(InputError, match="exported from other weights"):
        load_model(bundle, backend="onnx")


def test_a_graph_the_bundle_never_recorded_is_refused_and_auto_falls_back(exported: ExportResult, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    bundle = Path(shutil.copytree(exported.path.parent, tmp_path / "bundle"))
    data = json.loads((bundle / "model.json").read_text())
    del data["files"]["model.onnx"]
    (bundle / "model.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="model.onnx: not recorded in model.json.*export it again"):
        load_model(bundle, backend="onnx")
    assert load_model(bundle, backend="auto").backend == "torch" and "using the torch backend" in caplog.text


def test_arch_is_checked_on_the_onnx_path(exported: ExportResult, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(exported.path.parent, tmp_path / "bundle"))
    data = json.loads((bundle / "model.json").read_text())
    (bundle / "model.json").write_text(json.dumps({**data, "arch": "resnet50"}))  # a registry name, not the graph's
    with pytest.raises(ChestXrayError, match="model.onnx: the graph is a resnet18 but model.json declares arch 'resnet50'"):
        load_model(bundle, backend="onnx")
    with pytest.raises(ChestXrayError, match="weights do not match the resnet50"):  # auto: then torch refuses too
        load_model(bundle, backend="auto")


@pytest.mark.parametrize("backend", ["auto", "onnx", "torch"])
def test_an_arch_that_is_no_registry_name_is_refused_by_every_backend(exported: ExportResult, tmp_path: Path,
                                                                      capsys, monkeypatch, backend: str) -> None:
    from test_cli import run_main

    bundle = Path(shutil.copytree(exported.path.parent, tmp_path / "bundle"))
    data = json.loads((bundle / "model.json").read_text())
    (bundle / "model.json").write_text(json.dumps({**data, "arch": "../../../../etc/passwd"}))
    image = tmp_path / "x.png"
    Image.fromarray(xray_array(60, 80)).save(image)
    code, err = run_main(monkeypatch, capsys, "predict", str(bundle), str(image), "--backend", backend, "--no-audit")
    assert code != 0 and "arch" in err and "not a model registry name" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
