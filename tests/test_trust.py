"""When not to trust a prediction: conformal sets, referral with reasons (set size, OOD, DICOM header),
source-confound cautions, and the model card written from model.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import xray_array
from factories import BINARY_CLASSES, make_bundle

from chestxray.conformal import fit_conformal
from chestxray.dicomcheck import HeaderPolicy
from chestxray.modelcard import CARD_FILE
from chestxray.predict import NOT_CHECKED, load_model, predict_paths

CONFOUND = {"method": "test", "threshold": 0.8, "auc": {"normal": 0.55, "pneumonia": 0.97},
            "flagged": ["pneumonia"], "note": ""}


def sets_for(probs_first: float, coverage: float = 0.9) -> dict:
    """Conformal sets calibrated where the true class had probability about ``probs_first``: a class
    needs a probability above about that to be in a set."""
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 2
    p = np.clip(rng.normal(probs_first, 0.02, 200), 0, 1)
    probs = np.where(labels[:, None] == 0, np.stack([p, 1 - p], 1), np.stack([1 - p, p], 1))
    return fit_conformal(probs, labels, BINARY_CLASSES, coverage=coverage, fitted_on="test images").to_dict()


@pytest.fixture
def trusted(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle", conformal=sets_for(0.6), source_confound=CONFOUND)


def test_prediction_carries_its_set_and_refers_when_the_set_is_not_one_class(tmp_path):
    wide = load_model(make_bundle(tmp_path / "wide", conformal=sets_for(0.001)))  # everything plausible
    result = wide.predict(xray_array())
    assert result.prediction_set == BINARY_CLASSES and result.refer
    assert any(r.startswith("uncertain: the 90% prediction set holds normal, pneumonia") for r in result.reasons)
    strict = load_model(make_bundle(tmp_path / "strict", conformal=sets_for(0.99999)))  # nothing fits
    result = strict.predict(xray_array())
    assert result.prediction_set == [] and result.refer
    assert any("no class fits" in r for r in result.reasons)
    narrow = load_model(make_bundle(tmp_path / "narrow", conformal=sets_for(0.5)))
    results = narrow.predict([xray_array(seed=s) for s in range(6)])
    for r in results:
        assert r.label in r.prediction_set or not r.prediction_set
        assert r.refer == (len(r.prediction_set) != 1 or r.ood)


def test_without_conformal_sets_the_check_reads_not_checked(tmp_path):
    plain = load_model(make_bundle(tmp_path / "plain"))
    result = plain.predict(xray_array())
    assert result.prediction_set is None and result.header is None
    image = tmp_path / "x.png"
    from PIL import Image
    Image.fromarray(xray_array()).save(image)
    row = predict_paths(plain, [image], progress=False).iloc[0]
    assert row["prediction_set"] == NOT_CHECKED


def test_a_confounded_class_carries_the_caution(trusted):
    model = load_model(trusted)
    results = model.predict([xray_array(seed=s) for s in range(8)])
    for r in results:
        cautioned = bool(r.cautions)
        assert cautioned == (r.label == "pneumonia")
        if cautioned:
            assert "pneumonia training images" in r.cautions[0] and "0.97" in r.cautions[0]


@pytest.mark.parametrize("tags, reason", [
    ({"Modality": "CT"}, "not_frontal_cxr: Modality CT"),
    ({"ViewPosition": "LL"}, "not_frontal_cxr: ViewPosition LL (lateral)"),
    ({"NumberOfFrames": 2}, "not_frontal_cxr: NumberOfFrames 2 (multi-frame)"),
])
def test_a_dicom_header_that_is_not_a_frontal_chest_xray_is_referred_with_the_reason(trusted, make_dicom,
                                                                                     tags, reason):
    pixels = xray_array(64, 64)
    if tags.get("NumberOfFrames"):
        pixels_written = np.stack([pixels, pixels])
        path = make_dicom("multi.dcm", pixels, **tags)
        import pydicom
        ds = pydicom.dcmread(path)
        ds.PixelData = pixels_written.tobytes()
        ds.save_as(path)
    else:
        path = make_dicom("scan.dcm", pixels, **tags)
    model = load_model(trusted)
    result = model.predict(str(path))
    assert result.error is None and result.refer and reason in result.reasons
    assert result.header["Modality"] == tags.get("Modality", "CR")
    row = predict_paths(model, [path], progress=False).iloc[0]
    assert bool(row["refer"]) and reason in row["reasons"] and "Modality=" in row["header"]


def test_the_header_check_is_configurable_and_passes_a_frontal_dx(trusted, make_dicom):
    ct = make_dicom("ct.dcm", xray_array(64, 64), Modality="CT")
    allowing = load_model(trusted, header_policy=HeaderPolicy(modalities=frozenset({"CT"})))
    assert not any(r.startswith("not_frontal_cxr") for r in allowing.predict(str(ct)).reasons)
    off = load_model(trusted, header_policy=None)
    assert off.predict(str(ct)).header is None
    frontal = make_dicom("pa.dcm", xray_array(64, 64), Modality="DX", ViewPosition="PA", BodyPartExamined="CHEST")
    result = load_model(trusted).predict(str(frontal))
    assert not any(r.startswith("not_frontal_cxr") for r in result.reasons)
    assert result.header["ViewPosition"] == "PA"


def test_the_model_card_is_written_and_its_figures_match_model_json(trusted):
    card = (trusted / CARD_FILE).read_text()
    meta = json.loads((trusted / "model.json").read_text())
    for heading in ("## Model details", "## Uses", "## Training details", "## Evaluation", "## Calibration",
                    "## Conformal prediction sets", "## Out-of-distribution behaviour",
                    "## Bias, risks and limitations", "## How to adapt to a site"):
        assert heading in card
    assert f"{meta['ood']['threshold']:.2f}" in card
    assert f"{100 * meta['conformal']['coverage']:.1f}%" in card
    for name, threshold in meta["conformal"]["thresholds"].items():
        assert re.search(rf"\| {name} \| {meta['conformal']['counts'][name]} \| {threshold:.4f} \|", card)
    assert "pneumonia 0.97 **flagged**" in card and "normal 0.55" in card
    assert f"T = {meta['temperature']:.3f}" in card


def test_the_cli_table_names_files_apart_and_shows_referral_and_caution(trusted, make_image):
    from typer.testing import CliRunner

    from chestxray.cli import app

    first, second = make_image("site_a/scan.png"), make_image("site_b/scan.png")
    result = CliRunner().invoke(app, ["predict", str(trusted), str(first), str(second)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "site_a/scan.png" in result.output and "site_b/scan.png" in result.output
    assert "prediction set" in result.output and ("REFER" in result.output or "no" in result.output)
