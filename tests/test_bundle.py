"""Tests for chestxray.bundle: round trips (single model and ensemble), contract fields, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chestxray.model.bundle import META_FILE, WEIGHTS_FILE, BundleMeta, load_bundle, read_meta, save_bundle
from chestxray.errors import ChestXrayError, InputError
from chestxray.model.models import EnsembleNet, create_model

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
    with pytest.raises(ChestXrayError, match="arch: Field required"):
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


# ------------------------------------------------------------------ schema (issue 17)

def _small_bundle(tmp_path, members: int = 0):
    torch.manual_seed(0)
    build = lambda: create_model("test_efficientnet", 3, weights="none").eval()  # noqa: E731
    model = EnsembleNet([build() for _ in range(members)]) if members else build()
    return save_bundle(tmp_path / "bundle", model, meta())


def _rewrite(bundle, **changes):
    data = json.loads((bundle / META_FILE).read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            data[outer] = {**data[outer], inner: value}
        else:
            data[key] = value
    (bundle / META_FILE).write_text(json.dumps(data))


@pytest.mark.parametrize("changes, field", [
    ({"classes": 3}, "classes"),
    ({"classes": ["a", "a", "b"]}, "classes"),
    ({"temperature": "1.0"}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"extra": "notes"}, "extra"),
    ({"image_size": 100000}, "image_size"),
    ({"image_size": True}, "image_size"),
    ({"extra.members": 1000}, "extra.members"),
    ({"extra.members": "2"}, "extra.members"),
    ({"task": "regression"}, "task"),
    ({"operating_points": {"normal": {"youden": "high"}}}, "operating_points"),
])
def test_model_json_of_the_wrong_type_or_range_is_one_line_naming_the_field(tmp_path, changes, field):
    bundle = _small_bundle(tmp_path)
    _rewrite(bundle, **changes)
    with pytest.raises(ChestXrayError) as err:
        load_bundle(bundle)
    message = str(err.value)
    assert "\n" not in message and META_FILE in message and field in message, message


def test_no_model_is_built_before_the_weights_match_the_declared_members(tmp_path, monkeypatch):
    """Before: extra.members = 1000 built 1000 models (15 GB, killed) before any check."""
    import chestxray.model.models as models_module

    bundle = _small_bundle(tmp_path)
    _rewrite(bundle, **{"extra.members": 30})
    built = []
    real = models_module.create_model
    monkeypatch.setattr(models_module, "create_model",
                        lambda *a, **k: built.append(torch.empty(0).device.type) or real(*a, **k))
    with pytest.raises(ChestXrayError, match="weights do not match the 30 x test_efficientnet") as err:
        load_bundle(bundle)
    assert "\n" not in str(err.value)
    assert built == ["meta"]  # one member on the meta device: no memory, no weights


def test_an_ensemble_bundle_still_loads(tmp_path):
    model, loaded = load_bundle(_small_bundle(tmp_path, members=2))
    assert len(model.members) == 2 and loaded.extra["members"] == 2


def test_the_schema_covers_every_bundle_field():
    import dataclasses

    from chestxray.model.bundle import BundleSchema

    assert {f.name for f in dataclasses.fields(BundleMeta)} <= set(BundleSchema.model_fields)


def test_a_full_disk_while_saving_keeps_the_previous_bundle_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    bundle = _small_bundle(tmp_path)
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}

    def full_disk(tensors, path):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)  # bundle imports it when it saves
    with pytest.raises(ChestXrayError) as err:
        save_bundle(bundle, create_model("test_efficientnet", 3, weights="none"), meta())
    assert str(bundle / WEIGHTS_FILE) in str(err.value) and "disk is full" in str(err.value)
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before  # no .tmp, the old files intact
    load_bundle(bundle)


BEFORE_SCHEMA = Path(__file__).parent / "data" / "bundle_before_schema"
"""model.json of a tiny warm-started bundle written by the code before ``schema_version`` existed (commit
d7c6f36; weights left out, so only its metadata is read)."""


def test_a_bundle_written_before_the_schema_version_still_reads(tmp_path: Path) -> None:
    import shutil

    from chestxray.trust.lineage import describe_lineage

    shutil.copy(BEFORE_SCHEMA / "model.json", tmp_path / "model.json")
    raw = json.loads((BEFORE_SCHEMA / "model.json").read_text())
    meta = read_meta(tmp_path)
    assert "schema_version" not in raw and meta.schema_version == 1
    assert (meta.classes, meta.arch, meta.image_size, meta.task) == (raw["classes"], raw["arch"], raw["image_size"],
                                                                     raw["task"])
    assert meta.lineage["parent_id"] == raw["lineage"]["parent_id"] and describe_lineage(meta.lineage)
    assert meta.preprocessing().key() and meta.extra["trained_on"]["n_val"] == raw["extra"]["trained_on"]["n_val"]
    probs = meta.logit_transform().probabilities(np.zeros((1, len(meta.classes)), dtype=np.float32))
    assert np.allclose(probs.sum(1), 1)


def test_a_rewritten_model_json_carries_the_schema_version_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    import shutil

    from chestxray.model.bundle import SCHEMA_VERSION, write_meta

    shutil.copy(BEFORE_SCHEMA / "model.json", tmp_path / "model.json")
    write_meta(tmp_path, read_meta(tmp_path))
    assert json.loads((tmp_path / "model.json").read_text())["schema_version"] == SCHEMA_VERSION == 2
    assert read_meta(tmp_path).schema_version == SCHEMA_VERSION
    newer = {**json.loads((tmp_path / "model.json").read_text()), "schema_version": SCHEMA_VERSION + 1}
    (tmp_path / "model.json").write_text(json.dumps(newer))
    with pytest.raises(InputError, match="schema version 3 is newer"):
        read_meta(tmp_path)
