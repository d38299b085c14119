"""Public data sets' label files, written here in each one's documented columns, read onto one vocabulary."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import xray_array
from factories import png_bytes
from PIL import Image
from typer.testing import CliRunner

from chestxray.constants import SET_SEPARATOR
from chestxray.data.decode import load_image
from chestxray.data.public import detect_format
from chestxray.data.sources import COLUMNS, load_samples
from chestxray.data.vocabulary import FINDINGS, MAPPINGS, SourceOptions, label_mapping
from chestxray.errors import ChestXrayError, InputError

CHEXPERT_FINDINGS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                     "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                     "Fracture", "Support Devices"]


def counts(samples) -> dict[str, int]:
    """Images per finding."""
    return dict(Counter(name for label in samples.frame["label"] for name in label.split(SET_SEPARATOR) if name))


def _jpeg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(xray_array(24, 32, seed)).save(path, format="JPEG")


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(xray_array(24, 32, seed)))


def _chexpert_csv(path: Path, rows: list[tuple[str, str, str, dict[str, str]]]) -> None:
    """CheXpert's columns: Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14 observations (1, 0, -1, blank)."""
    lines = [",".join(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS])]
    for image, view, projection, values in rows:
        lines.append(",".join([image, "Female", "68", view, projection, *(values.get(f, "") for f in CHEXPERT_FINDINGS)]))
        _jpeg(path.parent.parent / image, seed=len(lines))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def chexpert(tmp_path: Path) -> Path:
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    base = "CheXpert-v1.0-small/{split}/patient{p:05d}/study1/view{v}_{kind}.jpg"
    _chexpert_csv(root / "train.csv", [
        (base.format(split="train", p=1, v=1, kind="frontal"), "Frontal", "AP", {"Cardiomegaly": "1.0", "Edema": "-1.0"}),
        (base.format(split="train", p=1, v=2, kind="lateral"), "Lateral", "", {"Cardiomegaly": "1.0"}),
        (base.format(split="train", p=2, v=1, kind="frontal"), "Frontal", "PA", {"No Finding": "1.0"}),
        (base.format(split="train", p=3, v=1, kind="frontal"), "Frontal", "PA",
         {"Pleural Effusion": "1.0", "Atelectasis": "-1.0", "Edema": "0.0"}),
    ])
    _chexpert_csv(root / "valid.csv", [
        (base.format(split="valid", p=64541, v=1, kind="frontal"), "Frontal", "AP", {"Edema": "1.0", "Cardiomegaly": "0.0"}),
    ])
    return root


def test_chexpert_u_ones_frontal_by_default(chexpert: Path) -> None:
    samples = load_samples(chexpert / "train.csv")
    assert detect_format(chexpert / "train.csv") == "chexpert" and detect_format(chexpert) == "chexpert"
    assert list(samples.frame.columns) == COLUMNS and samples.task == "multilabel"
    assert set(samples.frame["source"]) == {"chexpert"} and len(samples) == 3  # the lateral view is left out
    assert counts(samples) == {"Cardiomegaly": 1, "Edema": 1, "Effusion": 1, "Atelectasis": 1}
    assert samples.classes == ["Atelectasis", "Cardiomegaly", "Edema", "Effusion"]
    assert [r for _, r in samples.skipped] == ["lateral view (views frontal)"]
    assert all(Path(p).is_file() for p in samples.frame["path"]) and load_image(samples.frame["path"][0]).ndim == 2


def test_chexpert_folder_reads_train_and_valid(chexpert: Path) -> None:
    samples = load_samples(chexpert)
    assert samples.frame["split"].value_counts().to_dict() == {"train": 3, "val": 1}
    assert counts(samples)["Edema"] == 2  # U-Ones: the uncertain one, and the valid set's


@pytest.mark.parametrize("policy, expected, left_out", [
    ("zeros", {"Cardiomegaly": 1, "Effusion": 1}, 0),
    ("ignore", {}, 2),  # both images with an uncertain finding are left out; patient 2 is normal
])
def test_chexpert_uncertain_policies(chexpert: Path, policy: str, expected: dict, left_out: int) -> None:
    samples = load_samples(chexpert / "train.csv", uncertain=policy)
    assert counts(samples) == expected and len(samples) == 3 - left_out
    uncertain = [reason for _, reason in samples.skipped if reason.startswith("uncertain")]
    assert len(uncertain) == left_out
    if left_out:
        assert "uncertain Edema (uncertain policy ignore)" in uncertain


