"""Evaluation: the three files, metrics equal to a direct computation, classes matched by name,
unreadable files counted, split selection, multi-label data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import xray_array
from factories import make_bundle
from PIL import Image

from chestxray.model.bundle import META_FILE
from chestxray.data.decode import preprocess
from chestxray.errors import ChestXrayError
from chestxray.inference.evaluation import evaluate, headline
from chestxray.stats.metrics import classification_metrics, multilabel_metrics
from chestxray.inference.predict import load_model

N_BOOT = 50


def assert_close(actual, expected, where: str = "metrics") -> None:
    """Nested dicts and lists of numbers equal up to float rounding."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{where}[{i}]")
    else:
        assert actual == pytest.approx(expected), where


def test_writes_three_files_with_the_direct_metrics(tmp_path: Path, make_folder) -> None:
    # the bundle lists its classes in another order than the data folder (alphabetical)
    bundle = make_bundle(tmp_path / "bundle", ["pneumonia", "normal"])
    data = make_folder({"train": {"normal": 2, "pneumonia": 2}, "test": {"normal": 5, "pneumonia": 5}})
    result = evaluate(bundle, data, tmp_path / "eval", n_boot=N_BOOT, cam_gallery=3, progress=False)
    assert {name: path.is_file() for name, path in result.files.items()} == dict.fromkeys(result.files, True)
    assert result.split == "test" and result.n_evaluated == 10 and not result.failed

    predictor = load_model(bundle)
    frame = pd.read_csv(result.files["predictions"], keep_default_na=False)
    images = np.stack([preprocess(f, predictor.image_size) for f in frame["file"]])
    probs, scores = predictor.predict_arrays(images)
    truth = frame["truth"].map(predictor.classes.index).to_numpy()
    expected = classification_metrics(truth, probs, predictor.classes, n_boot=N_BOOT)
    written = json.loads(result.files["metrics"].read_text())
    assert_close({key: written[key] for key in expected}, json.loads(json.dumps(expected)))
    assert written["n_ood"] == int((scores > predictor.guard.threshold).sum())
    assert list(frame.columns) == ["file", "truth", "prediction", "prediction_set", "refer", "header_check", "pneumonia",
                                   "normal", "ood", "ood_score", "ood_percentile", "error"]
    assert frame["truth"].tolist() == [Path(f).parent.name for f in frame["file"]]
    np.testing.assert_allclose(frame[["pneumonia", "normal"]].to_numpy(), probs, rtol=1e-6)

    page = result.files["report"].read_text()
    n_errors = int((frame["truth"] != frame["prediction"]).sum())
    assert ("Most confident errors" in page) == (n_errors > 0)
    assert "Trained on synthetic" in page
    assert "operating_points" not in written and "Operating points" not in page  # none in this bundle


def test_validation_operating_points_are_judged_on_the_evaluated_images(tmp_path: Path, make_folder) -> None:
    bundle = make_bundle(tmp_path / "bundle", ["pneumonia", "normal"])
    meta = json.loads((bundle / META_FILE).read_text())
    meta["operating_points"] = {"pneumonia": {"youden": 0.5, "sensitivity_95": 0.2}}
    (bundle / META_FILE).write_text(json.dumps(meta))
    data = make_folder({"test": {"normal": 5, "pneumonia": 5}})
    result = evaluate(bundle, data, tmp_path / "eval", n_boot=N_BOOT, cam_gallery=0, progress=False)
    frame = pd.read_csv(result.files["predictions"], keep_default_na=False)
    written = json.loads(result.files["metrics"].read_text())["operating_points"]["pneumonia"]
    is_pneumonia = frame["truth"] == "pneumonia"
    for point, threshold in (("youden", 0.5), ("sensitivity_95", 0.2)):
        called = frame["pneumonia"] >= threshold
        assert written[point]["sensitivity"] == pytest.approx(called[is_pneumonia].mean())
        assert written[point]["specificity"] == pytest.approx((~called[~is_pneumonia]).mean())
    assert "Operating points" in result.files["report"].read_text()
    lines = headline(result)
    assert any(line.startswith("accuracy") and "95% CI" in line for line in lines)
    at_80 = result.metrics["selective"]["at_coverage"]["80%"]
    assert f"80% most confident {100 * at_80['accuracy']:.1f}%" in next(l for l in lines if l.startswith("risk-coverage"))


