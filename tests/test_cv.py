"""Cross-validation: patient-grouped folds, out-of-fold predictions, fold isolation and the ensemble bundle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from factories import TINY, write_xrays

from chestxray.model.bundle import load_bundle
from chestxray.training.config import RuntimeSettings, TrainConfig
from chestxray.stats.conformal import ConformalSets
from chestxray.training.cv import cross_validate
from chestxray.data.decode import preprocess
from chestxray.errors import ChestXrayError
from chestxray.model.models import EnsembleNet
from chestxray.stats.ood import OODGuard, cross_fitted_scores
from chestxray.inference.predict import load_model
from chestxray.model.runners import as_runner, run_images


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
def test_cross_validation_writes_folds_oof_and_ensemble(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the wiring of the ensemble's guard on these few images; the 100-image floor has its own test (test_calibration)
    monkeypatch.setattr("chestxray.calibration.MIN_GUARD_IMAGES", 10)
    data = write_xrays(tmp_path / "data")
    result = cross_validate(data, TrainConfig(**TINY), folds=3, out_dir=tmp_path / "runs", name="cv",
                            keep_models=True, progress=False)
    run = tmp_path / "runs" / "cv"

    # every training-pool image exactly once, never a test image or the test image's training copy
    oof = pd.read_csv(run / "oof.csv", dtype={"patient_id": str})
    test_copy = str(data / "train/pneumonia/person0_bacteria_0.png")
    expected = {str(p) for p in (data / "train").rglob("*.png")} - {test_copy}
    assert sorted(oof["file"]) == sorted(expected)
    assert set(oof["fold"]) == {0, 1, 2}
    assert oof.groupby("patient_id")["fold"].nunique().max() == 1, "a patient is in two folds"
    assert np.allclose(oof[["normal", "pneumonia"]].sum(axis=1), 1.0)

    folds = pd.read_csv(run / "cv.csv")
    assert list(folds["fold"]) == [0, 1, 2] and folds["n"].sum() == len(oof)
    assert {"loss", "accuracy", "balanced_accuracy", "macro_auc"} <= set(folds.columns)
    summary = json.loads((run / "cv.json").read_text())
    assert summary["mean"]["accuracy"] == pytest.approx(folds["accuracy"].mean())
    assert summary["std"]["loss"] == pytest.approx(folds["loss"].std(ddof=1))
    truth = (oof["truth"] == "pneumonia").to_numpy()
    oof_accuracy = float(((oof["pneumonia"] > oof["normal"]).to_numpy() == truth).mean())
    assert summary["oof"]["n"] == len(oof) and summary["oof"]["accuracy"] == pytest.approx(oof_accuracy)

    # a fold never trains or early-stops on its held-out images, nor on byte copies of them
    copy_folds = [oof[oof["file"].isin({str(data / f"train/normal/IM-{q:04d}-0000.png") for q in (p, 50 + p)})]["fold"]
                  for p in range(3)]
    assert any(f.nunique() == 2 for f in copy_folds), "precondition: some copies fall in two folds"
    for fold in range(3):
        split = pd.read_csv(run / f"fold{fold}" / "split.csv")
        held = oof[oof["fold"] == fold]["file"]
        assert set(split["subset"]) == {"train", "val"}
        assert not set(split["path"]) & set(held)
        assert not {_digest(p) for p in split["path"]} & {_digest(p) for p in held}
        assert not (run / f"fold{fold}" / "checkpoints").exists() and not (run / f"fold{fold}" / "bundle").exists()

    # the ensemble: one member per fold, each member reproduces the out-of-fold probabilities of its fold,
    # and the ensemble's probabilities are the members' mean
    model, meta = load_bundle(result.bundle_dir)
    assert isinstance(model, EnsembleNet) and len(model.members) == 3
    assert meta.metrics["accuracy"] == pytest.approx(oof_accuracy) and meta.temperature > 0
    # operating points chosen on the calibrated out-of-fold probabilities reach their sensitivity there
    calibrated = torch.from_numpy(meta.logit_transform().probabilities(np.log(oof[["normal", "pneumonia"]].to_numpy())))
    for k, name in enumerate(["normal", "pneumonia"]):
        positives = calibrated[:, k].numpy()[(oof["truth"] == name).to_numpy()]
        assert (positives >= meta.operating_points[name]["sensitivity_95"] - 1e-6).mean() >= 0.95
    for fold, member in enumerate(model.members):
        rows = oof[oof["fold"] == fold]
        images = np.stack([preprocess(p, 32, "pad") for p in rows["file"]])
        probs = torch.from_numpy(run_images(as_runner(member), images)[0]).softmax(-1).numpy()
        assert np.allclose(probs, rows[["normal", "pneumonia"]].to_numpy(), atol=1e-5)
    images = np.random.default_rng(1).integers(0, 255, (4, 32, 32), dtype=np.uint8)
    ensemble = torch.from_numpy(run_images(as_runner(model), images)[0]).softmax(-1)
    members = torch.stack([torch.from_numpy(run_images(as_runner(m), images)[0]).softmax(-1) for m in model.members])
    assert torch.allclose(ensemble, members.mean(0), atol=1e-5)
    # the ensemble is guarded, and its conformal sets come from the out-of-fold probabilities
    assert meta.ood is not None and meta.ood["threshold"] > 0
    assert meta.conformal is not None and sum(meta.conformal["counts"].values()) == len(oof)
    assert load_model(result.bundle_dir).predict(images[0]).ood_score is not None
    # its drift reference refers as predictions are referred: a set not of one class, or OOD (cross-fitted)
    pool = np.stack([preprocess(p, 32, "pad") for p in oof["file"]])
    features = run_images(as_runner(model), pool)[1]
    flags = OODGuard.from_dict(meta.ood).is_ood(cross_fitted_scores(features, truth.astype(int)))
    sets = ConformalSets.from_dict(meta.conformal, ["normal", "pneumonia"]).sets(calibrated.numpy())
    assert meta.extra["reference"]["referral_rate"] == pytest.approx(float(((sets.sum(1) != 1) | flags).mean()))

    # coverage and set size of each fold model's own sets on its held-out fold, and risk-coverage
    trust = summary["oof_trust"]
    assert trust["conformal"]["n"] == len(oof) and trust["conformal"]["target_coverage"] == 0.9
    for name in ("normal", "pneumonia"):
        row = trust["conformal"]["per_class"][name]
        assert row["n"] == int((oof["truth"] == name).sum()) and 0 <= row["coverage"] <= 1
        assert len(row["coverage_ci"]) == 2 and 0 <= row["mean_set_size"] <= 2
    assert set(trust["at_coverage"]) == {"80%", "50%"}
    assert trust["at_coverage"]["50%"]["kept"] == round(0.5 * len(oof))


def test_more_folds_than_patients_is_a_clear_error(tmp_path: Path) -> None:
    data = write_xrays(tmp_path / "data", patients=3)  # 3 + 3 copies + 3 patients in the pool
    with pytest.raises(ChestXrayError, match="10 folds need at least 10 patients; the training pool has 9"):
        cross_validate(data, TrainConfig(**TINY), folds=10, out_dir=tmp_path / "runs", progress=False)


@pytest.mark.parametrize("layout", [{"strategy": "ddp"}, {"devices": "2"}, {"num_nodes": 2}])
def test_multi_process_layouts_are_refused(tmp_path: Path, layout: dict) -> None:
    with pytest.raises(ChestXrayError, match="one device in one process"):
        cross_validate(tmp_path, TrainConfig(**TINY), runtime=RuntimeSettings(**layout), out_dir=tmp_path / "runs",
                       progress=False)
