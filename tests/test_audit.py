"""The dataset audit on tiny synthetic datasets built to contain each problem once, and on the
real course dataset (figures checked against an independent count of its files)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from chestxray.data.audit import AGAINST_SCOPE, NEAR_DUPLICATE_MAX_DISTANCE, AuditReport, audit, render_terminal
from chestxray.errors import ChestXrayError

NORMAL_SIZE, PNEUMONIA_SIZE = (64, 80), (72, 56)  # (height, width): classes differ in size and format


def textured(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Random texture at three scales: unrelated images are far apart in perceptual hash."""
    image = np.zeros((height, width), np.float32)
    for cells, amplitude in ((4, 90.0), (12, 50.0), (max(height, width) // 3, 30.0)):
        noise = rng.normal(0, amplitude, (cells, cells)).astype(np.float32)
        image += cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(image + 128, 0, 255).astype(np.uint8)


def write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def build_dataset(root: Path) -> dict:
    """train/test class folders with one exact copy across splits, one near copy within train,
    one patient in both splits, a corrupt file and a truncated one. Returns what was planted."""
    rng = np.random.default_rng(0)
    files: dict[tuple[str, str], list[Path]] = {}

    def add(split: str, label: str, name: str, image: np.ndarray | None = None) -> Path:
        size = NORMAL_SIZE if label == "normal" else PNEUMONIA_SIZE
        path = write(root / split / label / name, textured(rng, *size) if image is None else image)
        files.setdefault((split, label), []).append(path)
        return path

    for i in range(6):
        add("train", "normal", f"IM-{i:04d}-0001.png")
        add("train", "pneumonia", f"person{10 + i}_virus_{i}.jpeg")
    for i in range(3):
        add("test", "normal", f"IM-{100 + i:04d}-0001.png")
        add("test", "pneumonia", f"person{100 + i}_bacteria_{i}.jpeg")
    shared_patient = add("test", "pneumonia", "person10_bacteria_90.jpeg")
    original = files[("train", "normal")][0]
    exact_copy = root / "test" / "normal" / "IM-0200-0001.png"
    shutil.copyfile(original, exact_copy)
    files[("test", "normal")].append(exact_copy)
    source = cv2.imread(str(files[("train", "pneumonia")][1]), cv2.IMREAD_GRAYSCALE)
    brighter = np.clip(source.astype(np.float32) * 1.1, 0, 255).astype(np.uint8)
    near_copy = add("train", "pneumonia", "person30_virus_30.jpeg",
                    cv2.resize(brighter, (source.shape[1] * 4 // 5, source.shape[0] * 4 // 5),
                               interpolation=cv2.INTER_AREA))
    corrupt = root / "train" / "normal" / "IM-0300-0001.png"
    corrupt.write_bytes(b"this is not a PNG file")
    files[("train", "normal")].append(corrupt)
    truncated = add("train", "pneumonia", "person40_virus_40.jpeg")  # header reads, pixels do not
    truncated.write_bytes(truncated.read_bytes()[:-200])
    return {"files": files, "exact": (original, exact_copy), "near": (files[("train", "pneumonia")][1], near_copy),
            "unreadable": {corrupt: "not a readable image", truncated: "truncated JPEG"},
            "shared_patient": ("person10", shared_patient)}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[AuditReport, dict, Path]:
    base = tmp_path_factory.mktemp("audit")
    plan = build_dataset(base / "data")
    report = audit(base / "data", out_dir=base / "out", cache_dir=base / "cache", progress=False)
    return report, plan, base


def test_counts_per_class_and_split(planted):
    report, plan, _ = planted
    expected: dict[str, dict[str, int]] = {}
    for (split, label), paths in plan["files"].items():
        expected.setdefault(split, {})[label] = len(paths)
    assert report.counts == expected
    assert report.images == sum(len(p) for p in plan["files"].values())
    assert list(report.counts) == ["train", "test"]


def test_image_properties_by_class(planted):
    report, plan, _ = planted
    for label, (height, width), suffix in (("normal", NORMAL_SIZE, "PNG"), ("pneumonia", PNEUMONIA_SIZE, "JPEG")):
        readable = [p for (_, lab), paths in plan["files"].items() if lab == label for p in paths
                    if p not in plan["unreadable"]]
        stats = report.image_stats[label]
        assert stats.images == len(readable)
        assert stats.formats == {suffix: len(readable)}
        assert stats.modes == {"L": len(readable)} and stats.bit_depths == {"8": len(readable)}
        widths = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).shape[1] for p in readable]
        assert (stats.width.min, stats.width.median, stats.width.max) == (min(widths), np.median(widths), max(widths))
        assert stats.height.max == height and stats.width.max == width
        sizes = [p.stat().st_size for p in readable]
        assert stats.file_bytes.median == np.median(sizes)


def test_corrupt_and_truncated_files_are_unreadable_with_reason(planted):
    report, plan, _ = planted
    assert {issue.path for issue in report.unreadable} == {str(p) for p in plan["unreadable"]}
    for issue in report.unreadable:
        assert plan["unreadable"][Path(issue.path)] in issue.reason
    assert any(f.startswith(f"{len(plan['unreadable'])} unreadable files") for f in report.findings)


def test_exact_copy_across_splits_is_leakage(planted):
    report, plan, _ = planted
    exact = [p for p in report.duplicates if p.kind == "exact"]
    assert len(exact) == 1
    pair = exact[0]
    assert (pair.path_a, pair.path_b) == tuple(str(p) for p in plan["exact"])
    assert (pair.scope, pair.distance, pair.split_a, pair.split_b) == ("train vs test", 0, "train", "test")
    test_images = sum(report.counts["test"].values())
    assert any(f.startswith(f"leakage: 1 of {test_images} test images") for f in report.findings)


def test_near_copy_within_train_and_nothing_else(planted):
    report, plan, _ = planted
    near = [p for p in report.duplicates if p.kind == "near"]
    assert [(p.path_a, p.path_b) for p in near] == [tuple(str(p) for p in plan["near"])]
    assert near[0].scope == "within train"
    assert any(f.startswith("1 duplicate pair within a split") for f in report.findings)  # not "1 ... pairs"
    assert 0 < near[0].distance <= NEAR_DUPLICATE_MAX_DISTANCE


def test_unrelated_images_are_far_apart(planted):
    _, plan, base = planted
    table = pd.read_csv(base / "out" / "images.csv", keep_default_na=False)
    planted_copies = {str(plan["exact"][1]), str(plan["near"][1]), *map(str, plan["unreadable"])}
    hashes = np.array([np.frombuffer(bytes.fromhex(h), np.uint64) for p, h in zip(table["path"], table["phash"])
                       if p not in planted_copies])
    distances = [int(np.bitwise_count(a ^ b).sum()) for n, a in enumerate(hashes) for b in hashes[n + 1:]]
    assert min(distances) > 2 * NEAR_DUPLICATE_MAX_DISTANCE


def test_patient_in_train_and_test(planted):
    report, plan, _ = planted
    patient, test_file = plan["shared_patient"]
    train_files = [p for p in plan["files"][("train", "pneumonia")] if p.name.startswith(f"{patient}_")]
    assert [o.patient_id for o in report.patient_overlap] == [patient]
    overlap = report.patient_overlap[0]
    assert overlap.images == {"train": len(train_files), "test": 1}
    assert overlap.labels == ["pneumonia"]
    assert test_file.name.startswith(patient)


def test_shortcut_flags_classes_that_differ_by_format(planted):
    report, _, _ = planted
    check = report.shortcut
    readable = report.images - len(report.unreadable)
    assert check.images == readable and check.folds == 5
    assert check.chance == pytest.approx(max(s.images for s in report.image_stats.values()) / readable, abs=1e-4)
    assert check.accuracy > 0.9 and check.flagged
    assert any(f.startswith("shortcut:") for f in report.findings)


def test_shortcut_not_flagged_when_metadata_is_alike(tmp_path):
    rng = np.random.default_rng(1)
    for label in ("a", "b"):
        for i in range(10):
            write(tmp_path / "data" / label / f"{label}{i}.png", textured(rng, 48, 48))
    report = audit(tmp_path / "data", out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert report.shortcut.accuracy is not None and not report.shortcut.flagged
    assert report.duplicates == [] and report.patient_overlap == [] and list(report.counts) == ["unsplit"]
    assert not any(f.startswith(("shortcut", "leakage")) for f in report.findings)


def test_against_finds_copies_in_the_other_dataset(planted, tmp_path):
    _, plan, base = planted
    copied = plan["files"][("test", "pneumonia")][0]
    other = tmp_path / "other" / "pneumonia"
    other.mkdir(parents=True)
    shutil.copyfile(copied, other / "copy.jpeg")
    write(other / "unrelated.png", textured(np.random.default_rng(7), 50, 50))
    report = audit(base / "data", against=tmp_path / "other", out_dir=tmp_path / "out",
                   cache_dir=base / "cache", progress=False)
    against = [p for p in report.duplicates if p.scope == AGAINST_SCOPE]
    assert [(p.kind, p.path_a, p.path_b) for p in against] == [("exact", str(copied), str(other / "copy.jpeg"))]
    assert report.against_images == 2


def test_report_files(planted, tmp_path):
    report, _, base = planted
    assert json.loads(Path(report.files["json"]).read_text()) == json.loads(report.to_json())
    markdown = Path(report.files["report"]).read_text()
    assert report.files["report"].endswith("audit.md") and "## Duplicates" in markdown
    html_report = audit(base / "data", out_dir=tmp_path / "html", cache_dir=base / "cache", fmt="html",
                        progress=False)
    page = Path(html_report.files["report"]).read_text()
    assert page.startswith("<!doctype html>") and "<table>" in page and "<h2>Duplicates</h2>" in page


def test_render_terminal(planted):
    report, _, _ = planted
    console = Console(record=True, width=200)
    render_terminal(report, console)
    text = console.export_text()
    assert all(name in text for name in ("normal", "pneumonia", "train", "test"))
    assert all(finding[:40] in text for finding in report.findings)


def test_medmnist_npz(tmp_path):
    rng = np.random.default_rng(2)
    train = np.stack([textured(rng, 28, 28) for _ in range(8)])
    test = np.stack([textured(rng, 28, 28) for _ in range(4)])
    test[0] = train[3]
    labels = {"train_labels": np.array([[0], [1]] * 4), "test_labels": np.array([[0], [1]] * 2)}
    np.savez(tmp_path / "tiny.npz", train_images=train, test_images=test, **labels)
    report = audit(tmp_path / "tiny.npz", out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert report.counts == {"train": {"class0": 4, "class1": 4}, "test": {"class0": 2, "class1": 2}}
    assert report.image_stats["class0"].formats == {"NPZ": 6}
    assert report.image_stats["class0"].width.max == 28
    assert [(p.kind, p.path_a.endswith("::train/3"), p.path_b.endswith("::test/0")) for p in report.duplicates] \
        == [("exact", True, True)]
    assert report.shortcut.accuracy is None and "same metadata" in report.shortcut.note


def test_csv_manifest_with_missing_file(tmp_path):
    rng = np.random.default_rng(3)
    rows = []
    for i in range(6):
        label = "normal" if i % 2 else "pneumonia"
        write(tmp_path / "img" / f"{i}.png", textured(rng, 40, 40))
        rows.append({"path": f"img/{i}.png", "label": label, "patient_id": f"p{i // 2}",
                     "split": "test" if i == 5 else "train"})
    rows.append({"path": "img/missing.png", "label": "normal", "patient_id": "p9", "split": "train"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    report = audit(tmp_path / "labels.csv", out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert report.counts == {"train": {"pneumonia": 3, "normal": 2}, "test": {"normal": 1}}
    assert [(s.path.endswith("missing.png"), s.reason) for s in report.skipped] == [(True, "file not found")]
    assert [o.patient_id for o in report.patient_overlap] == ["p2"]
    assert any(f.startswith("1 entry skipped (manifest rows, unreadable folders): file not found")
               for f in report.findings)  # one row: singular


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ChestXrayError, match="no such file or folder"):
        audit(tmp_path / "nothing", out_dir=tmp_path / "out")
    with pytest.raises(ChestXrayError, match="report format"):
        audit(tmp_path, out_dir=tmp_path / "out", fmt="pdf")


@pytest.mark.slow
def test_course_dataset(course_data, tmp_path):
    report = audit(course_data, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    files = [p for p in course_data.glob("*/*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    expected: dict[str, dict[str, int]] = {}
    for path in files:
        split, label = path.parts[-3], path.parts[-2]
        expected.setdefault(split, {}).setdefault(label, 0)
        expected[split][label] += 1
    assert {s: dict(sorted(c.items())) for s, c in report.counts.items()} == \
        {s: dict(sorted(expected[s].items())) for s in ("train", "test")}
    persons = {split: {m.group(1) for p in files if p.parts[-3] == split
                       for m in [re.match(r"(person\d+)_", p.name)] if m} for split in ("train", "test")}
    assert {o.patient_id for o in report.patient_overlap} == persons["train"] & persons["test"] != set()
    by_hash: dict[str, set[str]] = {}
    for path in files:
        by_hash.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), set()).add(path.parts[-3])
    copied_into_test = sum(1 for splits in by_hash.values() if splits == {"train", "test"})
    exact_cross = [p for p in report.duplicates if p.kind == "exact" and p.scope == "train vs test"]
    assert len(exact_cross) == copied_into_test
    assert report.unreadable == [] and report.shortcut.flagged


def test_a_damaged_dicom_is_listed_and_the_audit_goes_on(make_folder, make_dicom, tmp_path):
    """Issue 17: a DICOM whose header is damaged (an unknown value representation) aborted the audit."""
    import struct

    root = make_folder({"normal": 3, "pneumonia": 3})
    data = bytearray(make_dicom("x.dcm", np.full((16, 16), 100, np.uint16), BitsStored=12).read_bytes())
    at = data.index(struct.pack("<HH", 0x0002, 0x0010), 132)  # the transfer syntax, read with the header
    data[at + 4:at + 6] = b"ZZ"
    damaged = root / "normal" / "damaged.dcm"
    damaged.write_bytes(bytes(data))
    report = audit(root, out_dir=tmp_path / "report")
    assert [issue.path for issue in report.unreadable] == [str(damaged)]
    assert report.unreadable[0].reason and report.images == 7


def test_audit_warns_of_an_unreadable_class_folder(make_folder, tmp_path: Path, monkeypatch) -> None:
    from test_sources import _unreadable

    root = make_folder({"normal": 3, "pneumonia": 3})
    _unreadable(monkeypatch, root / "pneumonia")
    report = audit(root, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert [(s.path, s.reason) for s in report.skipped] == [(str(root / "pneumonia"),
                                                            "cannot read this folder (Permission denied)")]
    assert any("unreadable folders" in f and "cannot read this folder" in f for f in report.findings)


@pytest.mark.parametrize("near_distance", [NEAR_DUPLICATE_MAX_DISTANCE, 116])
def test_indexed_search_finds_the_pairs_of_comparing_every_pair(planted, tmp_path, monkeypatch, near_distance):
    """Issue 26: the audit's near-duplicate search (an index) reports exactly the pairs that comparing
    every pair of the hashes in images.csv gives, also at a threshold loose enough to pair unrelated
    images."""
    import chestxray.data.audit as audit_module

    _, _, base = planted
    search = audit_module.close_pairs
    monkeypatch.setattr(audit_module, "close_pairs", lambda a, b, d: search(a, b, d, method="index"))
    report = audit(base / "data", out_dir=tmp_path, cache_dir=base / "cache", progress=False,
                   near_distance=near_distance)
    images = pd.read_csv(report.files["images"], keep_default_na=False)
    images = images[images["problem"] == ""]
    hashes = np.stack([np.frombuffer(bytes.fromhex(h), dtype=np.uint64) for h in images["phash"]])
    distance = sum(np.bitwise_count(hashes[:, None, w] ^ hashes[None, :, w]) for w in range(hashes.shape[1]))
    paths = images["path"].tolist()
    expected = {(frozenset((paths[i], paths[j])), int(distance[i, j])) for i, j in zip(*np.nonzero(distance <= near_distance))
                if i < j}
    found = {(frozenset((p.path_a, p.path_b)), p.distance) for p in report.duplicates}
    assert found == expected
    assert len(expected) >= (2 if near_distance == NEAR_DUPLICATE_MAX_DISTANCE else 10)
    assert report.near_duplicate_note == ""
