"""Model versioning: the bundle records its weights' sha256 and software versions; results name its id."""

from __future__ import annotations

import json

import pytest
import torch
from factories import make_bundle

from chestxray.model.bundle import WEIGHTS_FILE, load_bundle
from chestxray.errors import InputError
from chestxray.inference.predict import load_model
from chestxray.provenance import file_sha256


def test_model_json_records_weights_hash_versions_and_commit(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    record = json.loads((bundle / "model.json").read_text())["provenance"]
    assert record["weights_sha256"] == file_sha256(bundle / WEIGHTS_FILE)
    assert torch.__version__.startswith(record["torch_version"])
    assert record["timm_version"] and record["package_version"] and record["python_version"]
    assert "git_commit" in record  # None outside a git checkout
    predictor = load_model(bundle)
    assert predictor.meta.model_id == f"test_efficientnet@{record['weights_sha256'][:12]}"


def test_changed_weights_are_refused_and_old_bundles_get_their_hash(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    meta_path = bundle / "model.json"
    data = json.loads(meta_path.read_text())
    data["provenance"]["weights_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="changed or replaced after it was written"):
        load_bundle(bundle)
    del data["provenance"]  # a bundle written before provenance existed
    meta_path.write_text(json.dumps(data))
    _, meta = load_bundle(bundle)
    assert meta.model_id.endswith(file_sha256(bundle / WEIGHTS_FILE)[:12])
