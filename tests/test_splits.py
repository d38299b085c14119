"""Stratified, patient-grouped splits and k-fold: no patient on both sides, reproducible, saved."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from chestxray.errors import ChestXrayError
from chestxray.data.sources import COLUMNS, Samples, load_samples
from chestxray.data.splits import kfold_splits, load_split, save_split, train_val_split


def table(labels: list[str], patients: list[str], splits: list[str] | None = None, task: str = "multiclass",
          classes: list[str] | None = None) -> Samples:
    """Samples without files: splitting only reads the table."""
    frame = pd.DataFrame({"path": [f"/data/img{i}.png" for i in range(len(labels))], "label": labels,
                          "split": splits or [""] * len(labels), "patient_id": patients, "source": "test"},
                         columns=COLUMNS)
    names = classes or sorted({n for label in labels for n in label.split("|") if n})
    return Samples(frame, names, task, origin="/data")


@pytest.fixture
def patients_table() -> Samples:
    """150 patients with 1-3 images each, three unbalanced classes, some images of unknown patient."""
    rng = np.random.default_rng(1)
    labels, patients = [], []
    for patient in range(150):
        label = rng.choice(["normal", "viral", "bacterial"], p=[0.5, 0.3, 0.2])
        for _ in range(rng.integers(1, 4)):
            labels.append(str(label))
            patients.append(f"p{patient}" if patient % 10 else "")
    return table(labels, patients)


def assert_patients_apart(samples: Samples, train: np.ndarray, val: np.ndarray) -> None:
    groups = samples.groups()
    assert not set(groups[train]) & set(groups[val])


def test_train_val_split_is_stratified_grouped_and_reproducible(patients_table):
    train, val = train_val_split(patients_table, seed=3)
    assert sorted(np.concatenate([train, val])) == list(range(len(patients_table)))
    assert 0.15 < len(val) / len(patients_table) < 0.25
    assert_patients_apart(patients_table, train, val)
    labels = patients_table.frame["label"]
    overall, held_out = labels.value_counts(normalize=True), labels[val].value_counts(normalize=True)
    assert (overall - held_out).abs().max() < 0.05
    again = train_val_split(patients_table, seed=3)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(train_val_split(patients_table, seed=4)[1], val)


def test_kfold_puts_every_row_in_exactly_one_validation_fold(patients_table):
    folds = kfold_splits(patients_table, k=4, seed=0)
    assert len(folds) == 4
    counts = np.zeros(len(patients_table), dtype=int)
    for train, val in folds:
        counts[val] += 1
        assert sorted(np.concatenate([train, val])) == list(range(len(patients_table)))
        assert_patients_apart(patients_table, train, val)
    assert (counts == 1).all()
    again = kfold_splits(patients_table, k=4, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))


def test_given_val_split_is_used_and_test_rows_never(patients_table):
    n = len(patients_table)
    splits = ["test" if i % 7 == 0 else "val" if i % 5 == 0 else "train" for i in range(n)]
    given = table(patients_table.frame["label"].tolist(), patients_table.frame["patient_id"].tolist(), splits)
    train, val = train_val_split(given)
    assert set(given.frame["split"][train]) == {"train"} and set(given.frame["split"][val]) == {"val"}
    assert len(train) + len(val) == splits.count("train") + splits.count("val")

    no_val = table(given.frame["label"].tolist(), given.frame["patient_id"].tolist(),
                   [s if s == "test" else "train" for s in splits])
    train, val = train_val_split(no_val)
    assert sorted(np.concatenate([train, val])) == np.flatnonzero(no_val.frame["split"] != "test").tolist()


@pytest.mark.filterwarnings("ignore:The least populated class")
def test_multilabel_split_with_rare_label_combinations():
    rng = np.random.default_rng(0)
    names = ["Atelectasis", "Effusion", "Nodule"]
    labels = ["|".join(sorted(rng.choice(names, rng.integers(0, 3), replace=False))) for _ in range(80)]
    labels[0] = "|".join(names)  # a combination seen once
    samples = table(labels, [f"p{i // 2}" for i in range(80)], task="multilabel", classes=names)
    train, val = train_val_split(samples)
    assert_patients_apart(samples, train, val)
    assert samples.targets()[val].sum(axis=0).min() > 0


def test_single_multilabel_positive_is_refused():
    labels = ["Effusion", "Effusion", "", "", "Nodule|Effusion"]
    samples = table(labels, ["a", "b", "c", "d", "e"], task="multilabel")
    with pytest.raises(ChestXrayError, match="'Nodule' \\(1\\)"):
        train_val_split(samples)


@pytest.mark.parametrize("call, reason", [
    (lambda s: train_val_split(s), "class 'covid' (1) has fewer than 2 images"),
    (lambda s: kfold_splits(s, k=3), "class 'covid' (1) has fewer than 2 images"),
    (lambda s: kfold_splits(s, k=1), "at least 2 folds"),
    (lambda s: train_val_split(s, val_fraction=1.5), "between 0 and 1"),
])
def test_bad_split_requests_raise_one_line(call, reason):
    samples = table(["normal"] * 4 + ["pneumonia"] * 4 + ["covid"], [f"p{i}" for i in range(9)])
    with pytest.raises(ChestXrayError) as err:
        call(samples)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_save_and_load_split(patients_table, tmp_path):
    train, val = train_val_split(patients_table)
    path = save_split(tmp_path / "split.csv", patients_table, {"train": train, "val": val})
    loaded = load_split(path, patients_table)
    assert loaded.keys() == {"train", "val"}
    np.testing.assert_array_equal(loaded["train"], train)
    np.testing.assert_array_equal(loaded["val"], val)

    fewer = patients_table.subset(np.arange(1, len(patients_table)))
    with pytest.raises(ChestXrayError, match="not in the data"):
        load_split(path, fewer)
    for bad in (tmp_path / "missing.csv", tmp_path / "other.csv"):
        if bad.name == "other.csv":
            bad.write_text("a,b\n1,2\n")
        with pytest.raises(ChestXrayError) as err:
            load_split(bad, patients_table)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_course_dataset_split_keeps_patients_apart(course_data):
    samples = load_samples(course_data)
    train, val = train_val_split(samples)
    assert set(samples.frame["split"][np.concatenate([train, val])]) == {"train"}
    assert_patients_apart(samples, train, val)
    assert samples.frame["patient_id"][val].str.startswith("person").any()


def test_fewer_patients_than_folds_is_refused_in_one_line():
    """Many images but 3 patients: sklearn's own error would be a traceback deep in StratifiedGroupKFold."""
    samples = table(["normal", "pneumonia"] * 6, ["a", "b", "c"] * 4)
    for call in (lambda: kfold_splits(samples, k=5), lambda: train_val_split(samples, val_fraction=0.2)):
        with pytest.raises(ChestXrayError) as err:
            call()
        assert "3 patient(s) cannot be split 5 ways" in str(err.value) and "\n" not in str(err.value)
    assert len(kfold_splits(samples, k=3)) == 3
