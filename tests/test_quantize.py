"""Tests for chestxray.quantize: an INT8 export of a tiny model that passes parity on real-looking
images, one whose quantization breaks it (an outlier activation channel) and is refused, what the
file records, and the onnx-int8 backend in predict and serve."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from chestxray.model.bundle import INT8_ONNX_FILE, load_bundle, save_bundle
from chestxray.cli import app
from chestxray.errors import ChestXrayError
from chestxray.inference.predict import load_model
from chestxray.model.runners import OnnxRunner
from chestxray.deploy.quantize import QuantizeResult, quantize_bundle
from chestxray.serving.serve import background_server, create_app
from conftest import xray_array
from factories import BINARY_CLASSES, make_bundle, png_bytes


pytestmark = pytest.mark.slow  # trains, exports and quantizes a model (module fixture), then runs INT8 graphs

def write_images(root: Path, n: int = 64) -> Path:
    """``n`` varied synthetic X-rays in class folders under ``root/train`` (the second class brighter
    and with more contrast), plus an unreadable file in ``root/test`` that calibration must never read."""
    rng = np.random.default_rng(0)
    for i in range(n):
        gain, offset = (rng.uniform(0.4, 0.8), rng.uniform(-50, -10)) if i % 2 == 0 else \
            (rng.uniform(1.0, 1.4), rng.uniform(10, 50))
        image = xray_array(72, 60, seed=i).astype(np.float32) * gain + offset
        image += rng.normal(0, rng.uniform(2, 20), image.shape)
        folder = root / "train" / BINARY_CLASSES[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"img{i}.png")
    (root / "test" / "normal").mkdir(parents=True)
    (root / "test" / "normal" / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("xrays"))


def trained_bundle(directory: Path, images: Path) -> Path:
    """A tiny bundle whose head is fitted (logistic regression on its features) to tell the two
    classes of :func:`write_images` apart with a margin, as a trained model does."""
    from sklearn.linear_model import LogisticRegression

    bundle = make_bundle(directory)
    model, meta = load_bundle(bundle)
    predictor = load_model(bundle)
    files = sorted((images / "train").rglob("*.png"))
    squares = np.stack([predictor.prepare(f) for f in files])
    _, features = predictor.runner(squares[:, None].astype(np.float32) / 255.0)
    y = np.array([BINARY_CLASSES.index(f.parent.name) for f in files])
    fit = LogisticRegression(C=10.0, max_iter=2000).fit(features, y)
    head = model.backbone.get_classifier()
    with torch.no_grad():
        weight = torch.from_numpy(fit.coef_[0]).float() / 2
        head.weight.copy_(torch.stack([-weight, weight]))
        head.bias.copy_(torch.tensor([-fit.intercept_[0] / 2, fit.intercept_[0] / 2]))
    return save_bundle(bundle, model, meta)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory, images: Path) -> QuantizeResult:
    bundle = trained_bundle(tmp_path_factory.mktemp("bundle") / "b", images)
    # module-scoped: runs before the per-test cache folder exists, so it gets its own
    return quantize_bundle(bundle, images, n_calibration=24, cache_dir=tmp_path_factory.mktemp("cache"))


def fp32_labels(bundle: Path, folder: Path) -> list[str]:
    files = sorted(str(f) for f in folder.rglob("*.png"))
    return [p.label for p in load_model(bundle).predict(files)]


def test_int8_export_passes_parity_and_records_what_it_is(quantized: QuantizeResult, images: Path) -> None:
    assert quantized.path.name == INT8_ONNX_FILE and quantized.path.is_file()
    assert not list(quantized.path.parent.glob("*.partial"))
    parity = quantized.parity
    assert quantized.n_calibration == 24 and parity.n_images == 64 - 24  # the other training images
    assert parity.label_agreement >= 0.99 and 0 < parity.max_prob_diff < 0.2
    assert parity.ood_flag_agreement is not None
    assert not quantized.skipped  # the broken file of the test split was never read
    assert len(set(fp32_labels(quantized.path.parent, images / "train"))) == 2  # labels vary: a real check
    runner = OnnxRunner(quantized.path)
    record = runner.quantization
    assert runner.backend == "onnx-int8" and record["format"] == "QDQ"
    assert record["calibration"]["images"] == 24 and record["parity"]["n_images"] == 40
    assert record["per_channel"] is True and record["reduce_range"] is True
    assert quantized.size_bytes < (quantized.path.parent / "model.safetensors").stat().st_size


def test_int8_graph_is_quantized(quantized: QuantizeResult) -> None:
    import onnx

    ops = {node.op_type for node in onnx.load(str(quantized.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_a_model_broken_by_quantization_is_refused(quantized: QuantizeResult, tmp_path: Path, images: Path) -> None:
    """One feature channel far larger than the others (but unused by the classifier) stretches the
    per-tensor activation range so much that 8 bits erase the channels that decide the label."""
    bundle = trained_bundle(tmp_path / "b", images)
    model, meta = load_bundle(bundle)
    with torch.no_grad():
        model.backbone.bn2.bias[0] = 2000.0
        model.backbone.get_classifier().weight[:, 0] = 0.0
    save_bundle(bundle, model, meta)
    assert len(set(fp32_labels(bundle, images / "train"))) == 2  # FP32 still tells the images apart
    previous = shutil.copy(quantized.path, bundle / INT8_ONNX_FILE)  # an earlier export, to be kept
    with pytest.raises(ChestXrayError, match=r"INT8 model refused: .* agree .* on \d+\.\d% of 40 real X-rays "
                                             r"\(needs 99%\); largest probability difference 0\.\d+"):
        quantize_bundle(bundle, images, n_calibration=24)
    assert Path(previous).read_bytes() == quantized.path.read_bytes()
    assert not list(bundle.glob("*.partial"))
    with pytest.raises(ChestXrayError, match="refused"):  # elsewhere: nothing written either
        quantize_bundle(bundle, images, tmp_path / "out" / "m.onnx", n_calibration=24)
    assert not (tmp_path / "out" / "m.onnx").exists()


def test_the_int8_backend_predicts_like_torch(quantized: QuantizeResult) -> None:
    bundle = quantized.path.parent
    inputs = [png_bytes(seed=seed) for seed in range(4)]
    int8 = load_model(bundle, backend="onnx-int8")
    assert isinstance(int8.runner, OnnxRunner) and int8.backend == "onnx-int8"
    for ours, reference in zip(int8.predict(inputs), load_model(bundle).predict(inputs)):
        assert ours.label == reference.label
        assert ours.probabilities == pytest.approx(reference.probabilities, abs=0.2)
    shown = CliRunner().invoke(app, ["predict", str(bundle), str(bundle / "x.png"), "--backend", "onnx-int8"])
    assert shown.exit_code == 1 and "no such file" in shown.output  # the backend loads; the input is missing


def test_serve_runs_the_int8_model_and_says_so(quantized: QuantizeResult) -> None:
    app_ = create_app(load_model(quantized.path.parent, backend="onnx-int8"))
    with background_server(app_) as url, httpx.Client(base_url=url, timeout=60) as http:
        info = http.get("/v1/model").json()
        answer = http.post("/v1/predict", files={"file": ("a.png", png_bytes(), "image/png")})
    assert info["backend"] == "onnx-int8"
    assert info["quantization"]["parity"]["label_agreement"] == quantized.parity.label_agreement
    assert answer.status_code == 200 and answer.json()["label"] in BINARY_CLASSES


def test_a_stale_int8_model_is_refused(quantized: QuantizeResult, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(quantized.path.parent, tmp_path / "b"))
    model, meta = load_bundle(bundle)
    with torch.no_grad():
        model.backbone.get_classifier().bias.add_(1.0)
    save_bundle(bundle, model, meta)
    with pytest.raises(ChestXrayError, match="--quantize int8"):
        load_model(bundle, backend="onnx-int8")


def test_int8_requests_are_checked(quantized: QuantizeResult, images: Path, tmp_path: Path) -> None:
    bundle = str(quantized.path.parent)
    cases = {("--quantize", "int8"): "needs --calibration-data",
             ("--quantize", "int4", "--calibration-data", str(images)): "int4",
             ("--calibration-data", str(images)): "go with --quantize int8"}
    for flags, message in cases.items():
        result = CliRunner().invoke(app, ["export", bundle, *flags])
        assert result.exit_code != 0 and message in str(result.exception) + result.output
    only_test = tmp_path / "only-test" / "test" / "normal"
    only_test.mkdir(parents=True)
    (only_test / "a.png").write_bytes(png_bytes())
    with pytest.raises(ChestXrayError, match="every image is in the test split"):
        quantize_bundle(bundle, only_test.parents[1])
    with pytest.raises(ChestXrayError, match="no model.int8.onnx"):
        load_model(make_bundle(tmp_path / "fresh"), backend="onnx-int8")


def test_the_int8_graph_sha256_is_recorded_and_checked(quantized: QuantizeResult, tmp_path: Path) -> None:
    import json
    import shutil

    from chestxray.errors import ChestXrayError
    from chestxray.provenance import file_sha256

    files = json.loads((quantized.path.parent / "model.json").read_text())["files"]
    assert files[INT8_ONNX_FILE] == file_sha256(quantized.path) and "model.safetensors" in files
    bundle = Path(shutil.copytree(quantized.path.parent, tmp_path / "bundle"))
    assert load_model(bundle, backend="onnx-int8").backend == "onnx-int8"
    with open(bundle / INT8_ONNX_FILE, "ab") as handle:
        handle.write(b"\0")  # any change at all
    with pytest.raises(ChestXrayError, match=f"{INT8_ONNX_FILE}: sha256 .* differs"):
        load_model(bundle, backend="onnx-int8")
