"""DICOM header checks: what the header says about whether an image is a frontal chest X-ray."""

from __future__ import annotations

import numpy as np
import pytest

from chestxray.data.dicomcheck import DEFAULT_POLICY, HeaderPolicy, check_source, header_summary
from chestxray.errors import InputError

PIXELS = np.full((16, 16), 100, np.uint8)


def test_a_frontal_chest_radiograph_passes(make_dicom):
    path = make_dicom("ok.dcm", PIXELS, Modality="DX", BodyPartExamined="CHEST", ViewPosition="PA")
    assert check_source(path) == []
    assert check_source(path.read_bytes()) == []


@pytest.mark.parametrize("tags, reason", [
    ({"Modality": "CT"}, "not_frontal_cxr: Modality CT"),
    ({"Modality": "MR"}, "not_frontal_cxr: Modality MR"),
    ({"BodyPartExamined": "SKULL"}, "not_frontal_cxr: BodyPartExamined SKULL"),
    ({"ViewPosition": "LL"}, "not_frontal_cxr: ViewPosition LL (lateral)"),
    ({"NumberOfFrames": 3}, "not_frontal_cxr: NumberOfFrames 3 (multi-frame)"),
    ({"ImageType": ["DERIVED", "SECONDARY"]}, "not_frontal_cxr: ImageType DERIVED\\SECONDARY (derived screenshot)"),
])
def test_each_header_problem_is_named(make_dicom, tags, reason):
    path = make_dicom("bad.dcm", PIXELS, **tags)
    assert check_source(path) == [reason]


def test_several_problems_are_all_reported_and_missing_fields_are_accepted(make_dicom):
    path = make_dicom("ct.dcm", PIXELS, Modality="CT", BodyPartExamined="HEAD")
    assert len(check_source(path)) == 2
    assert check_source(make_dicom("bare.dcm", PIXELS)) == []  # no body part, no view: accepted


def test_the_policy_is_configurable(make_dicom):
    path = make_dicom("mg.dcm", PIXELS, Modality="MG")
    assert check_source(path) != []
    assert check_source(path, HeaderPolicy(modalities=DEFAULT_POLICY.modalities | {"MG"})) == []


def test_other_formats_have_no_header_a_broken_one_is_flagged_and_a_missing_file_named(tmp_path, make_image):
    assert check_source(make_image("x.png")) == []
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    assert check_source(broken) == ["not_frontal_cxr: Modality missing"]
    with pytest.raises(InputError, match="gone.dcm"):
        check_source(tmp_path / "gone.dcm")


def test_summary_shows_the_fields_read(make_dicom):
    path = make_dicom("s.dcm", PIXELS, Modality="DX", ImageType=["ORIGINAL", "PRIMARY"])
    import pydicom

    summary = header_summary(pydicom.dcmread(path))
    assert summary["Modality"] == "DX" and summary["ImageType"] == "ORIGINAL\\PRIMARY"
    assert summary["Rows"] == "16"
