"""When not to trust a prediction: conformal sets, referral with reasons (set size, OOD, DICOM header),
source-confound cautions, and the model card written from model.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import xray_array
from factories import BINARY_CLASSES, make_bundle, sets_for

from chestxray.model.bundle import read_meta
from chestxray.data.dicomcheck import HeaderPolicy
from chestxray.model.modelcard import CARD_FILE
from chestxray.inference.predict import NOT_CHECKED, load_model, predict_paths

CONFOUND = {"method": "test", "threshold": 0.8, "auc": {"normal": 0.55, "pneumonia": 0.97},
            "flagged": ["pneumonia"], "note": ""}


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
    assert bool(row["refer"]) and reason in row["reasons"]
    assert json.loads(row["header"])["Modality"] == result.header["Modality"]  # CSV: the header's JSON object


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
    assert f"Logit transform applied before the softmax: {read_meta(trusted).logit_transform().describe()}" in card


def test_the_cli_table_names_files_apart_and_shows_referral_and_caution(trusted, make_image):
    from typer.testing import CliRunner

    from chestxray.cli import app

    first, second = make_image("site_a/scan.png"), make_image("site_b/scan.png")
    result = CliRunner().invoke(app, ["predict", str(trusted), str(first), str(second)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "site_a/scan.png" in result.output and "site_b/scan.png" in result.output
    assert "prediction set" in result.output and ("REFER" in result.output or "no" in result.output)


# ---------------------------------------------------------------------- every path honours --coverage and
# --no-header-check, and carries every referral reason (SR, worklist, audit trail)

HALF = "uncertain: the 50% prediction set holds normal, pneumonia"
"""The set-size reason of a wide-set bundle at coverage 0.5 (the default would say 90%)."""


@pytest.fixture
def wide(tmp_path: Path) -> Path:
    """A bundle whose sets hold both classes at any coverage (every prediction is referred for set size),
    without an OOD guard (so that set size is the one reason besides the header)."""
    return make_bundle(tmp_path / "wide", conformal=sets_for(0.001), guard=False)


def invoke(*args: str):
    from typer.testing import CliRunner

    from chestxray.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def audit_reasons(audit_log: Path) -> list[list[str]]:
    return [json.loads(line)["referral"]["reasons"] for line in audit_log.read_text().splitlines()]


def test_predict_files_and_worklist_honour_coverage_and_the_header_switch(wide, make_dicom, tmp_path, audit_log):
    ct = make_dicom("ct.dcm", xray_array(64, 64), Modality="CT")
    out = tmp_path / "files.json"
    result = invoke("predict", str(wide), str(ct), "--coverage", "0.5", "--no-header-check", "--format", "json",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())[0]
    assert row["reasons"] == [HALF] and row["header"] is None  # JSON: a list of reasons, no header object
    assert audit_reasons(audit_log)[-1] == [HALF]  # the audit line carries the table's reasons
    worklist = tmp_path / "list.csv"
    worklist.write_text(f"path\n{ct}\n")
    for flags, expected in ((["--no-header-check"], [HALF]), ([], ["not_frontal_cxr: Modality CT"])):
        target = tmp_path / f"worklist{len(flags)}.csv"
        result = invoke("predict", str(wide), "--worklist", str(worklist), "--coverage", "0.5", *flags,
                        "--out", str(target))
        assert result.exit_code == 0, result.output
        import pandas as pd

        row = pd.read_csv(target, keep_default_na=False).iloc[0]
        assert row["reasons"].split("; ") == expected and bool(row["refer"])
        assert bool(row["label"]) == bool(flags)  # a CT is classified only with the check off
        assert audit_reasons(audit_log)[-1] == expected


@pytest.mark.parametrize("coverage", ["1.5", "0", "-0.1"])
def test_a_coverage_outside_0_1_is_refused_by_every_command(wide, coverage):
    for command in ("predict", "serve", "listen"):
        result = invoke(command, str(wide), *(["x.png"] if command == "predict" else []), "--coverage", coverage)
        assert result.exit_code == 2 and "between 0 and 1" in result.output, (command, result.output)


def test_serve_and_listen_take_coverage_and_the_header_switch(wide, make_dicom, monkeypatch, audit_log):
    import chestxray.dicom.listen
    import chestxray.serving.serve

    seen: dict[str, dict] = {}
    monkeypatch.setattr(chestxray.serve, "serve", lambda *a, **k: seen.setdefault("serve", k))
    monkeypatch.setattr(chestxray.listen, "listen", lambda *a, **k: seen.setdefault("listen", k))
    for command in ("serve", "listen"):
        assert invoke(command, str(wide), "--coverage", "0.5", "--no-header-check").exit_code == 0
    assert (seen["serve"]["coverage"], seen["serve"]["header_check"]) == (0.5, False)
    assert (seen["listen"]["coverage"], seen["listen"]["header_policy"]) == (0.5, None)

    # the server's worker processes read them from the environment serve() sets
    from fastapi.testclient import TestClient

    from chestxray.model.bundle import read_meta, write_meta

    meta = read_meta(wide)
    meta.extra = {**meta.extra, "reference": {"referral_rate": 0.2, "predicted_shares": {"normal": 0.5,
                                                                                         "pneumonia": 0.5}}}
    write_meta(wide, meta)

    ct = make_dicom("ct.dcm", xray_array(64, 64), Modality="CT").read_bytes()
    for check, expected in (("0", [HALF]), ("1", ["not_frontal_cxr: Modality CT", HALF])):
        for name, value in {"BUNDLE": str(wide), "BACKEND": "torch", "MAX_UPLOAD": str(2**20), "THREADS": "1",
                            "COVERAGE": "0.5", "HEADER_CHECK": check}.items():
            monkeypatch.setenv(f"CHESTXRAY_SERVE_{name}", value)
        with TestClient(chestxray.serve.app_from_environment()) as client:
            answer = client.post("/v1/predict", files={"file": ("ct.dcm", ct, "application/dicom")}).json()
            model, health = client.get("/v1/model").json(), client.get("/healthz").json()
        assert (model["conformal"]["coverage"], model["conformal"]["fitted_coverage"]) == (0.5, 0.9)
        # the reference referral rate was measured at 90%: at 50% it is not compared, and says so
        assert any(item.startswith("referral rate") for item in health["drift"]["not_checked"])
        assert answer["coverage"] == 0.5 and sorted(answer["reasons"]) == sorted(expected)
        assert (answer["header"] is None) == (check == "0")
        assert sorted(audit_reasons(audit_log)[-1]) == sorted(expected)  # the audit line: every reason
    monkeypatch.setenv("CHESTXRAY_SERVE_COVERAGE", "")  # the bundle's own coverage: the rate is compared
    with TestClient(chestxray.serve.app_from_environment()) as client:
        health = client.get("/healthz").json()
    assert not any(item.startswith("referral rate") for item in health["drift"]["not_checked"])


def test_listen_loads_its_model_with_coverage_and_policy(wide, tmp_path, monkeypatch):
    import chestxray.dicom.listen as listen_module

    class Stop(Exception):
        pass

    class Captured:
        def __init__(self, predictor, *args, **kwargs):
            self.predictor = predictor
            raise Stop(predictor)

    monkeypatch.setattr(listen_module, "Listener", Captured)
    with pytest.raises(Stop) as stopped:
        listen_module.listen(wide, listen_module.ListenConfig(spool=tmp_path / "spool"), backend="torch",
                             coverage=0.5, header_policy=None)
    predictor = stopped.value.args[0]
    assert predictor.coverage == 0.5 and predictor.header_policy is None


def test_every_referral_reason_reaches_the_structured_report(wide, make_dicom):
    from chestxray.dicom.dicomresult import assess, build_sr, read_dataset, read_sr

    frontal = make_dicom("pa.dcm", xray_array(64, 64), Modality="DX", StudyInstanceUID="1.2.3",
                         SeriesInstanceUID="1.2.3.4")
    lateral = make_dicom("ll.dcm", xray_array(64, 64), Modality="DX", ViewPosition="LL",
                         StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.4")
    datasets = [(read_dataset(p.read_bytes(), p.name), p.read_bytes()) for p in (frontal, lateral)]
    classified, refused = assess(load_model(wide, coverage=0.5), datasets)
    assert classified.label and classified.refer and classified.reasons == [HALF]
    assert not refused.label and refused.reasons == ["not_frontal_cxr: ViewPosition LL (lateral)"]
    for (ds, _), assessment in zip(datasets, (classified, refused)):
        report = read_sr(build_sr(ds, assessment, algorithm="chestxray test"))
        assert report["refer"] and report["reasons"] == assessment.reasons
    unchecked, _ = assess(load_model(wide, header_policy=None), datasets[1:] * 2)
    assert unchecked.label and unchecked.reasons == [HALF.replace("50%", "90%")]


def test_the_drift_reference_counts_ood_flags_given_from_a_guard_fitted_elsewhere():
    from chestxray.trust.calibration import calibrate_outputs
    from chestxray.stats.ood import OODGuard, cross_fitted_scores

    from chestxray.stats.conformal import ConformalSets
    from chestxray.stats.metrics import logits_to_probs

    rng = np.random.default_rng(0)
    targets = np.arange(60) % 2
    logits = rng.normal(0, 1.5, (60, 2)) + np.eye(2)[targets] * 2.0
    flags = np.zeros(60, bool)
    flags[::5] = True
    unflagged = calibrate_outputs(logits, targets, classes=BINARY_CLASSES, task="multiclass")
    flagged = calibrate_outputs(logits, targets, classes=BINARY_CLASSES, task="multiclass", ood_flags=flags)
    probs = logits_to_probs(logits, "multiclass", flagged.temperature)
    uncertain = ConformalSets.from_dict(flagged.conformal, BINARY_CLASSES).sets(probs).sum(1) != 1
    assert unflagged.reference["referral_rate"] == pytest.approx(uncertain.mean())
    assert flagged.reference["referral_rate"] == pytest.approx((uncertain | flags).mean())
    assert (flags & ~uncertain).any()  # the flags add referrals
    # the cross-fitted scores an ensemble's flags come from are the scores its guard's threshold was set on
    features = rng.normal(size=(40, 8))
    guard = OODGuard.fit(features, np.arange(40) % 2)
    np.testing.assert_allclose(np.sort(cross_fitted_scores(features, np.arange(40) % 2)), guard.held_out)


@pytest.mark.parametrize("kind", ["png", "dicom"])
def test_the_cli_json_and_the_rest_json_of_an_image_are_the_same(trusted, make_image, make_dicom, tmp_path, kind):
    """One serialiser (Prediction.to_dict): same keys, same types, same rounded figures; the REST answer
    adds its latency, the CLI names the file and its error."""
    from fastapi.testclient import TestClient

    from chestxray.serving.serve import create_app

    path = make_image("x.png", xray_array(seed=3)) if kind == "png" else make_dicom("ct.dcm", xray_array(64, 64),
                                                                                     Modality="CT")
    result = invoke("predict", str(trusted), str(path), "--format", "json")
    assert result.exit_code == 0, result.output
    (cli,) = json.loads(result.stdout)
    with TestClient(create_app(load_model(trusted), api_key="")) as client:
        answer = client.post("/v1/predict", files={"file": (path.name, path.read_bytes())})
    assert answer.status_code == 200, answer.text
    rest = answer.json()
    assert cli.pop("file") == str(path) and cli.pop("error") is None and isinstance(rest.pop("latency_ms"), float)
    assert cli == rest
    assert isinstance(cli["prediction_set"], list) and isinstance(cli["cautions"], list)
    assert (cli["header"] is None) == (kind == "png")
    if kind == "dicom":
        assert cli["header"]["Modality"] == "CT" and "not_frontal_cxr: Modality CT" in cli["reasons"]
    assert all(p == round(p, 4) for p in cli["probabilities"].values())
    assert cli["ood_percentile"] == round(cli["ood_percentile"], 1)
    assert "\\/" not in result.stdout  # slashes are not escaped