@pytest.mark.parametrize("views, n_images", [("all", 4), ("lateral", 1), ("pa", 2), ("ap", 1), ("frontal", 3)])
def test_chexpert_view_filter(chexpert: Path, views: str, n_images: int) -> None:
    assert len(load_samples(chexpert / "train.csv", views=views)) == n_images


def test_chexpert_patient_from_path_groups_views(chexpert: Path) -> None:
    samples = load_samples(chexpert / "train.csv", views="all")
    assert samples.frame["patient_id"].tolist() == ["patient00001", "patient00001", "patient00002", "patient00003"]
    groups = samples.groups()
    assert groups[0] == groups[1] != groups[2]


def test_chexpert_value_other_than_1_0_minus1_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    _chexpert_csv(root / "train.csv", [
        ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal", "PA", {"Edema": "2"}),
        ("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", "Frontal", "PA", {"Edema": "1"})])
    samples = load_samples(root / "train.csv")
    assert len(samples) == 1 and samples.skipped[0][1] == "a finding value other than 1, 0, -1 or blank"


@pytest.fixture
def mimic(tmp_path: Path) -> Path:
    root = tmp_path / "mimic-cxr-jpg"
    images = [("d1", "10000032", "50414267", "train", "PA"), ("d2", "10000032", "50414267", "train", "LATERAL"),
              ("d3", "10000764", "57375967", "validate", "AP"), ("d4", "11000011", "51111111", "test", "PA"),
              ("d5", "10000764", "57375967", "validate", "AP")]  # d5's file is missing
    for dicom, subject, study, _, _ in images[:4]:
        _jpeg(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
    split = "dicom_id,study_id,subject_id,split\n" + "".join(f"{d},{st},{su},{sp}\n" for d, su, st, sp, _ in images)
    (root / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(split.encode()))
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns\n"
        + "".join(f"{d},{su},{st},CHEST (PA AND LAT),{v},24,32\n" for d, su, st, _, v in images))
    header = ["subject_id", "study_id", *CHEXPERT_FINDINGS]
    labels = [{"subject_id": "10000032", "study_id": "50414267", "Pneumonia": "1.0", "Edema": "-1.0"},
              {"subject_id": "10000764", "study_id": "57375967", "No Finding": "1.0"}]  # no row for study 51111111
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text(
        ",".join(header) + "\n" + "".join(",".join(row.get(c, "") for c in header) + "\n" for row in labels))
    return root


def test_mimic_folder_joins_split_metadata_and_labels(mimic: Path) -> None:
    samples = load_samples(mimic)
    assert detect_format(mimic) == "mimic" and set(samples.frame["source"]) == {"mimic"}
    assert len(samples) == 2 and counts(samples) == {"Pneumonia": 1, "Edema": 1}
    assert samples.frame["split"].tolist() == ["train", "val"]
    assert samples.frame["patient_id"].tolist() == ["10000032", "10000764"]
    assert Path(samples.frame["path"][0]).relative_to(mimic).as_posix() == "files/p10/p10000032/s50414267/d1.jpg"
    reasons = sorted(reason for _, reason in samples.skipped)
    assert reasons == ["file not found", "lateral view (views frontal)",
                       "no label row for study 51111111 in mimic-cxr-2.0.0-chexpert.csv"]


def test_mimic_policies_and_any_of_its_csvs(mimic: Path) -> None:
    assert counts(load_samples(mimic / "mimic-cxr-2.0.0-metadata.csv", uncertain="zeros")) == {"Pneumonia": 1}
    assert len(load_samples(mimic, uncertain="ignore")) == 1
    everything = load_samples(mimic, views="all")
    assert len(everything) == 3 and everything.frame["patient_id"].tolist().count("10000032") == 2


def test_mimic_without_labels_is_one_line(mimic: Path) -> None:
    (mimic / "mimic-cxr-2.0.0-chexpert.csv").unlink()
    with pytest.raises(InputError, match=r"mimic-cxr-jpg: MIMIC-CXR-JPG needs mimic-cxr-2.0.0-split.csv and "):
        load_samples(mimic)


