"""Public chest X-ray data sets read from their own label files: CheXpert, MIMIC-CXR-JPG, PadChest,
RSNA Pneumonia, VinDr-CXR and NIH ChestX-ray14, each adapter mapping its labels onto
:data:`~chestxray.data.vocabulary.FINDINGS` under the policies of
:class:`~chestxray.data.vocabulary.SourceOptions` (docs/public-datasets.md lists the columns read).

:func:`detect_format` tells them from their file and column names; :func:`read_public` returns plain
rows, which :mod:`chestxray.data.sources` makes a ``Samples`` table.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ..constants import SET_SEPARATOR
from ..errors import InputError
from .vocabulary import MAPPINGS, NO_FINDING, PUBLIC_FORMATS, SourceOptions, view_kept, view_kind

__all__ = ["PublicRows", "detect_format", "read_public"]

_MIMIC_PREFIX = "mimic-cxr-2.0.0-"
_PATIENT_IN_PATH = re.compile(r"(patient\d+)")
_CHEXPERT, _NIH, _PADCHEST, _RSNA, _VINDR = (MAPPINGS[name] for name in ("chexpert", "nih", "padchest", "rsna", "vindr"))


@dataclass
class PublicRows:
    """An adapter's result: one dict per image (``path``, ``label``, ``split``, ``patient_id``,
    ``source``), the findings present (sorted), and the images left out with the reason."""

    rows: list[dict[str, str]]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    format: str = ""


def detect_format(path: Path) -> str | None:
    """The public data set ``path`` is (a label file, or the folder of MIMIC's or CheXpert's CSVs),
    from its file names and column names; ``None`` for anything else (a class folder, a manifest)."""
    if path.is_dir():
        if _mimic_file(path, "split") is not None:
            return "mimic"
        if any(_columns(path / name) >= {"Path", "Frontal/Lateral"} for name in ("train.csv", "valid.csv")):
            return "chexpert"
        return None
    if path.name.startswith(_MIMIC_PREFIX):
        return "mimic"
    if path.suffix.lower() not in (".csv", ".tsv", ".txt", ".gz"):
        return None
    columns = _columns(path)
    for name, needed in (("chexpert", {"Path", "Frontal/Lateral"}), ("padchest", {"ImageID", "PatientID", "Labels"}),
                         ("rsna", {"patientId", "Target"}), ("vindr", {"image_id", "class_name"}),
                         ("nih", {"Image Index", "Finding Labels", "View Position"})):
        if columns >= needed:
            return name
    return None


def read_public(path: Path, options: SourceOptions) -> PublicRows | None:
    """Read ``path`` with ``options.format``'s adapter (detected for ``auto``); ``None`` when the
    format is not a public data set's (the caller reads folders, manifests and npz files)."""
    name = detect_format(path) if options.format == "auto" else options.format
    if name not in PUBLIC_FORMATS:
        return None
    if path.is_dir() and name not in ("mimic", "chexpert"):
        raise InputError(path, f"a folder; the {name} format reads its label CSV file")
    result = _READERS[name](path, options)
    result.format = name
    return result


def _columns(path: Path) -> set[str]:
    """The header of a CSV file (empty when it is none)."""
    if not path.is_file():
        return set()
    try:
        return {str(c).strip() for c in pd.read_csv(path, nrows=0, sep="\t" if path.suffix.lower() == ".tsv" else ",").columns}
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, EOFError):
        return set()


