"""Tests for chestxray.bundle: round trips (single model and ensemble), contract fields, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from chestxray.bundle import META_FILE, WEIGHTS_FILE, BundleMeta, load_bundle, save_bundle
from chestxray.errors import ChestXrayError
from chestxray.models import EnsembleNet, create_model

CONTRACT_FIELDS = {
    "format", "arch", "classes", "task", "image_size", "channels", "mean", "std", "preprocess",
    "temperature", "ood", "train_fingerprint", "metrics", "package_version", "created",
}


def tiny_model(task: str = "multiclass", seed: int = 0):
    torch.manual_seed(seed)
    return create_model("resnet18", num_classes=3, weights="none", task=task).eval()


def meta() -> BundleMeta:
    return BundleMeta(classes=["normal", "pneumonia", "covid"], image_size=64, metrics={"auc": 0.5})


def test_round_trip_gives_identical_outputs(tmp_path) -> None:
    model = tiny_model()
    save_bundle(tmp_path / "bundle", model, meta())
    loaded, loaded_meta = load_bundle(tmp_path / "bundle")
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert loaded_meta.classes == meta().classes
    assert (loaded_meta.arch, loaded_meta.mean, loaded_meta.std) == ("resnet18", float(model.mean), float(model.std))


def test_json_has_every_contract_field(tmp_path) -> None:
    save_bundle(tmp_path, tiny_model("multilabel"), meta())
    data = json.loads((tmp_path / META_FILE).read_text())
    assert CONTRACT_FIELDS <= data.keys()
    assert (data["format"], data["channels"], data["task"]) == (1, 1, "multilabel")


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_ensemble_round_trip(tmp_path, task: str) -> None:
    ensemble = EnsembleNet([tiny_model(task, seed) for seed in range(2)]).eval()
    save_bundle(tmp_path, ensemble, meta())
    loaded, loaded_meta = load_bundle(tmp_path)
    assert isinstance(loaded, EnsembleNet) and loaded_meta.extra["members"] == 2
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        logits = loaded(x)
        assert torch.equal(logits, ensemble(x))
        members = [member(x) for member in ensemble.members]
    if task == "multiclass":
        expected = torch.stack([m.softmax(1) for m in members]).mean(0)
        assert torch.allclose(logits.softmax(1), expected, atol=1e-6)
    else:
        expected = torch.stack([m.sigmoid() for m in members]).mean(0)
        assert torch.allclose(logits.sigmoid(), expected, atol=1e-6)


def test_missing_folder_broken_json_and_missing_weights(tmp_path) -> None:
    with pytest.raises(ChestXrayError, match="bundle folder not found"):
        load_bundle(tmp_path / "absent")
    save_bundle(tmp_path, tiny_model(), meta())
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(ChestXrayError, match="no weights"):
        load_bundle(tmp_path)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(ChestXrayError, match="not valid JSON"):
        load_bundle(tmp_path)
    (tmp_path / META_FILE).unlink()
    with pytest.raises(ChestXrayError, match="not a chestxray bundle"):
        load_bundle(tmp_path)


def test_unknown_format_missing_field_and_mismatched_weights(tmp_path) -> None:
    save_bundle(tmp_path, tiny_model(), meta())
    data = json.loads((tmp_path / META_FILE).read_text())
    (tmp_path / META_FILE).write_text(json.dumps({**data, "format": 99}))
    with pytest.raises(ChestXrayError, match="unknown bundle format"):
        load_bundle(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({key: v for key, v in data.items() if key != "arch"}))
    with pytest.raises(ChestXrayError, match="missing fields: arch"):
        load_bundle(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({**data, "classes": ["a", "b"]}))
    with pytest.raises(ChestXrayError, match="weights do not match"):
        load_bundle(tmp_path)
    older = {key: v for key, v in data.items() if key not in ("operating_points", "extra")}
    (tmp_path / META_FILE).write_text(json.dumps(older))  # written before these fields existed
    assert load_bundle(tmp_path)[1].operating_points == {}
    (tmp_path / META_FILE).write_text(json.dumps({**data, "operating_points": {"nope": {"youden": 0.5}}}))
    with pytest.raises(ChestXrayError, match="bad operating_points"):
        load_bundle(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({**data, "preprocess": {"mode": "stretch"}}))
    with pytest.raises(ChestXrayError, match="model.json: bad preprocessing options: fit mode"):
        load_bundle(tmp_path)


def test_class_count_must_match_the_model(tmp_path) -> None:
    with pytest.raises(ChestXrayError, match="class names"):
        save_bundle(tmp_path, tiny_model(), BundleMeta(classes=["a", "b"], image_size=64))
