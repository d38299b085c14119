"""The referral rule has one owner (chestxray.trust.referral) and one form per output: a prediction
becomes a row only by ``Prediction.to_row`` and an inference-log result only by ``to_audit``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

import chestxray
from chestxray.dicom.inferencelog import AuditTrail
from chestxray.inference.predict import AUDITED, Prediction
from chestxray.trust.referral import refer_mask, referral, referral_reasons

CLASSES = ["a", "b", "c"]


def prediction(sets: list[str] | None, ood: bool, error: str | None = None) -> Prediction:
    return Prediction(file="x.png", label="a", probabilities={"a": 0.61234, "b": 0.3, "c": 0.08766}, ood=ood,
                      ood_score=12.3456, ood_percentile=99.4567, error=error, prediction_set=sets)


def test_the_vectorised_rule_refers_exactly_what_the_per_image_rule_refers() -> None:
    cases = [(s, o) for s in (["a"], ["a", "b"], [], ["c"]) for o in (False, True)]
    per_image = [bool(referral_reasons(prediction(s, o), None, 0.9, None)) for s, o in cases]
    sets = np.array([[name in s for name in CLASSES] for s, _ in cases])
    flags = np.array([o for _, o in cases])
    assert refer_mask(sets, flags).tolist() == per_image
    assert per_image == [False, True, True, True, True, True, False, True]


def test_a_check_that_did_not_run_refers_nothing() -> None:
    assert refer_mask(None, np.array([False, True])).tolist() == [False, True]
    assert refer_mask(np.array([[True, True]]), None, np.array([False])).tolist() == [True]
    assert referral_reasons(prediction(None, False), None, None, None) == []


def test_an_unreadable_image_is_referred_with_its_error_and_header_reasons_come_first() -> None:
    refer, reasons = referral(prediction(None, False, error="not an image"), ["not_frontal_cxr: Modality CT"])
    assert refer and reasons == ["not_frontal_cxr: Modality CT", "unreadable: not an image"]
    classified = prediction(["a", "b"], False)
    classified.reasons = referral_reasons(classified, None, 0.9, None)
    assert referral(classified) == (True, ["uncertain: the 90% prediction set holds a, b"])
    assert referral(None, []) == (False, [])


def test_to_audit_keeps_the_audited_keys_as_the_json_form_rounds_them() -> None:
    found = prediction(["a"], True)
    assert found.to_audit() == {key: found.to_dict()[key] for key in AUDITED}
    assert set(found.to_audit()) == {"label", "probabilities", "ood", "ood_percentile"}
    assert prediction(None, False, error="broken").to_audit() == {"error": "broken"}


def test_the_inference_log_writes_a_prediction_through_to_audit_and_the_rule(tmp_path: Path) -> None:
    class Meta:
        model_id, provenance = "m@1", {"weights_sha256": "f" * 64}

    found = prediction(["a", "b"], False)
    found.reasons = referral_reasons(found, None, 0.9, None)
    trail = AuditTrail(tmp_path / "log.jsonl")
    trail.record_prediction(found, Meta(), source="predict", caller="local", input_sha256="0" * 64, latency_ms=1.0)
    line = json.loads((tmp_path / "log.jsonl").read_text())
    assert line["result"] == found.to_audit() and line["result"]["ood_percentile"] is not None
    assert line["referral"] == {"refer": True, "reasons": found.reasons}


def test_only_the_owner_words_or_parses_a_referral_reason() -> None:
    """The referral reasons are worded in chestxray/trust/referral.py alone (the header check's by
    chestxray/data/dicomcheck.py), and no module reads a reason back by its prefix."""
    package = Path(chestxray.__file__).parent
    worded = re.compile(r"[\"'](uncertain|out_of_distribution): ")
    parsed = re.compile(r"startswith\((f?[\"'](uncertain|out_of_distribution|unreadable|not_frontal_cxr)|REASON_PREFIX)")
    found = sorted(f"{path.relative_to(package)}: {pattern.pattern[:12]}" for path in package.rglob("*.py")
                   for pattern in (worded, parsed) if pattern.search(path.read_text()))
    assert found == []
    owner = (package / "trust" / "referral.py").read_text()
    assert all(f'f"{{{kind}}}: ' in owner for kind in ("UNCERTAIN", "OUT_OF_DISTRIBUTION", "UNREADABLE"))


def test_a_reason_is_read_back_by_its_kind() -> None:
    from chestxray.trust.referral import reason_kind

    assert [reason_kind(r) for r in ("uncertain: the 90% set holds a, b", "not_frontal_cxr: Modality CT",
                                     "unreadable: x", "out_of_distribution: score 3", "something else")] == \
        ["uncertain", "not_frontal_cxr", "unreadable", "out_of_distribution", None]