@pytest.fixture
def padchest(tmp_path: Path) -> Path:
    root = tmp_path / "padchest"
    rows = [("a.png", "PA", "['normal']", "p1"), ("b.png", "PA", "['pneumonia', ' infiltrates']", "p1"),
            ("c.png", "L", "['pleural effusion']", "p2"), ("d.png", "AP_horizontal", "['hydropneumothorax', 'scoliosis']", "p3"),
            ("e.png", "PA", "['unclosed", "p4"), ("f.png", "PA", "['scoliosis']", "p5")]
    for i, (image, *_rest) in enumerate(rows):
        _png(root / "0" / image, seed=i)
    lines = ["ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,Projection,MethodProjection,Labels"]
    lines += [f'{image},0,20140101,s{i},{patient},1950,{projection},Manual,"{labels}"'
              for i, (image, projection, labels, patient) in enumerate(rows)]
    (root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv").write_text("\n".join(lines) + "\n")
    return root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"


def test_padchest_terms_map_onto_the_vocabulary(padchest: Path) -> None:
    samples = load_samples(padchest)
    labels = dict(zip(samples.frame["path"].map(lambda p: Path(p).name), samples.frame["label"]))
    assert labels == {"a.png": "", "b.png": "Infiltration|Pneumonia", "d.png": "Effusion|Pneumothorax",
                      "f.png": ""}  # scoliosis lies outside the vocabulary: no vocabulary finding
    reasons = sorted(reason.split(":")[0] for _, reason in samples.skipped)
    assert reasons == ["Labels is not a list of terms", "lateral view (views frontal)"]
    assert samples.frame["patient_id"].tolist() == ["p1", "p1", "p3", "p5"]
    assert len(load_samples(padchest, views="lateral")) == 1 and len(load_samples(padchest, views="ap")) == 1


@pytest.fixture
def rsna(tmp_path: Path, make_dicom) -> Path:
    (tmp_path / "stage_2_train_images").mkdir()
    for i, patient in enumerate(["id-1", "id-2", "id-3"]):
        make_dicom(f"stage_2_train_images/{patient}.dcm", xray_array(24, 32, i), ViewPosition="PA")
    (tmp_path / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\n"
        "id-1,264.0,152.0,213.0,379.0,1\nid-1,562.0,152.0,256.0,453.0,1\n"  # two boxes, one image
        "id-2,,,,,0\nid-3,100.0,100.0,50.0,60.0,1\nid-4,,,,,0\n")  # id-4 has no DICOM
    return tmp_path / "stage_2_train_labels.csv"


def test_rsna_boxes_become_one_image_label(rsna: Path) -> None:
    samples = load_samples(rsna)
    assert detect_format(rsna) == "rsna" and len(samples) == 3
    assert counts(samples) == {"Lung Opacity": 2, "Pneumonia": 2}
    assert samples.frame["patient_id"].tolist() == ["id-1", "id-2", "id-3"]
    assert samples.skipped == [(str(rsna.parent / "stage_2_train_images/id-4.dcm"), "file not found")]
    assert load_image(samples.frame["path"][0]).shape == (24, 32)


def test_rsna_bad_target_is_one_line(rsna: Path) -> None:
    rsna.write_text("patientId,x,y,width,height,Target\nid-1,,,,,yes\n")
    with pytest.raises(InputError, match=r"stage_2_train_labels.csv: row 2: Target must be 0 or 1, not 'yes'"):
        load_samples(rsna)


@pytest.fixture
def vindr(tmp_path: Path, make_dicom) -> Path:
    (tmp_path / "train").mkdir()
    for i, image in enumerate(["img1", "img2", "img3"]):
        make_dicom(f"train/{image}.dicom", xray_array(24, 32, i))
    box = "10,10,50,50"
    rows = [("img1", "R1", "Cardiomegaly"), ("img1", "R2", "Cardiomegaly"), ("img1", "R3", "No finding"),
            ("img2", "R1", "Nodule/Mass"), ("img2", "R1", "Nodule/Mass"), ("img2", "R2", "No finding"),
            ("img2", "R3", "No finding"), ("img3", "R4", "Pleural effusion"), ("img3", "R5", "Pleural effusion"),
            ("img3", "R6", "Aortic enlargement")]
    (tmp_path / "train.csv").write_text("image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n" + "".join(
        f"{image},{name},0,{rad},{box if name != 'No finding' else ',,,'}\n" for image, rad, name in rows))
    return tmp_path / "train.csv"


@pytest.mark.parametrize("raters, expected", [
    ("majority", {"Cardiomegaly": 1, "Effusion": 1}),  # img2's nodule: one radiologist of three (two boxes)
    ("any", {"Cardiomegaly": 1, "Effusion": 1, "Lung Lesion": 1}),
])
def test_vindr_rater_policies(vindr: Path, raters: str, expected: dict) -> None:
    samples = load_samples(vindr, raters=raters)
    assert detect_format(vindr) == "vindr" and len(samples) == 3 and counts(samples) == expected
    assert set(samples.frame["split"]) == {"train"} and set(samples.frame["patient_id"]) == {""}
    assert len(set(samples.groups())) == 3  # no patient ids: each image its own group


def test_vindr_consensus_file_without_raters(vindr: Path) -> None:
    test_csv = vindr.parent / "test.csv"
    test_csv.write_text("image_id,class_name,class_id,x_min,y_min,x_max,y_max\nimg2,Nodule/Mass,8,1,1,5,5\n")
    (vindr.parent / "train" / "img2.dicom").rename(vindr.parent / "img2.dicom")
    samples = load_samples(test_csv)
    assert counts(samples) == {"Lung Lesion": 1} and samples.frame["split"].tolist() == ["test"]


def test_nih_data_entry_with_its_image_folders_and_test_list(tmp_path: Path) -> None:
    for i, name in enumerate(["00000001_000.png", "00000001_001.png", "00000002_000.png"]):
        _png(tmp_path / "images_001" / "images" / name, seed=i)
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
        "00000001_000.png,Cardiomegaly,0,1,57,M,PA\n00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,AP\n"
        "00000002_000.png,No Finding,0,2,81,M,PA\n")
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n")
    samples = load_samples(tmp_path / "Data_Entry_2017_v2020.csv")
    assert set(samples.frame["source"]) == {"nih"} and counts(samples) == {"Cardiomegaly": 2, "Emphysema": 1}
    assert samples.frame["split"].tolist() == ["", "", "test"] and samples.frame["patient_id"].tolist() == ["1", "1", "2"]
    assert len(load_samples(tmp_path / "Data_Entry_2017_v2020.csv", views="pa")) == 2


