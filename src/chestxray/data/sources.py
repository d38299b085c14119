"""Read labelled X-rays from class folders, CSV/TSV manifests, MedMNIST ``.npz`` files or the label
files of public data sets (CheXpert, MIMIC-CXR-JPG, PadChest, RSNA Pneumonia, VinDr-CXR, NIH
ChestX-ray14: :mod:`chestxray.data.public`, detected from their file and column names).

Every source gives one :class:`Samples` table with the columns ``path``, ``label`` (one class
name; for multi-label data the names joined by ``|``, empty for none), ``split`` (``train``,
``val``, ``test`` or empty), ``patient_id`` (empty when unknown) and ``source``.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .decode import NPZ_SEPARATOR, find_images
from .public import read_public
from .vocabulary import NO_FINDING, SourceOptions
from ..constants import SET_SEPARATOR
from ..errors import ChestXrayError

__all__ = ["COLUMNS", "SPLIT_NAMES", "NO_FINDING", "Samples", "load_samples", "patient_id_from_name"]

Task = Literal["multiclass", "multilabel"]
COLUMNS = ["path", "label", "split", "patient_id", "source"]
SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}
_CSV_ALIASES = {"image index": "path", "image": "path", "file": "path", "filename": "path",
                "finding labels": "label", "labels": "label", "class": "label",
                "patient id": "patient_id", "patient": "patient_id"}
_MEDMNIST_CLASSES = {"pneumoniamnist": ["normal", "pneumonia"]}
_PATIENT_PATTERNS = [
    re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+", re.IGNORECASE),  # Kermany pneumonia
    re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d+", re.IGNORECASE),         # Kermany normal
    re.compile(r"^(\d{8})_\d{3}$"),                                      # NIH ChestX-ray14
]


@dataclass
class Samples:
    """A table of labelled images plus what is known about its classes."""

    frame: pd.DataFrame
    classes: list[str]
    task: Task = "multiclass"
    origin: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frame)

    def targets(self) -> np.ndarray:
        """Class indices (N,) for multi-class data, a 0/1 float matrix (N, C) for multi-label."""
        index = {name: i for i, name in enumerate(self.classes)}
        if self.task == "multiclass":
            return self.frame["label"].map(index).to_numpy(dtype=np.int64)
        matrix = np.zeros((len(self.frame), len(self.classes)), dtype=np.float32)
        for row, labels in enumerate(self.frame["label"]):
            for name in filter(None, labels.split(SET_SEPARATOR)):
                matrix[row, index[name]] = 1.0
        return matrix

    def groups(self) -> np.ndarray:
        """Patient ids, with each image of unknown patient as its own group."""
        ids = self.frame["patient_id"].where(self.frame["patient_id"] != "", "file:" + self.frame["path"])
        return ids.to_numpy()

    def subset(self, rows: np.ndarray | pd.Series) -> "Samples":
        """The samples at ``rows`` (positions or a boolean mask), same classes and task."""
        frame = self.frame[rows] if isinstance(rows, pd.Series) else self.frame.iloc[np.asarray(rows)]
        return Samples(frame.reset_index(drop=True), self.classes, self.task, self.origin)

    def split(self, name: str) -> "Samples":
        """The samples whose ``split`` column is ``name``."""
        return self.subset(self.frame["split"] == name)

    def with_classes(self, classes: list[str], *, task: str | None = None, known_as: str = "expected") -> "Samples":
        """These samples with ``classes`` as their class list (in that order, which fixes the target
        indices); an error names each label outside ``classes``, or a ``task`` other than theirs."""
        if task is not None and task != self.task:
            raise ChestXrayError(f"{self.origin}: {self.task} labels, but the {known_as} task is {task}")
        present = sorted({name for label in self.frame["label"] for name in label.split(SET_SEPARATOR) if name})
        unknown = [name for name in present if name not in classes]
        if unknown:
            raise ChestXrayError(f"{self.origin}: class(es) {', '.join(unknown)} unknown to the {known_as} classes "
                                 f"({', '.join(classes)})")
        return Samples(self.frame, list(classes), self.task, self.origin, self.skipped)


def load_samples(data: str | Path, *, classes: list[str] | None = None, format: str = "auto",
                 uncertain: str = "ones", views: str = "frontal", raters: str = "majority") -> Samples:
    """Read a folder, a CSV/TSV manifest, a MedMNIST ``.npz`` or a public data set's label file (or
    MIMIC-CXR-JPG's or CheXpert's folder) into a :class:`Samples` table.

    ``format`` (``auto``: detected) and the public data sets' policies ``uncertain``, ``views`` and
    ``raters`` are :class:`~chestxray.data.vocabulary.SourceOptions`'s."""
    options = SourceOptions(format, uncertain, views, raters)
    path = Path(data).expanduser()
    if not path.exists():
        raise ChestXrayError(f"{path}: no such file or folder")
    public = read_public(path, options)
    if public is not None:
        samples = Samples(_frame(public.rows), public.classes, "multilabel", str(path), public.skipped)
    else:
        samples = _builtin(path, format)
    if not len(samples):
        detail = ""
        if samples.skipped:
            detail = f" ({len(samples.skipped)} listed, all skipped; first: {': '.join(samples.skipped[0])})"
        raise ChestXrayError(f"{path}: no labelled images found{detail}")
    if classes is not None:
        samples = samples.with_classes(classes)
    return samples


