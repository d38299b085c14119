"""Class folders, manifests and MedMNIST files all give one sample table; bad sources one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from chestxray.data.decode import load_image
from chestxray.errors import ChestXrayError
from chestxray.data.sources import COLUMNS, load_samples, patient_id_from_name

NUMERIC_CLASSES = ["covid19", "normal", "viral_pneumonia", "bacterial_pneumonia"]  # not alphabetical


def test_class_folders(make_folder):
    root = make_folder({"pneumonia": 3, "normal": 2})
    samples = load_samples(root)
    assert list(samples.frame.columns) == COLUMNS
    assert samples.classes == ["normal", "pneumonia"] and samples.task == "multiclass"
    assert len(samples) == 5 and set(samples.frame["split"]) == {""} and set(samples.frame["source"]) == {"folder"}
    for path, label in zip(samples.frame["path"], samples.frame["label"]):
        assert Path(path).parent.name == label
    np.testing.assert_array_equal(samples.targets(), [samples.classes.index(x) for x in samples.frame["label"]])


@pytest.mark.parametrize("val_folder", ["val", "validation", "valid"])
def test_split_folders(make_folder, val_folder):
    root = make_folder({"train": {"a": 3, "b": 2}, val_folder: {"a": 1, "b": 1}, "test": {"a": 2, "b": 2}})
    samples = load_samples(root)
    assert samples.frame["split"].value_counts().to_dict() == {"train": 5, "test": 4, "val": 2}
    assert samples.classes == ["a", "b"]
    assert len(samples.split("test")) == 4 and set(samples.split("test").frame["split"]) == {"test"}


def _write_class_names(root: Path, kind: str) -> None:
    if kind == "tsv":
        rows = "".join(f"{i}\t{name}\t{name.title()}\n" for i, name in enumerate(NUMERIC_CLASSES))
        (root / "classes.tsv").write_text("label_index\tfolder\toriginal_name\n" + rows)
    elif kind == "json-list":
        (root / "classes.json").write_text(json.dumps(NUMERIC_CLASSES))
    else:
        (root / "classes.json").write_text(json.dumps({str(i): n for i, n in enumerate(NUMERIC_CLASSES)}))


@pytest.mark.parametrize("kind", ["tsv", "json-list", "json-map"])
def test_numeric_folders_are_named_by_the_class_file(make_folder, kind):
    root = make_folder({"train": {"3": 2, "0": 2, "1": 1, "2": 1}, "test": {"0": 1, "3": 1}})
    _write_class_names(root, kind)
    samples = load_samples(root)
    assert samples.classes == NUMERIC_CLASSES
    for path, label in zip(samples.frame["path"], samples.frame["label"]):
        assert label == NUMERIC_CLASSES[int(Path(path).parent.name)]


@pytest.mark.parametrize("file_name, patient", [
    ("person123_bacteria_456.jpeg", "person123"),
    ("person7_virus_13.jpeg", "person7"),
    ("NORMAL2-IM-0173-0001.jpeg", "NORMAL2-IM-0173"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("00000001_000.png", "00000001"),
    ("scan_12.png", ""),
])
def test_patient_id_from_well_known_file_names(file_name, patient):
    assert patient_id_from_name(file_name) == patient


def test_kermany_names_give_patient_ids_in_folders(make_folder):
    def kermany(class_name: str, i: int) -> str:
        return f"person{i // 2}_bacteria_{i}" if class_name == "pneumonia" else f"NORMAL2-IM-{i:04d}-0001"

    root = make_folder({"pneumonia": 4, "normal": 2}, name=kermany, suffix=".jpeg")
    frame = load_samples(root).frame
    assert sorted(frame["patient_id"]) == ["NORMAL2-IM-0000", "NORMAL2-IM-0001",
                                           "person0", "person0", "person1", "person1"]


@pytest.mark.parametrize("sep, suffix", [(",", ".csv"), ("\t", ".tsv")])
def test_manifest_keeps_present_files_and_lists_missing_ones(make_folder, sep, suffix):
    root = make_folder({"a": 2, "b": 2})
    rows = [("a/a_0.png", "a", "p1", "train"), ("a/a_1.png", "a", "", "validation"),
            (str(root / "b/b_0.png"), "b", "p2", "test"), ("b/b_1.png", "b", "p2", "train"),
            ("b/gone.png", "b", "p3", "train")]
    manifest = root / f"list{suffix}"
    manifest.write_text("\n".join(sep.join(r) for r in [("path", "label", "patient_id", "split"), *rows]))
    samples = load_samples(manifest)
    frame = samples.frame
    assert samples.skipped == [(str(root / "b/gone.png"), "file not found")]
    assert len(samples) == 4 and set(frame["source"]) == {"manifest"} and samples.classes == ["a", "b"]
    assert all(Path(p).is_file() for p in frame["path"])
    assert frame["split"].tolist() == ["train", "val", "test", "train"]
    assert frame["patient_id"].tolist() == ["p1", "", "p2", "p2"]


def test_multilabel_manifest_nih_style(make_folder):
    root = make_folder({"img": 4})
    (root / "labels.csv").write_text(
        "Image Index,Finding Labels,Patient ID\n"
        "img/img_0.png,Effusion|Atelectasis,11\n"
        "img/img_1.png,No Finding,11\n"
        "img/img_2.png,Atelectasis,12\n"
        "img/img_3.png,Cardiomegaly|No Finding,13\n")
    samples = load_samples(root / "labels.csv")
    assert samples.task == "multilabel"
    assert samples.classes == ["Atelectasis", "Cardiomegaly", "Effusion"]
    assert samples.frame["label"].tolist() == ["Atelectasis|Effusion", "", "Atelectasis", "Cardiomegaly"]
    assert samples.frame["patient_id"].tolist() == ["11", "11", "12", "13"]
    np.testing.assert_array_equal(samples.targets(), [[1, 0, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0]])


def _medmnist(path: Path, sizes: dict[str, int], n_label_columns: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in sizes.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        high = 2 if n_label_columns > 1 else 3
        arrays[f"{split}_labels"] = rng.integers(0, high, (n, n_label_columns), dtype=np.uint8)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("stem, n_label_columns", [("pneumoniamnist", 1), ("organmnist", 1), ("chestmnist", 3)])
def test_medmnist_npz(tmp_path, stem, n_label_columns):
    sizes = {"train": 6, "val": 2, "test": 3}
    arrays = _medmnist(tmp_path / f"{stem}.npz", sizes, n_label_columns)
    samples = load_samples(tmp_path / f"{stem}.npz")
    assert samples.frame["split"].value_counts().to_dict() == sizes
    assert set(samples.frame["source"]) == {"medmnist"}
    targets = samples.targets()
    for split, n in sizes.items():
        rows = np.flatnonzero(samples.frame["split"] == split)
        labels = arrays[f"{split}_labels"]
        np.testing.assert_array_equal(targets[rows], labels if n_label_columns > 1 else labels[:, 0])
        np.testing.assert_array_equal(load_image(samples.frame["path"][rows[-1]]), arrays[f"{split}_images"][n - 1])
    assert samples.task == ("multilabel" if n_label_columns > 1 else "multiclass")
    if stem == "pneumoniamnist":
        assert samples.classes == ["normal", "pneumonia"]


def test_expected_classes_reorder_or_refuse(make_folder):
    root = make_folder({"a": 1, "b": 1})
    assert load_samples(root, classes=["b", "a", "c"]).classes == ["b", "a", "c"]
    with pytest.raises(ChestXrayError, match="unknown to the expected classes"):
        load_samples(root, classes=["a"])


def _bad_source(case: str, tmp_path: Path, make_folder) -> tuple[Path, str]:
    """A source that is wrong as ``case`` says, and the words its error must contain."""
    if case == "missing":
        return tmp_path / "nope", "no such file"
    if case == "empty-folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", "no labelled images"
    if case == "unknown-type":
        (tmp_path / "data.json").write_text("{}")
        return tmp_path / "data.json", "not a folder"
    if case == "manifest-missing-column":
        (tmp_path / "m.csv").write_text("file,diagnosis\nx.png,a\n")
        return tmp_path / "m.csv", "missing column(s) label"
    if case == "manifest-all-paths-missing":
        (tmp_path / "m.csv").write_text("path,label\nx.png,a\ny.png,b\n")
        return tmp_path / "m.csv", "x.png: file not found"
    if case == "bad-class-file":
        root = make_folder({"0": 1})
        (root / "classes.tsv").write_text("id\tthing\n0\tcovid\n")
        return root / "classes.tsv", "missing index or name column"
    if case == "empty-npz":
        (tmp_path / "m.npz").write_bytes(b"")
        return tmp_path / "m.npz", "not a readable medmnist"
    np.savez(tmp_path / "m.npz", images=np.zeros((2, 4, 4)))
    return tmp_path / "m.npz", "no train_labels"


@pytest.mark.parametrize("case", ["missing", "empty-folder", "unknown-type", "manifest-missing-column",
                                  "manifest-all-paths-missing", "bad-class-file", "empty-npz", "npz-without-labels"])
def test_bad_sources_raise_one_line_naming_the_file(tmp_path, make_folder, case):
    path, reason = _bad_source(case, tmp_path, make_folder)
    with pytest.raises(ChestXrayError) as err:
        load_samples(path if case != "bad-class-file" else path.parent)
    message = str(err.value)
    assert str(path) in message and reason in message.lower() and "\n" not in message, message


def test_course_dataset(course_data):
    samples = load_samples(course_data)
    order = [line.split("\t")[1] for line in (course_data / "classes.tsv").read_text().splitlines()[1:]]
    assert samples.classes == order and len(order) == 4
    assert samples.frame["split"].value_counts().to_dict() == {"train": 528, "test": 40}
    assert samples.split("test").frame["label"].value_counts().to_dict() == dict.fromkeys(order, 10)
    kermany = samples.frame[samples.frame["label"] != "covid19"]
    assert (kermany["patient_id"] != "").all()


def test_pneumoniamnist(pneumoniamnist):
    samples = load_samples(pneumoniamnist)
    counts = samples.frame.groupby(["split", "label"]).size().to_dict()
    official = {"train": (1214, 3494), "val": (135, 389), "test": (234, 390)}  # MedMNIST v2 paper
    assert counts == {(s, c): n for s, ns in official.items() for c, n in zip(["normal", "pneumonia"], ns)}
    assert load_image(samples.frame["path"].iloc[-1]).shape == (28, 28)


@pytest.mark.parametrize("n_images, n_labels, compressed", [(10, 5, False), (5, 10, True), (0, 3, False)])
def test_medmnist_arrays_of_different_lengths_are_refused(tmp_path: Path, n_images: int, n_labels: int,
                                                          compressed: bool) -> None:
    arrays = {"train_images": np.zeros((n_images, 28, 28), np.uint8), "train_labels": np.zeros((n_labels, 1), np.uint8),
              "test_images": np.zeros((2, 28, 28), np.uint8), "test_labels": np.zeros((2, 1), np.uint8)}
    (np.savez_compressed if compressed else np.savez)(tmp_path / "m.npz", **arrays)
    with pytest.raises(ChestXrayError) as raised:
        load_samples(tmp_path / "m.npz")
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path / "m.npz") in message
    assert f"train_images holds {n_images} images but train_labels {n_labels} labels" in message


def test_medmnist_labels_without_images_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "m.npz", train_labels=np.zeros((4, 1), np.uint8))
    with pytest.raises(ChestXrayError, match="train_labels has 4 labels but there is no train_images array"):
        load_samples(tmp_path / "m.npz")


def _unreadable(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Listing ``folder`` fails as it does for a mode-000 folder (tests run as root, whom permission
    bits do not stop): ``os.scandir`` (which ``os.walk`` and ``Path.rglob`` use) and ``os.listdir``
    (``Path.iterdir``) raise."""
    import os

    def refusing(real):
        def listing(path=".", *args):
            if Path(path) == folder:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args)
        return listing

    monkeypatch.setattr(os, "scandir", refusing(os.scandir))
    monkeypatch.setattr(os, "listdir", refusing(os.listdir))


def test_an_unreadable_class_subfolder_is_reported_not_skipped_unsaid(make_folder, monkeypatch) -> None:
    root = make_folder({"normal": 2, "pneumonia": 2})
    (root / "pneumonia" / "more").mkdir()
    (root / "pneumonia" / "more" / "x.png").write_bytes((root / "normal").joinpath(
        sorted(p.name for p in (root / "normal").iterdir())[0]).read_bytes())
    _unreadable(monkeypatch, root / "pneumonia" / "more")
    samples = load_samples(root)
    assert len(samples) == 4
    assert samples.skipped == [(str(root / "pneumonia" / "more"), "cannot read this folder (Permission denied)")]


def test_an_unreadable_data_folder_is_one_line(make_folder, monkeypatch) -> None:
    root = make_folder({"normal": 2, "pneumonia": 2})
    _unreadable(monkeypatch, root)
    with pytest.raises(ChestXrayError, match="cannot read this folder \\(Permission denied\\)") as raised:
        load_samples(root)
    assert str(raised.value).startswith(str(root)) and "\n" not in str(raised.value)
