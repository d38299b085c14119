"""Fuzzing (bounded for ``make test``; ``bench/fuzz.py`` runs the long mode): mutated real PNG, JPEG,
TIFF and DICOM bytes through ``decode.load_image`` and ``POST /v1/predict``, which must answer with
the project's own error or a 4xx JSON, never another exception or a 500."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chestxray.inference.predict import load_model
from chestxray.serving.serve import create_app
from factories import make_bundle
from fuzzing import CONTENT_TYPES, Case, check_decode, check_predict, damaged_files, examples, load_seeds, mutated

SEEDS = load_seeds()
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_the_seeds_cover_every_format_and_decode():
    suffixes = {Path(seed.name).suffix for seed in SEEDS}
    assert {".png", ".jpg", ".tif", ".tiff", ".dcm"} <= suffixes
    assert all(check_decode(Case(s.name, s.name, s.data)) == "ok" for s in SEEDS)


@settings(FUZZ, max_examples=examples(300))
@given(case=mutated(SEEDS))
def test_load_image_refuses_damaged_files_with_its_own_error(case):
    check_decode(case)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    app = create_app(load_model(make_bundle(tmp_path_factory.mktemp("bundle"))), api_key="")
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@settings(FUZZ, max_examples=examples(120))
@given(case=mutated(SEEDS), content_type=st.sampled_from(CONTENT_TYPES))
def test_predict_answers_damaged_uploads_with_a_4xx_json_never_a_500(client, case, content_type):
    check_predict(client, case, content_type)


@pytest.mark.parametrize("content_type", ["", "image/png", "application/dicom"])
def test_the_damaged_files_of_the_adversarial_pass_get_422_not_500(client, content_type):
    for name, data in damaged_files().items():
        assert check_predict(client, Case(name, name, data), content_type) == 422, name