def _builtin(path: Path, format: str) -> Samples:
    """A class folder tree, a manifest or a MedMNIST file, as ``format`` says (``auto``: by its kind)."""
    kind = ("folder" if path.is_dir() else "manifest" if path.suffix.lower() in (".csv", ".tsv", ".txt")
            else "medmnist" if path.suffix.lower() == ".npz" else "")
    if format not in ("auto", kind):
        wanted = {"folder": "a folder", "manifest": "a .csv/.tsv manifest", "medmnist": "a MedMNIST .npz file"}
        raise ChestXrayError(f"{path}: not {wanted[format]} (format {format})")
    if kind == "folder":
        return _from_folders(path)
    if kind == "manifest":
        return _from_manifest(path)
    if kind == "medmnist":
        return _from_medmnist(path)
    raise ChestXrayError(f"{path}: not a folder, a .csv/.tsv manifest, a MedMNIST .npz file or a public data set's "
                         "label file")


def patient_id_from_name(file_name: str) -> str:
    """Patient id encoded in well-known file names (Kermany, NIH), else ``""``."""
    stem = Path(file_name).stem
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return ""


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS).fillna("").astype(str)


def _from_folders(root: Path) -> Samples:
    split_dirs = [d for d in _listing(root) if d.is_dir() and d.name.lower() in _SPLIT_ALIASES]
    layouts = [(d, _SPLIT_ALIASES[d.name.lower()]) for d in split_dirs] or [(root, "")]
    names = _class_names_file(root)
    rows: list[dict] = []
    folders: list[str] = []
    skipped: list[tuple[str, str]] = []
    for base, split in layouts:
        for class_dir in (d for d in _listing(base) if d.is_dir() and not d.name.startswith(".")):
            label = names.get(class_dir.name, class_dir.name)
            if label not in folders:
                folders.append(label)
            files, unreadable = find_images(class_dir)
            skipped += unreadable
            for file in files:
                rows.append({"path": file, "label": label, "split": split,
                             "patient_id": patient_id_from_name(Path(file).name), "source": "folder"})
    order = list(dict.fromkeys(names.values()))
    classes = [c for c in order if c in folders] + sorted(c for c in folders if c not in order)
    return Samples(_frame(rows), classes, "multiclass", str(root), skipped)


def _listing(folder: Path) -> list[Path]:
    """The entries of a data or split folder, sorted; one that cannot be listed is an error (without it
    the layout itself is unknown)."""
    try:
        return sorted(folder.iterdir())
    except OSError as err:
        raise ChestXrayError(f"{folder}: cannot read this folder ({err.strerror or err})") from None


def _class_names_file(root: Path) -> dict[str, str]:
    """Folder-name -> class-name map from an optional ``classes.tsv`` or ``classes.json``.

    ``classes.json`` is a list of names (folder ``0`` is the first) or a ``{folder: name}`` map.
    ``classes.tsv`` has an index column (``label_index`` or ``index``) and a name column
    (``name``, ``class`` or ``folder``); its row order is the class order.
    """
    json_file, tsv_file = root / "classes.json", root / "classes.tsv"
    try:
        if json_file.is_file():
            content = json.loads(json_file.read_text())
            if isinstance(content, list):
                return {str(i): str(name) for i, name in enumerate(content)}
            return {str(k): str(v) for k, v in content.items()}
        if tsv_file.is_file():
            table = pd.read_csv(tsv_file, sep="\t", dtype=str)
            index_col = next(c for c in table.columns if c.lower() in ("label_index", "index"))
            name_col = next(c for c in table.columns if c.lower() in ("name", "class", "folder"))
            mapping = dict(zip(table[index_col], table[name_col]))
            mapping.update({name: name for name in table[name_col]})
            return mapping
    except (ValueError, StopIteration, AttributeError) as err:
        bad = json_file if json_file.is_file() else tsv_file
        reason = str(err) or "missing index or name column"
        raise ChestXrayError(f"{bad}: malformed class-name file ({reason})") from None
    return {}


