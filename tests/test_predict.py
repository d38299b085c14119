"""Prediction: every input kind, errors per input, calibration, OOD, TTA, Grad-CAM, files and folders."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import xray_array
from factories import BINARY_CLASSES, SIZE, make_bundle, png_bytes
from scipy.special import softmax

from chestxray.model.bundle import BundleMeta
from chestxray.model.cam import LABELLED_MIN_SIDE
from chestxray.data.decode import fit_square, normalize_contrast
from chestxray.errors import ChestXrayError
from chestxray.model.models import EnsembleNet, create_model, logits_and_features
from chestxray.inference.predict import Prediction, Predictor, load_model, predict_paths, write_cams
from chestxray.data.sources import NO_FINDING


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle")


@pytest.fixture
def predictor(bundle: Path) -> Predictor:
    return load_model(bundle, device="cpu")


def fake_predictor(logits: np.ndarray, task: str = "multiclass", temperature: float = 1.0) -> Predictor:
    """A predictor whose runner returns fixed logits, to check the arithmetic after the model."""
    meta = BundleMeta(classes=[f"c{i}" for i in range(logits.shape[1])], image_size=8, task=task,
                      temperature=temperature)
    return Predictor(lambda x: (logits[:len(x)], np.zeros((len(x), 4), np.float32)), meta)


def test_path_bytes_array_and_list_agree(predictor: Predictor, make_image) -> None:
    array = xray_array(48, 64, seed=3)
    path = make_image("chest.png", array)
    from_path = predictor.predict(path)
    from_bytes = predictor.predict(png_bytes(array))
    from_array = predictor.predict(array)
    from_rgb = predictor.predict(np.stack([array] * 3, -1))
    assert isinstance(from_path, Prediction) and from_path.file == str(path) and from_path.error is None
    assert from_bytes.file == "<upload>" and from_array.file == "<array>"
    for other in (from_bytes, from_array, from_rgb):
        assert other.probabilities == pytest.approx(from_path.probabilities, abs=1e-6)
    assert sum(from_path.probabilities.values()) == pytest.approx(1.0)
    assert from_path.label == max(from_path.probabilities, key=from_path.probabilities.get)
    batch = predictor.predict([array, path, png_bytes(xray_array(seed=9))], batch_size=2)
    assert [b.file for b in batch] == ["<array 0>", str(path), "<upload 2>"]
    assert batch[1].probabilities == pytest.approx(from_path.probabilities, abs=1e-6)
    assert predictor.predict(png_bytes(array), names="scan.png").file == "scan.png"


def test_the_bundles_preprocessing_is_repeated(make_image) -> None:
    meta = BundleMeta(classes=["a", "b"], image_size=16, preprocess={"mode": "crop", "contrast": "clahe"})
    predictor = Predictor(lambda x: (np.zeros((len(x), 2), np.float32), np.zeros((len(x), 4), np.float32)), meta)
    array = xray_array(48, 64, seed=3)
    expected = fit_square(normalize_contrast(array, "clahe"), 16, "crop")
    np.testing.assert_array_equal(predictor.prepare(array), expected)
    np.testing.assert_array_equal(predictor.prepare(make_image("chest.png", array)), expected)


def test_a_bad_input_in_a_list_leaves_the_others(predictor: Predictor, make_image, tmp_path: Path) -> None:
    good = make_image("good.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    results = predictor.predict([good, corrupt, np.zeros((4, 4), np.float32), tmp_path / "missing.png"])
    assert results[0].error is None and results[0].label in BINARY_CLASSES
    assert [r.error is not None for r in results] == [False, True, True, True]
    assert "uint8" in results[2].error and "no such file" in results[3].error
    assert results[1].probabilities == {} and results[1].label == "" and results[1].ood_score is None
    assert results[0].to_dict()["probabilities"] == {c: round(p, 4) for c, p in results[0].probabilities.items()}


def test_temperature_scales_the_logits() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], np.float32)
    images = np.zeros((2, 8, 8), np.uint8)
    cold, _ = fake_predictor(logits).predict_arrays(images)
    warm, _ = fake_predictor(logits, temperature=2.0).predict_arrays(images)
    np.testing.assert_allclose(warm, softmax(logits / 2.0, axis=1), rtol=1e-6)
    assert (warm.max(1) < cold.max(1)).all()


def test_multilabel_labels_and_sigmoid() -> None:
    logits = np.array([[3.0, -2.0, 1.0], [-3.0, -1.0, -0.5]], np.float32)
    predictor = fake_predictor(logits, task="multilabel")
    results = predictor.predict([np.zeros((8, 8), np.uint8)] * 2)
    assert [r.label for r in results] == ["c0|c2", NO_FINDING]
    assert results[0].probabilities["c0"] == pytest.approx(1 / (1 + np.exp(-3.0)))
    assert not results[0].ood and results[0].ood_score is None  # no guard in this bundle


def test_one_pass_gives_the_models_logits_and_features() -> None:
    torch.manual_seed(0)
    single = create_model("test_efficientnet", 3, weights="none").eval()
    ensemble = EnsembleNet([create_model("test_efficientnet", 3, weights="none") for _ in range(2)]).eval()
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        for model in (single, ensemble):
            logits, features = logits_and_features(model, x)
            torch.testing.assert_close(logits, model(x))
            torch.testing.assert_close(features, model.features(x))


def test_ood_score_comes_from_the_guard(predictor: Predictor) -> None:
    images = np.stack([fit_square(xray_array(seed=s), SIZE) for s in (30, 31)] +
                      [np.full((SIZE, SIZE), 255, np.uint8)])
    _, scores = predictor.predict_arrays(images)
    with torch.no_grad():
        features = predictor.model.features(torch.from_numpy(images).float().div(255)[:, None]).numpy()
    np.testing.assert_allclose(scores, predictor.guard.score(features), rtol=1e-5)
    results = predictor.predict(list(images))
    assert [r.ood for r in results] == list(scores > predictor.guard.threshold)
    assert [r.ood_score for r in results] == pytest.approx(scores, rel=1e-5)
    assert [r.ood_percentile for r in results] == pytest.approx(predictor.guard.percentile(scores))
    assert results[2].ood_percentile > results[0].ood_percentile  # a blank square is less typical


def test_tta_averages_views_without_changing_the_ood_score(predictor: Predictor) -> None:
    images = np.stack([fit_square(xray_array(seed=s), SIZE) for s in range(3)])
    plain, plain_scores = predictor.predict_arrays(images)
    averaged, scores = predictor.predict_arrays(images, tta=True)
    np.testing.assert_allclose(averaged.sum(1), 1.0, rtol=1e-6)
    assert not np.allclose(averaged, plain)
    np.testing.assert_allclose(scores, plain_scores)
    one_by_one = np.concatenate([predictor.predict_arrays(images[i:i + 1], tta=True)[0] for i in range(3)])
    np.testing.assert_allclose(averaged, one_by_one, rtol=1e-5)


def test_gradcam_png_and_threads(predictor: Predictor, make_image) -> None:
    path = make_image("chest.png", xray_array(80, 80, seed=5))
    png = predictor.gradcam_png(path)
    rgb = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    side = max(SIZE, LABELLED_MIN_SIDE)  # the overlay, scaled up, with a title above and a colour bar beside
    assert rgb.shape[0] > side and rgb.shape[1] > side and rgb.shape[2] == 3
    assert predictor.gradcam_png(path, target="pneumonia") != predictor.gradcam_png(path, target=0)
    with pytest.raises(ChestXrayError, match="unknown class"):
        predictor.gradcam_png(path, target="covid")
    # predictions and explanations from many threads give the sequential answers; no hooks stay behind
    inputs = [xray_array(seed=s) for s in range(6)]
    expected = [predictor.predict(x).probabilities for x in inputs]
    with ThreadPoolExecutor(4) as pool:
        cams = list(pool.map(predictor.gradcam_png, inputs))
        got = [p.probabilities for p in pool.map(predictor.predict, inputs)]
    assert got == [pytest.approx(e, abs=1e-6) for e in expected]
    assert cams == [predictor.gradcam_png(x) for x in inputs]
    assert all(not m._forward_hooks for m in predictor.model.modules())


def test_backends(bundle: Path) -> None:
    with pytest.raises(ChestXrayError, match="model.onnx"):
        load_model(bundle, backend="onnx")
    with pytest.raises(ChestXrayError, match="unknown backend"):
        load_model(bundle, backend="tensorflow")
    assert load_model(bundle / "model.json").classes == BINARY_CLASSES
    no_torch = Predictor(load_model(bundle).runner, load_model(bundle).meta)
    with pytest.raises(ChestXrayError, match="torch backend"):
        no_torch.gradcam_png(xray_array())


def test_predict_paths_expands_folders_and_globs(predictor: Predictor, make_image, tmp_path: Path) -> None:
    for name in ("scans/a.png", "scans/deep/b.jpg", "scans/deep/c.png", "other/d.png"):
        make_image(name)
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other" / "e.png").write_bytes(b"broken")
    table = predict_paths(predictor, [tmp_path / "scans", str(tmp_path / "other" / "*.png"),
                                      tmp_path / "empty", tmp_path / "nope.png", str(tmp_path / "*.dcm")],
                          batch_size=2, progress=False)
    assert list(table.columns) == ["file", "label", "prediction_set", "refer", "reasons", "cautions",
                                   *BINARY_CLASSES, "ood", "ood_score", "ood_percentile", "header", "error",
                                   "model_id"]
    names = [Path(f).name for f in table["file"]]
    assert names == ["a.png", "b.jpg", "c.png", "d.png", "e.png", "empty", "nope.png", "*.dcm"]
    failed = table["error"].notna()
    assert failed.tolist() == [False] * 4 + [True] * 4
    assert table.loc[~failed, BINARY_CLASSES].sum(axis=1).to_numpy() == pytest.approx(1.0)


def test_write_cams_uses_safe_unique_names(predictor: Predictor, make_image, tmp_path: Path) -> None:
    make_image("in/one scan (1).png")
    make_image("in/sub/one scan (1).png")
    (tmp_path / "in" / "bad.png").write_bytes(b"broken")
    written = write_cams(predictor, [tmp_path / "in"], tmp_path / "cams", progress=False)
    assert sorted(p.name for p in written) == ["one_scan_1_2_cam.png", "one_scan_1_cam.png"]
    side = max(SIZE, LABELLED_MIN_SIDE)  # with a title above and a colour bar beside the overlay
    assert all(cv2.imread(str(p)).shape[0] > side and cv2.imread(str(p)).shape[1] > side for p in written)


def test_predict_reports_an_unreadable_subfolder_as_a_failed_row(tmp_path: Path, monkeypatch) -> None:
    from test_sources import _unreadable

    bundle = make_bundle(tmp_path / "bundle")
    folder = tmp_path / "in"
    (folder / "locked").mkdir(parents=True)
    (folder / "a.png").write_bytes(png_bytes(seed=1))
    (folder / "locked" / "b.png").write_bytes(png_bytes(seed=2))
    _unreadable(monkeypatch, folder / "locked")
    table = predict_paths(load_model(bundle), [folder], progress=False)
    assert table["file"].tolist() == [str(folder / "a.png"), str(folder / "locked")]
    assert table["error"].isna().tolist() == [True, False]
    assert table["error"].iloc[1] == "cannot read this folder (Permission denied)"


def test_one_serialised_form_of_a_prediction_lists_objects_and_rounded_figures() -> None:
    prediction = Prediction("a/b.dcm", "pneumonia", {"normal": 0.12345678, "pneumonia": 0.87654322}, False, 3.14159,
                            56.00000000000001, prediction_set=["pneumonia"], coverage=0.9,
                            reasons=["not_frontal_cxr: Modality CT"], refer=True,
                            cautions=["caution: x"], header={"Modality": "CT"}, model_id="m@1")
    data = prediction.to_dict()
    assert data["probabilities"] == {"normal": 0.1235, "pneumonia": 0.8765}
    assert data["ood_percentile"] == 56.0 and data["ood_score"] == 3.14
    assert data["prediction_set"] == ["pneumonia"] and data["header"] == {"Modality": "CT"}
    assert data["cautions"] == ["caution: x"] and data["reasons"] == ["not_frontal_cxr: Modality CT"]
    assert json.loads(json.dumps(data)) == data and "called" not in data
    assert prediction.header_reasons == ["not_frontal_cxr: Modality CT"]
    row = prediction.to_row()
    assert row["prediction_set"] == "pneumonia" and row["ood_percentile"] == 56.0 and row["normal"] == 0.1235
    assert json.loads(row["header"]) == {"Modality": "CT"} and row["cautions"] == "caution: x"
    unchecked = Prediction("x.png", "normal", {"normal": 1.0}, False, None)
    assert unchecked.to_dict()["prediction_set"] is None and unchecked.to_row()["prediction_set"] == "not checked"
    assert unchecked.to_dict()["header"] is None and unchecked.to_row()["header"] == ""