def test_unknown_class_is_one_clear_error(tmp_path: Path, make_folder) -> None:
    bundle = make_bundle(tmp_path / "bundle", guard=False)
    data = make_folder({"normal": 2, "covid": 2})
    with pytest.raises(ChestXrayError, match="covid unknown to the model's classes"):
        evaluate(bundle, data, tmp_path / "eval", progress=False)


def test_unreadable_files_are_counted_and_the_rest_evaluated(tmp_path: Path, make_folder) -> None:
    bundle = make_bundle(tmp_path / "bundle", guard=False)
    data = make_folder({"normal": 3, "pneumonia": 3})
    broken = data / "normal" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n cut")
    result = evaluate(bundle, data, tmp_path / "eval", n_boot=N_BOOT, cam_gallery=0, progress=False)
    assert result.split == "all" and result.n_evaluated == 6
    assert [f for f, _ in result.failed] == [str(broken)]
    written = json.loads(result.files["metrics"].read_text())
    assert written["n_failed"] == 1 and written["failed"][0]["file"] == str(broken) and written["n"] == 6
    frame = pd.read_csv(result.files["predictions"], keep_default_na=False)
    assert frame.loc[frame["file"] == str(broken), "error"].item() != ""
    assert (frame.loc[frame["file"] != str(broken), "error"] == "").all()
    with pytest.raises(ChestXrayError, match="no images in the 'val' split"):
        evaluate(bundle, data, tmp_path / "eval", split="val", progress=False, overwrite=True)
    with pytest.raises(ChestXrayError, match="already holds an evaluation .*--overwrite"):
        evaluate(bundle, data, tmp_path / "eval", progress=False)  # never silently replaced
    assert json.loads(result.files["metrics"].read_text()) == written


def test_multilabel_data(tmp_path: Path) -> None:
    classes = ["Effusion", "Mass", "Nodule"]
    bundle = make_bundle(tmp_path / "bundle", classes, task="multilabel")
    labels = ["Effusion|Mass", "No Finding", "Nodule", "Mass", "Effusion", "Mass|Nodule", "No Finding", "Effusion"]
    rows = []
    for i, label in enumerate(labels):
        Image.fromarray(xray_array(seed=i)).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": label})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    result = evaluate(bundle, tmp_path / "labels.csv", tmp_path / "eval", n_boot=N_BOOT, cam_gallery=2, progress=False)
    frame = pd.read_csv(result.files["predictions"], keep_default_na=False)
    truth = np.array([[c in label.split("|") for c in classes] for label in labels], float)
    expected = multilabel_metrics(truth, frame[classes].to_numpy(), classes, n_boot=N_BOOT)
    assert result.metrics["mean_auc"] == pytest.approx(expected["mean_auc"])
    assert frame["truth"].tolist()[1] == "No Finding"
    assert any(line.startswith("mean ROC-AUC") for line in headline(result))


class Killed(Exception):
    """Stands for a run killed half-way."""


def test_an_interrupted_evaluation_is_replaced_and_a_complete_one_protected(tmp_path: Path, make_folder,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import chestxray.inference.evaluation as evaluation

    bundle = make_bundle(tmp_path / "bundle", guard=False)
    data = make_folder({"normal": 3, "pneumonia": 3})
    out = tmp_path / "eval"
    real_report = evaluation.write_report

    def killed(*args, **kwargs):
        raise Killed  # the machine went down while the report was written

    monkeypatch.setattr(evaluation, "write_report", killed)
    with pytest.raises(Killed):
        evaluate(bundle, data, out, n_boot=N_BOOT, cam_gallery=0, progress=False)
    assert (out / "metrics.json").is_file() and not (out / "report.html").exists()
    monkeypatch.setattr(evaluation, "write_report", real_report)
    result = evaluate(bundle, data, out, n_boot=N_BOOT, cam_gallery=0, progress=False)  # no --overwrite needed
    assert all(path.is_file() for path in result.files.values())
    assert any("incomplete evaluation" in w for w in result.warnings)
    assert any("incomplete evaluation" in line for line in headline(result))
    with pytest.raises(ChestXrayError, match="already holds an evaluation"):
        evaluate(bundle, data, out, n_boot=N_BOOT, cam_gallery=0, progress=False)  # complete: still protected
    monkeypatch.setattr(evaluation, "write_report", killed)
    with pytest.raises(Killed):  # an --overwrite killed half-way leaves no old report beside new metrics
        evaluate(bundle, data, out, n_boot=N_BOOT, cam_gallery=0, progress=False, overwrite=True)
    assert not (out / "report.html").exists()