def _from_manifest(manifest: Path) -> Samples:
    sep = "\t" if manifest.suffix.lower() == ".tsv" else ","
    try:
        table = pd.read_csv(manifest, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise ChestXrayError(f"{manifest}: malformed manifest ({str(err).splitlines()[0]})") from None
    table = table.rename(columns=lambda c: _CSV_ALIASES.get(c.strip().lower(), c.strip().lower()))
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise ChestXrayError(f"{manifest}: missing column(s) {', '.join(missing)} "
                             f"(found: {', '.join(table.columns)}); need path,label[,patient_id,split]")
    multilabel = table["label"].str.contains(SET_SEPARATOR, regex=False).any() or (table["label"] == NO_FINDING).any()
    rows, skipped = [], []
    for record in table.to_dict("records"):
        file = Path(record["path"])
        file = file if file.is_absolute() else manifest.parent / file
        if not file.is_file():
            skipped.append((str(file), "file not found"))
            continue
        label = record["label"].strip()
        if multilabel:
            label = SET_SEPARATOR.join(sorted({p.strip() for p in label.split(SET_SEPARATOR) if p.strip() and p.strip() != NO_FINDING}))
        elif not label:
            skipped.append((str(file), "empty label"))
            continue
        split = _SPLIT_ALIASES.get(record.get("split", "").strip().lower(), "")
        patient = record.get("patient_id", "").strip() or patient_id_from_name(file.name)
        rows.append({"path": str(file), "label": label, "split": split, "patient_id": patient,
                     "source": "manifest"})
    frame = _frame(rows)
    if multilabel:
        classes = sorted({name for labels in frame["label"] for name in labels.split(SET_SEPARATOR) if name})
    else:
        classes = sorted(frame["label"].unique())
    return Samples(frame, classes, "multilabel" if multilabel else "multiclass", str(manifest), skipped)


def _from_medmnist(npz: Path) -> Samples:
    try:
        with np.load(npz) as arrays:
            labels = {s: arrays[f"{s}_labels"] for s in SPLIT_NAMES if f"{s}_labels" in arrays.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ChestXrayError(f"{npz}: not a readable MedMNIST .npz file ({err})") from None
    if not labels:
        raise ChestXrayError(f"{npz}: no train_labels/val_labels/test_labels arrays (MedMNIST layout)")
    _check_medmnist_lengths(npz, {split: len(values) for split, values in labels.items()})
    n_columns = next(iter(labels.values())).reshape(len(next(iter(labels.values()))), -1).shape[1]
    multilabel = n_columns > 1
    n_classes = n_columns if multilabel else int(max(v.max() for v in labels.values())) + 1
    classes = _MEDMNIST_CLASSES.get(npz.stem.lower(), [f"class{i}" for i in range(n_classes)])
    rows = []
    for split, values in labels.items():
        values = values.reshape(len(values), -1)
        for i, row in enumerate(values):
            label = (SET_SEPARATOR.join(classes[j] for j in np.flatnonzero(row)) if multilabel
                     else classes[int(row[0])])
            rows.append({"path": f"{npz}{NPZ_SEPARATOR}{split}/{i}", "label": label, "split": split,
                         "patient_id": "", "source": "medmnist"})
    return Samples(_frame(rows), classes, "multilabel" if multilabel else "multiclass", str(npz))


def _check_medmnist_lengths(npz: Path, n_labels: dict[str, int]) -> None:
    """Refuse a split whose ``<split>_images`` is missing or holds another number of images than
    ``<split>_labels`` has labels (read from the arrays' headers: no image is loaded)."""

    try:
        with zipfile.ZipFile(npz) as archive:
            for split, count in n_labels.items():
                member = f"{split}_images.npy"
                if member not in archive.namelist():
                    raise ChestXrayError(f"{npz}: {split}_labels has {count} labels but there is no {split}_images array")
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape = read(handle)[0]
                images = shape[0] if shape else 0
                if images != count:
                    raise ChestXrayError(f"{npz}: {split}_images holds {images} images but {split}_labels "
                                         f"{count} labels; the arrays must be the same length")
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ChestXrayError(f"{npz}: not a readable MedMNIST .npz file ({err})") from None