def test_every_mapping_lands_in_the_vocabulary() -> None:
    targets = {finding for table in MAPPINGS.values() for findings in table.values() for finding in findings}
    assert targets <= set(FINDINGS)
    assert MAPPINGS["chexpert"]["Pleural Effusion"] == ("Effusion",) and MAPPINGS["vindr"]["Pleural effusion"] == ("Effusion",)
    recorded = label_mapping("chexpert", SourceOptions(uncertain="zeros", views="all"))
    assert recorded["uncertain"] == "zeros" and recorded["views"] == "all" and "raters" not in recorded
    assert json.loads(json.dumps(recorded))["findings"]["Pleural Effusion"] == ["Effusion"]


def test_two_data_sets_share_class_names(chexpert: Path, padchest: Path) -> None:
    """Effusion from CheXpert's "Pleural Effusion" and PadChest's "pleural effusion" terms is one class."""
    a = load_samples(chexpert / "train.csv")
    b = load_samples(padchest)
    pooled = a.with_classes(sorted(set(a.classes) | set(b.classes)))
    assert "Effusion" in a.classes and "Effusion" in b.classes
    assert pooled.targets()[:, pooled.classes.index("Effusion")].sum() == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "rsna"}, "missing column(s) Target, patientId"),
    ({"format": "folder"}, "not a folder (format folder)"),
    ({"uncertain": "maybe"}, "data uncertain must be one of ones, zeros, ignore, not 'maybe'"),
    ({"views": "oblique"}, "data views must be one of frontal, pa, ap, lateral, all, not 'oblique'"),
])
def test_wrong_format_or_policy_is_one_line(chexpert: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ChestXrayError) as err:
        load_samples(chexpert / "train.csv", **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_plain_manifest_is_still_a_manifest(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")
    (tmp_path / "labels.csv").write_text("Image Index,Finding Labels,Patient ID\nx.png,Edema,7\n")
    assert set(load_samples(tmp_path / "labels.csv").frame["source"]) == {"manifest"}


def test_train_flags_reach_the_data_options(monkeypatch: pytest.MonkeyPatch, chexpert: Path) -> None:
    from chestxray.cli import app

    seen = {}

    def fake_fit(data, config, runtime, **kwargs):
        seen["options"] = config.source_options()
        raise SystemExit(0)

    monkeypatch.setattr("chestxray.train.fit", fake_fit)
    result = CliRunner().invoke(app, ["train", str(chexpert), "--data-format", "chexpert", "--uncertain", "zeros",
                                      "--views", "all"])
    assert result.exit_code == 0, result.output
    assert seen["options"] == {"format": "chexpert", "uncertain": "zeros", "views": "all", "raters": "majority"}


def test_the_bundle_records_the_label_mapping(chexpert: Path) -> None:
    from chestxray.training.config import TrainConfig
    from chestxray.training.train import _label_mapping

    samples = load_samples(chexpert, uncertain="zeros")
    recorded = _label_mapping(samples, TrainConfig(uncertain="zeros"))["label_mapping"]
    assert list(recorded) == ["chexpert"] and recorded["chexpert"]["uncertain"] == "zeros"
    assert _label_mapping(samples.subset(np.zeros(len(samples), bool)), TrainConfig()) == {}