def _read_csv(path: Path, needed: set[str]) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, EOFError) as err:
        raise InputError(path, f"malformed label file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = sorted(needed - set(table.columns))
    if missing:
        raise InputError(path, f"missing column(s) {', '.join(missing)} (found: {', '.join(table.columns)})")
    return table


def _split_of(path: Path) -> str:
    """The split a label file's name says (``valid.csv`` -> ``val``), else ``""``."""
    stem = path.name.lower()
    for token, split in (("test", "test"), ("valid", "val"), ("val", "val"), ("train", "train")):
        if token in stem:
            return split
    return ""


def _first_file(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def _row(file: Path, findings: set[str], split: str, patient: str, source: str) -> dict[str, str]:
    return {"path": str(file), "label": SET_SEPARATOR.join(sorted(findings)), "split": split,
            "patient_id": patient, "source": source}


def _result(rows: list[dict[str, str]], skipped: list[tuple[str, str]]) -> PublicRows:
    classes = sorted({name for row in rows for name in row["label"].split(SET_SEPARATOR) if name})
    return PublicRows(rows, classes, skipped)


def _need_views(path: Path, table: pd.DataFrame, column: str, options: SourceOptions) -> None:
    if options.views != "all" and column not in table.columns:
        raise InputError(path, f"no {column} column, so views={options.views} cannot be applied (use views all)")


# CheXpert and MIMIC-CXR: 1 present, 0 or blank absent, -1 uncertain

def _chexpert_values(path: Path, table: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The finding columns as numbers (blank = 0), and which rows hold a value that is none of 1, 0, -1."""
    columns = [c for c in _CHEXPERT if c in table.columns]
    if not columns:
        raise InputError(path, f"none of the finding columns ({', '.join(_CHEXPERT)})")
    values = table[columns].apply(lambda col: pd.to_numeric(col.str.strip().replace("", "0"), errors="coerce"))
    bad = (values.isna() | ~values.isin([1, 0, -1])).any(axis=1).to_numpy()
    return values.fillna(0), bad


def _chexpert_findings(values: pd.DataFrame, uncertain: str) -> tuple[list[set[str]], list[list[str]]]:
    """Per row: the vocabulary findings present under the ``uncertain`` policy, and the uncertain ones."""
    positive = values.to_numpy() == 1
    doubtful = values.to_numpy() == -1
    if uncertain == "ones":
        positive = positive | doubtful
    names = [_CHEXPERT[c][0] for c in values.columns]
    found = [{names[j] for j in np.flatnonzero(row)} for row in positive]
    unsure = [[names[j] for j in np.flatnonzero(row)] for row in doubtful]
    return found, unsure


def _uncertain_reason(unsure: list[str], options: SourceOptions) -> str | None:
    if options.uncertain == "ignore" and unsure:
        return f"uncertain {', '.join(unsure)} (uncertain policy ignore)"
    return None


def _read_chexpert(path: Path, options: SourceOptions) -> PublicRows:
    files = [path / n for n in ("train.csv", "valid.csv") if (path / n).is_file()] if path.is_dir() else [path]
    rows, skipped = [], []
    for csv in files:
        table = _read_csv(csv, {"Path"})
        _need_views(csv, table, "Frontal/Lateral", options)
        values, bad = _chexpert_values(csv, table)
        found, unsure = _chexpert_findings(values, options.uncertain)
        split = _split_of(csv)
        for i, record in enumerate(table.to_dict("records")):
            file = _resolve_relative(csv.parent, record["Path"])
            kind = _chexpert_view(record)
            reason = ("file not found" if not file.is_file() else
                      "a finding value other than 1, 0, -1 or blank" if bad[i] else
                      None if view_kept(kind, options.views) else f"{kind} view (views {options.views})")
            reason = reason or _uncertain_reason(unsure[i], options)
            if reason:
                skipped.append((str(file), reason))
                continue
            match = _PATIENT_IN_PATH.search(record["Path"])
            rows.append(_row(file, found[i], split, match.group(1) if match else "", "chexpert"))
    return _result(rows, skipped)


def _chexpert_view(record: dict[str, str]) -> str:
    if record.get("Frontal/Lateral", "").strip().lower() == "lateral":
        return "lateral"
    kind = view_kind(record.get("AP/PA", ""))
    return kind if kind in ("pa", "ap") else "frontal" if record.get("Frontal/Lateral", "").strip() else "other"


def _resolve_relative(base: Path, relative: str) -> Path:
    """``relative`` under ``base``, or under it without its first parts (CheXpert's paths start with the
    folder that holds its CSV: ``CheXpert-v1.0-small/train/...``)."""
    parts = Path(relative.strip()).parts
    candidates = [base.joinpath(*parts[i:]) for i in range(len(parts))] + [base.parent.joinpath(*parts)]
    return _first_file(candidates) or base.joinpath(*parts)


def _mimic_file(folder: Path, kind: str) -> Path | None:
    names = [f"{_MIMIC_PREFIX}{kind}.csv", f"{_MIMIC_PREFIX}{kind}.csv.gz"]
    return _first_file([folder / name for name in names])


def _read_mimic(path: Path, options: SourceOptions) -> PublicRows:
    folder = path if path.is_dir() else path.parent
    split_file = _mimic_file(folder, "split")
    label_file = _mimic_file(folder, "chexpert") or _mimic_file(folder, "negbio")
    meta_file = _mimic_file(folder, "metadata")
    if split_file is None or label_file is None:
        raise InputError(folder, f"MIMIC-CXR-JPG needs {_MIMIC_PREFIX}split.csv and {_MIMIC_PREFIX}chexpert.csv "
                                 "(or -negbio.csv), optionally .gz, in this folder")
    if meta_file is None and options.views != "all":
        raise InputError(folder, f"no {_MIMIC_PREFIX}metadata.csv, so views={options.views} cannot be applied "
                                 "(use views all)")
    images = _read_csv(split_file, {"dicom_id", "study_id", "subject_id", "split"})
    if meta_file is not None:
        meta = _read_csv(meta_file, {"dicom_id", "ViewPosition"})[["dicom_id", "ViewPosition"]]
        images = images.merge(meta, on="dicom_id", how="left").fillna("")
    labels = _read_csv(label_file, {"subject_id", "study_id"})
    labels = labels.drop_duplicates(["subject_id", "study_id"]).reset_index(drop=True)
    values, bad = _chexpert_values(label_file, labels)
    found, unsure = _chexpert_findings(values, options.uncertain)
    study = {(s, t): i for i, (s, t) in enumerate(zip(labels["subject_id"], labels["study_id"]))}
    splits = {"train": "train", "validate": "val", "test": "test"}
    rows, skipped = [], []
    for record in images.to_dict("records"):
        subject, study_id = record["subject_id"].strip(), record["study_id"].strip()
        file = folder / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study_id}" / f"{record['dicom_id'].strip()}.jpg"
        i = study.get((subject, study_id))
        kind = view_kind(record.get("ViewPosition", ""))
        reason = ("file not found" if not file.is_file() else
                  f"no label row for study {study_id} in {label_file.name}" if i is None else
                  f"a finding value other than 1, 0, -1 or blank in {label_file.name}" if bad[i] else
                  None if view_kept(kind, options.views) else f"{kind} view (views {options.views})")
        reason = reason or _uncertain_reason(unsure[i], options)  # type: ignore[index]
        if reason:
            skipped.append((str(file), reason))
            continue
        rows.append(_row(file, found[i], splits.get(record["split"].strip().lower(), ""), subject, "mimic"))
    return _result(rows, skipped)


# NIH ChestX-ray14, PadChest, RSNA Pneumonia, VinDr-CXR

def _name_index(base: Path, pattern: str) -> Callable[[str], Path]:
    """A finder of image file names: directly under ``base``, else anywhere under its folders
    matching ``pattern`` (indexed once, on the first name not found directly)."""
    index: dict[str, Path] = {}
    indexed: list[bool] = []

    def find(name: str) -> Path:
        direct = base / name
        if direct.is_file():
            return direct
        if not indexed:
            index.update({p.name: p for folder in sorted(base.glob(pattern)) if folder.is_dir()
                          for p in folder.rglob("*") if p.is_file()})
            indexed.append(True)
        return index.get(Path(name).name, direct)

    return find


def _nih_splits(folder: Path) -> dict[str, str]:
    """Image name -> split from NIH's ``train_val_list.txt`` and ``test_list.txt`` beside its CSV, if there."""
    splits: dict[str, str] = {}
    for name, split in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
        try:
            splits.update({line.strip(): split for line in (folder / name).read_text().splitlines() if line.strip()})
        except (OSError, UnicodeDecodeError):
            continue
    return splits


def _read_nih(path: Path, options: SourceOptions) -> PublicRows:
    table = _read_csv(path, {"Image Index", "Finding Labels"})
    _need_views(path, table, "View Position", options)
    find, splits = _name_index(path.parent, "images*"), _nih_splits(path.parent)
    rows, skipped = [], []
    for record in table.to_dict("records"):
        file = find(record["Image Index"].strip())
        names = {n.strip() for n in record["Finding Labels"].split(SET_SEPARATOR) if n.strip() and n.strip() != NO_FINDING}
        unknown = sorted(names - set(_NIH))
        kind = view_kind(record.get("View Position", ""))
        reason = ("file not found" if not file.is_file() else
                  f"finding(s) {', '.join(unknown)} not NIH ChestX-ray14's" if unknown else
                  None if view_kept(kind, options.views) else f"{kind} view (views {options.views})")
        if reason:
            skipped.append((str(file), reason))
            continue
        split = splits.get(record["Image Index"].strip(), "")
        rows.append(_row(file, names, split, record.get("Patient ID", "").strip(), "nih"))
    return _result(rows, skipped)


def _padchest_terms(text: str) -> list[str] | None:
    """PadChest's ``Labels`` (a Python list literal such as ``['pneumonia', ' infiltrates']``), lower-case
    and stripped; ``None`` when it is not one."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(value, list) or not all(isinstance(term, str) for term in value):
        return None
    return [term.strip().lower() for term in value if term.strip()]


def _read_padchest(path: Path, options: SourceOptions) -> PublicRows:
    table = _read_csv(path, {"ImageID", "PatientID", "Labels"})
    _need_views(path, table, "Projection", options)
    rows, skipped = [], []
    for record in table.to_dict("records"):
        image = record["ImageID"].strip()
        folder = record.get("ImageDir", "").strip()
        file = _first_file([path.parent / folder / image, path.parent / image, path.parent / "images" / image]
                           if folder else [path.parent / image, path.parent / "images" / image]) or path.parent / image
        terms = _padchest_terms(record["Labels"])
        kind = view_kind(record.get("Projection", ""))
        reason = ("file not found" if not file.is_file() else
                  f"Labels is not a list of terms: {record['Labels'][:40]!r}" if terms is None else
                  None if view_kept(kind, options.views) else f"{kind} view (views {options.views})")
        if reason:
            skipped.append((str(file), reason))
            continue
        findings = {name for term in terms for name in _PADCHEST.get(term, ())}  # type: ignore[union-attr]
        rows.append(_row(file, findings, _split_of(path), record["PatientID"].strip(), "padchest"))
    return _result(rows, skipped)


def _image_file(base: Path, image_id: str, folders: tuple[str, ...], suffixes: tuple[str, ...]) -> Path:
    candidates = [base / folder / f"{image_id}{suffix}" for folder in folders for suffix in suffixes]
    return _first_file(candidates) or candidates[0]


def _read_rsna(path: Path, options: SourceOptions) -> PublicRows:
    table = _read_csv(path, {"patientId", "Target"})
    target = pd.to_numeric(table["Target"].str.strip(), errors="coerce")
    if target.isna().any() or not target.isin([0, 1]).all():
        row = int(np.flatnonzero(target.isna().to_numpy() | ~target.isin([0, 1]).to_numpy())[0])
        raise InputError(path, f"row {row + 2}: Target must be 0 or 1, not {table['Target'].iloc[row]!r}")
    positive = target.groupby(table["patientId"].str.strip(), sort=False).max()  # several box rows, one image
    folders = ("stage_2_train_images", "stage_1_train_images", "train_images", "images", ".")
    rows, skipped = [], []
    for image_id, value in positive.items():
        file = _image_file(path.parent, image_id, folders, (".dcm", ".png", ".jpg"))
        if not file.is_file():
            skipped.append((str(file), "file not found"))
            continue
        rows.append(_row(file, set(_RSNA["Target=1"]) if value == 1 else set(), _split_of(path), image_id, "rsna"))
    return _result(rows, skipped)


def _read_vindr(path: Path, options: SourceOptions) -> PublicRows:
    table = _read_csv(path, {"image_id", "class_name"})
    table["image_id"] = table["image_id"].str.strip()
    table["class_name"] = table["class_name"].str.strip()
    raters = "rad_id" in table.columns
    split = _split_of(path)
    folders = tuple(dict.fromkeys((split, "train", "test", "images", "."))) if split else ("train", "test", "images", ".")
    rows, skipped = [], []
    for image_id, marks in table.groupby("image_id", sort=False):
        file = _image_file(path.parent, image_id, folders, (".dicom", ".dcm", ".png", ".jpg"))
        if not file.is_file():
            skipped.append((str(file), "file not found"))
            continue
        if raters:
            readers = marks["rad_id"].str.strip().nunique()
            votes = marks.groupby("class_name")["rad_id"].nunique()
            needed = 1 if options.raters == "any" else readers // 2 + 1
            named = {name for name, count in votes.items() if count >= needed}
        else:  # a consensus file (the test set's): one row per finding
            named = set(marks["class_name"])
        findings = {finding for name in named for finding in _VINDR.get(name, ())}
        rows.append(_row(file, findings, split, "", "vindr"))
    return _result(rows, skipped)


_READERS: dict[str, Callable[[Path, SourceOptions], PublicRows]] = {
    "nih": _read_nih, "chexpert": _read_chexpert, "mimic": _read_mimic, "padchest": _read_padchest,
    "rsna": _read_rsna, "vindr": _read_vindr}
