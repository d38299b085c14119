"""Dataset audit: what is in a dataset and what could make a model's score meaningless.

The report counts images per class and split, describes their sizes and formats, lists unreadable
and skipped files, finds exact duplicates (content hash) and near duplicates (perceptual hash of
the preprocessed image) within a split, across splits and against a second dataset, finds
patients present in more than one split, and checks whether file metadata alone predicts the
class (a sign that classes come from different sources). It is written as Markdown or HTML plus
JSON, and returned as an :class:`AuditReport`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
import scipy.fft
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..constants import DEFAULT_IMAGE_SIZE, SET_SEPARATOR
from .cache import build_cache
from .decode import content_hash, fit_geometry, probe_image
from ..errors import ChestXrayError, InputError
from .hamming import close_pairs
from .sources import NO_FINDING, SPLIT_NAMES, Samples, load_samples
from ..storage import atomic_path, make_folder, write_text

__all__ = ["NEAR_DUPLICATE_MAX_DISTANCE", "AGAINST_SCOPE", "Spread", "ImageStats", "FileIssue",
           "DuplicatePair", "PatientOverlap", "ShortcutCheck", "AuditReport", "audit", "perceptual_hashes",
           "render_terminal"]

ReportFormat = Literal["md", "html"]

CACHE_SIZE = DEFAULT_IMAGE_SIZE
"""Side of the cached (padded) images the perceptual hashes are computed from: the default
training size and fit mode, so a training run on the same files reuses the audit's cache."""

HASH_SIDE = 16
"""The perceptual hash keeps the ``HASH_SIDE`` x ``HASH_SIDE`` lowest DCT frequencies of a
``4 * HASH_SIDE`` square thumbnail: 256 bits. The classic 64-bit pHash (8 x 8) is too coarse for
chest X-rays, which all look alike at low frequency: on the course dataset unrelated images of
different patients are 2 bits apart, as close as a re-encoded copy."""

NEAR_DUPLICATE_MAX_DISTANCE = 32
"""Largest Hamming distance (of 256 bits) at which two images count as near duplicates.

Measured on the real data: copies edited with +10% brightness, contrast x1.2, gamma 0.8, half
size, JPEG quality 50 or a blur stay within 16 bits, a 1% crop within 30; the two re-encoded
copies in the course dataset are 8 and 14 bits apart, while the closest unrelated pairs are
54 bits apart (course dataset) and 42 bits apart (PneumoniaMNIST, 28 px images)."""

_HASH_BATCH = 4096
"""Images hashed at once: bounds the memory of the thumbnails and their DCT (16 KiB each)."""

SHORTCUT_FEATURES = ["width", "height", "aspect", "file_bytes", "format", "mode", "bit_depth"]
SHORTCUT_FOLDS = 5
SHORTCUT_MAX_IMAGES = 20_000
"""The metadata classifier is cross-validated on a random subset of at most this many images."""

CONFOUND_AUC = 0.80
"""One-vs-rest AUC of the metadata-only classifier at or above which a class is flagged as separable by
its source (0.5 is chance; 0.8 is the usual threshold of "excellent" discrimination)."""

_METADATA_COLUMNS = ["width", "height", "format", "mode", "bit_depth", "file_bytes", "sha256", "problem"]
NO_SPLIT = "unsplit"
AGAINST_SCOPE = "vs other dataset"
_LISTED = 50  # rows per list in the Markdown report; the JSON file has all of them
_SPLIT_ORDER = {name: i for i, name in enumerate((*SPLIT_NAMES, NO_SPLIT))}


@dataclass(frozen=True)
class Spread:
    """Minimum, median and maximum of a quantity."""

    min: float
    median: float
    max: float


@dataclass(frozen=True)
class ImageStats:
    """Sizes and file properties of the readable images of one class."""

    images: int
    width: Spread
    height: Spread
    file_bytes: Spread
    formats: dict[str, int]
    modes: dict[str, int]
    bit_depths: dict[str, int]


@dataclass(frozen=True)
class FileIssue:
    """A file left out of the data, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class DuplicatePair:
    """Two images with the same content (``exact``) or nearly the same pixels (``near``).

    ``scope`` is ``"within train"``, ``"train vs test"``, ... or ``"vs other dataset"``, where
    ``b`` belongs to the dataset given as ``against``. ``distance`` is the Hamming distance of the
    perceptual hashes (0 to 256; -1 when an image could not be decoded).
    """

    kind: Literal["exact", "near"]
    scope: str
    distance: int
    path_a: str
    label_a: str
    split_a: str
    path_b: str
    label_b: str
    split_b: str


@dataclass(frozen=True)
class PatientOverlap:
    """A patient whose images are in more than one split."""

    patient_id: str
    images: dict[str, int]
    labels: list[str]


@dataclass(frozen=True)
class ShortcutCheck:
    """How well file metadata alone predicts the class (cross-validated), against chance."""

    accuracy: float | None
    chance: float | None
    images: int
    folds: int
    features: list[str]
    recall_by_class: dict[str, float]
    importances: dict[str, float]
    flagged: bool
    note: str


@dataclass
class AuditReport:
    """Everything the audit found; ``findings`` are its conclusions in plain words."""

    data: str
    task: str
    classes: list[str]
    images: int
    counts: dict[str, dict[str, int]]
    image_stats: dict[str, ImageStats]
    skipped: list[FileIssue]
    unreadable: list[FileIssue]
    duplicates: list[DuplicatePair]
    near_duplicate_max_distance: int
    near_duplicate_note: str
    images_with_patient_id: int
    patients: int
    patient_overlap: list[PatientOverlap]
    shortcut: ShortcutCheck
    against: str | None = None
    against_images: int = 0
    findings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> str:
        """The report as a JSON document."""
        return json.dumps(dataclasses.asdict(self), indent=2)


@dataclass
class _Scan:
    """Per-image facts of one dataset: metadata, content hash, perceptual hash, problems."""

    samples: Samples
    table: pd.DataFrame
    hashes: np.ndarray  # (N, HASH_SIDE**2 // 64) uint64; rows of unreadable images are zero


def audit(data: str | Path, against: str | Path | None = None, out_dir: str | Path = Path("runs/audit"),
          cache_dir: str | Path | None = None, fmt: ReportFormat = "md", seed: int = 0, *,
          near_distance: int = NEAR_DUPLICATE_MAX_DISTANCE, progress: bool = True,
          source_options: Mapping[str, str] | None = None) -> AuditReport:
    """Audit the dataset at ``data`` (optionally against a second one) and write the report.

    Writes ``audit.md`` (or ``audit.html``), ``audit.json`` and ``images.csv`` (one row per image)
    into ``out_dir``. ``cache_dir`` is where preprocessed images are cached (see
    :func:`chestxray.cache.build_cache`); ``seed`` fixes the shortcut check's folds and forest.
    ``source_options`` are :func:`~chestxray.data.sources.load_samples`'s ``format`` and policies
    (``against`` is read with the same policies, its format detected).
    """
    if fmt not in ("md", "html"):
        raise ChestXrayError(f"report format must be 'md' or 'html', not {fmt!r}")
    started = time.perf_counter()
    options = dict(source_options or {})
    scan = _scan(load_samples(data, **options), cache_dir, progress)
    options["format"] = "auto"
    other = _scan(load_samples(against, **options), cache_dir, progress) if against is not None else None
    duplicates, near_note = _duplicates(scan, other, near_distance)
    frame, table = scan.samples.frame, scan.table
    readable = table["problem"] == ""
    report = AuditReport(
        data=str(data), task=scan.samples.task, classes=list(scan.samples.classes), images=len(frame),
        counts=_counts(scan), image_stats=_image_stats(scan),
        skipped=[FileIssue(path, reason) for path, reason in scan.samples.skipped],
        unreadable=[FileIssue(p, r) for p, r in zip(frame["path"][~readable], table["problem"][~readable])],
        duplicates=duplicates, near_duplicate_max_distance=near_distance, near_duplicate_note=near_note,
        images_with_patient_id=int((frame["patient_id"] != "").sum()),
        patients=int(frame.loc[frame["patient_id"] != "", "patient_id"].nunique()),
        patient_overlap=_patient_overlap(frame), shortcut=_shortcut_check(scan, seed),
        against=None if against is None else str(against), against_images=0 if other is None else len(other.table))
    report.findings = _findings(report)
    report.seconds = round(time.perf_counter() - started, 2)
    _write(report, scan, Path(out_dir), fmt)
    return report


def perceptual_hashes(images: list[np.ndarray]) -> np.ndarray:
    """256-bit DCT perceptual hashes (N, 4) uint64 of 2-D uint8 images.

    Each image is shrunk to a ``4 * HASH_SIDE`` square thumbnail; a bit is set where a low
    frequency DCT coefficient is above their median (the pHash of Zauner, 2010, with more bits).
    """
    hashes = np.zeros((len(images), HASH_SIDE * HASH_SIDE // 64), dtype=np.uint64)
    side = 4 * HASH_SIDE
    for start in range(0, len(images), _HASH_BATCH):
        batch = images[start:start + _HASH_BATCH]
        thumbs = np.stack([cv2.resize(np.asarray(img), (side, side), interpolation=cv2.INTER_AREA) for img in batch])
        low = scipy.fft.dctn(thumbs.astype(np.float32), axes=(1, 2))[:, :HASH_SIDE, :HASH_SIDE].reshape(len(batch), -1)
        bits = low > np.median(low, axis=1, keepdims=True)
        hashes[start:start + len(batch)] = np.packbits(bits, axis=1).view(np.uint64)
    return hashes


def render_terminal(report: AuditReport, console: Console) -> None:
    """Print a short summary of ``report``: counts per class and split, then the findings."""
    splits = list(report.counts)
    table = Table(title=f"{report.data}: {report.images} images", title_justify="left")
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    for name in _class_rows(report):
        table.add_row(name, *(str(report.counts[s].get(name, 0)) for s in splits))
    console.print(table)
    for finding in report.findings:
        console.print(Text("• ", style="yellow") + Text(finding))
    for kind, path in report.files.items():
        console.print(Text(f"{kind}: {path}"))


# ---------------------------------------------------------------------------------------- scan


def _scan(samples: Samples, cache_dir: str | Path | None, progress: bool) -> _Scan:
    table = metadata_table(samples)
    cache = build_cache(samples, CACHE_SIZE, cache_dir=cache_dir, progress=progress)
    for row, reason in cache.failed.items():
        if not table.at[row, "problem"]:
            table.at[row, "problem"] = reason
    readable = np.flatnonzero(table["problem"].to_numpy() == "")
    hashes = np.zeros((len(table), HASH_SIDE * HASH_SIDE // 64), dtype=np.uint64)
    content = [_unpadded(cache.images[i], table.at[i, "height"], table.at[i, "width"]) for i in readable]
    hashes[readable] = perceptual_hashes(content)
    return _Scan(samples, table, hashes)


def metadata_table(samples: Samples, *, hashes: bool = True) -> pd.DataFrame:
    """File metadata of every sample, read from headers only: width, height, format, mode, bit depth,
    file size, SHA-256 (``hashes``) and ``problem`` (why a file could not be read; empty when fine)."""
    rows = []
    for ref in samples.frame["path"]:
        row = {"width": 0, "height": 0, "format": "", "mode": "", "bit_depth": 0, "file_bytes": 0,
               "sha256": "", "problem": ""}
        try:
            info = probe_image(ref)
            row.update(width=info.width, height=info.height, format=info.format, mode=info.mode,
                       bit_depth=info.bit_depth, file_bytes=info.n_bytes)
        except InputError as err:  # the decoding boundary: whatever a header parser raises
            row["problem"] = err.reason
        if hashes:
            try:
                row["sha256"] = content_hash(ref)
            except (OSError, InputError):
                pass
        rows.append(row)
    table = pd.DataFrame(rows, index=samples.frame.index, columns=_METADATA_COLUMNS)
    table["aspect"] = table["width"] / table["height"].replace(0, np.nan)
    return table


def _unpadded(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The image part of a padded cache square (the geometry of ``decode.fit_square(mode='pad')``).

    Hashing the black padding would make any two images of similar aspect ratio look alike.
    """
    _, new_h, new_w, top, left = fit_geometry(height, width, image.shape[0], "pad")
    return np.asarray(image[top:top + new_h, left:left + new_w])


def _class_of_rows(samples: Samples) -> pd.Series:
    """Class name per row, one entry per class for multi-label rows (index = row)."""
    labels = samples.frame["label"]
    if samples.task == "multiclass":
        return labels
    return labels.replace("", NO_FINDING).str.split(SET_SEPARATOR).explode()


def _split_names(frame: pd.DataFrame) -> pd.Series:
    return frame["split"].replace("", NO_SPLIT)


# -------------------------------------------------------------------------------------- counts


def _counts(scan: _Scan) -> dict[str, dict[str, int]]:
    classes = _class_of_rows(scan.samples)
    splits = _split_names(scan.samples.frame).loc[classes.index]
    counts: dict[str, dict[str, int]] = {}
    for split in sorted(splits.unique(), key=_SPLIT_ORDER.get):
        counts[split] = {k: int(v) for k, v in classes[splits == split].value_counts().items()}
    return counts


def _image_stats(scan: _Scan) -> dict[str, ImageStats]:
    classes = _class_of_rows(scan.samples)
    table = scan.table.loc[classes.index].assign(cls=classes.to_numpy())
    table = table[table["problem"] == ""]
    stats = {}
    groups = dict(list(table.groupby("cls", sort=False)))
    for name in [c for c in scan.samples.classes if c in groups] + sorted(set(groups) - set(scan.samples.classes)):
        group = groups[name]
        stats[str(name)] = ImageStats(
            images=len(group), width=_spread(group["width"]), height=_spread(group["height"]),
            file_bytes=_spread(group["file_bytes"]), formats=_tally(group["format"]),
            modes=_tally(group["mode"]), bit_depths=_tally(group["bit_depth"]))
    return stats


def _spread(values: pd.Series) -> Spread:
    return Spread(float(values.min()), float(values.median()), float(values.max()))


def _tally(values: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.value_counts().items()}


def _patient_overlap(frame: pd.DataFrame) -> list[PatientOverlap]:
    known = frame[frame["patient_id"] != ""].assign(split=_split_names(frame))
    spread = known.groupby("patient_id")["split"].nunique()
    known = known[known["patient_id"].isin(spread.index[spread > 1])]  # one pass over all, a loop over few
    overlaps = []
    for patient, group in known.groupby("patient_id"):
        if group["split"].nunique() > 1:
            images = group["split"].value_counts()
            overlaps.append(PatientOverlap(
                str(patient), {s: int(images[s]) for s in sorted(images.index, key=_SPLIT_ORDER.get)},
                sorted(group["label"].unique())))
    return overlaps


# ---------------------------------------------------------------------------------- duplicates


def _duplicates(scan: _Scan, other: _Scan | None, max_distance: int) -> tuple[list[DuplicatePair], str]:
    """Exact and near duplicate pairs within ``scan`` and between ``scan`` and ``other``, and a note
    on the search ("": every pair within ``max_distance`` was found, see :mod:`chestxray.data.hamming`)."""
    pairs = _pairs_within(scan, max_distance)
    if other is not None:
        pairs += _pairs_between(scan, other, max_distance)
    return sorted(pairs, key=lambda p: (p.scope, p.kind, p.distance, p.path_a, p.path_b)), ""


def _pairs_within(scan: _Scan, max_distance: int) -> list[DuplicatePair]:
    sha = scan.table["sha256"].to_numpy()
    found: dict[tuple[int, int], int] = {}
    hashed = scan.table[sha != ""]
    for rows in hashed.groupby("sha256").indices.values():
        positions = hashed.index[rows]
        for n, i in enumerate(positions):
            for j in positions[n + 1:]:
                found[(i, j)] = _distance(scan, i, scan, j)
    readable = np.flatnonzero(scan.table["problem"].to_numpy() == "")
    for i, j, distance in zip(*close_pairs(scan.hashes[readable], None, max_distance)):
        found.setdefault((int(readable[i]), int(readable[j])), int(distance))
    return [_pair(scan, i, scan, j, d) for (i, j), d in found.items()]


def _pairs_between(scan: _Scan, other: _Scan, max_distance: int) -> list[DuplicatePair]:
    found: dict[tuple[int, int], int] = {}
    hashed = other.table[other.table["sha256"] != ""]
    other_rows = hashed.groupby("sha256").indices
    for i, sha in enumerate(scan.table["sha256"]):
        for j in hashed.index[other_rows.get(sha, [])] if sha else []:
            found[(i, j)] = _distance(scan, i, other, j)
    mine = np.flatnonzero(scan.table["problem"].to_numpy() == "")
    theirs = np.flatnonzero(other.table["problem"].to_numpy() == "")
    for i, j, distance in zip(*close_pairs(scan.hashes[mine], other.hashes[theirs], max_distance)):
        found.setdefault((int(mine[i]), int(theirs[j])), int(distance))
    return [_pair(scan, i, other, j, d) for (i, j), d in found.items()]


def _distance(scan: _Scan, i: int, other: _Scan, j: int) -> int:
    if scan.table.at[i, "problem"] or other.table.at[j, "problem"]:
        return -1
    return int(np.bitwise_count(scan.hashes[i] ^ other.hashes[j]).sum())


def _pair(scan: _Scan, i: int, other: _Scan, j: int, distance: int) -> DuplicatePair:
    a, b = scan.samples.frame.loc[i], other.samples.frame.loc[j]
    split_a, split_b = a["split"] or NO_SPLIT, b["split"] or NO_SPLIT
    if other is scan and _SPLIT_ORDER[split_a] > _SPLIT_ORDER[split_b]:
        a, b, split_a, split_b = b, a, split_b, split_a
    if other is not scan:
        scope = AGAINST_SCOPE
    else:
        scope = f"within {split_a}" if split_a == split_b else f"{split_a} vs {split_b}"
    exact = scan.table.at[i, "sha256"] == other.table.at[j, "sha256"] != ""
    return DuplicatePair("exact" if exact else "near", scope, distance, a["path"], a["label"], split_a,
                         b["path"], b["label"], split_b)


# ------------------------------------------------------------------------------ shortcut check


def _shortcut_rows(table: pd.DataFrame, samples: Samples, seed: int) -> tuple[pd.DataFrame, str]:
    """The readable rows with their label (at most :data:`SHORTCUT_MAX_IMAGES`, classes of two images or
    more), and why the check cannot run on them ("" when it can)."""
    table = table.assign(label=samples.frame["label"])
    table = table[table["problem"] == ""]
    if len(table) > SHORTCUT_MAX_IMAGES:
        table = table.sample(SHORTCUT_MAX_IMAGES, random_state=seed)
    sizes = table["label"].value_counts()
    table = table[table["label"].isin(sizes.index[sizes >= 2])]
    if table["label"].nunique() < 2:
        return table, "fewer than two classes with at least two readable images"
    if (_shortcut_features(table).nunique() <= 1).all():
        return table, "every image has the same metadata, so it cannot tell classes apart"
    return table, ""


def _cross_validated(features: pd.DataFrame, labels: np.ndarray, seed: int, method: str) -> tuple[np.ndarray, int, Any]:
    """Out-of-fold ``predict`` or ``predict_proba`` of the shortcut forest, the fold count, and the forest."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = int(min(SHORTCUT_FOLDS, pd.Series(labels).value_counts().min()))
    forest = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    predicted = cross_val_predict(forest, features, labels, method=method,
                                  cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return predicted, folds, forest


def _shortcut_check(scan: _Scan, seed: int) -> ShortcutCheck:
    """Cross-validated accuracy of a random forest that sees only file metadata, against chance."""
    def skipped(note: str, images: int = 0) -> ShortcutCheck:
        return ShortcutCheck(None, None, images, 0, SHORTCUT_FEATURES, {}, {}, False, note)

    if scan.samples.task != "multiclass":
        return skipped("not run: multi-label data (the check needs one class per image)")
    table, problem = _shortcut_rows(scan.table, scan.samples, seed)
    if problem:
        return skipped(f"not run: {problem}", len(table))
    features, labels = _shortcut_features(table), table["label"].to_numpy()
    predicted, folds, forest = _cross_validated(features, labels, seed, "predict")
    correct = predicted == labels
    accuracy, chance = float(correct.mean()), float(table["label"].value_counts(normalize=True).max())
    margin = max(0.10, 3 * math.sqrt(chance * (1 - chance) / len(table)))
    flagged = accuracy > chance + margin
    forest.fit(features, labels)
    verdict = (f"metadata alone predicts the class with {accuracy:.0%} accuracy against {chance:.0%} by chance "
               f"({folds}-fold cross-validation, {len(table)} images): ")
    verdict += ("the classes differ in how their images were made or stored, not only in disease; a model can "
                "learn the source instead of the disease" if flagged
                else f"not more than {margin:.0%} above chance, no sign of a metadata shortcut")
    return ShortcutCheck(
        round(accuracy, 4), round(chance, 4), len(table), folds, SHORTCUT_FEATURES,
        {str(c): round(float(correct[labels == c].mean()), 4) for c in sorted(set(labels))},
        {f: round(float(v), 4) for f, v in zip(SHORTCUT_FEATURES, forest.feature_importances_)},
        flagged, verdict)


def _shortcut_features(table: pd.DataFrame) -> pd.DataFrame:
    """The metadata the shortcut check sees, with the text columns as category codes."""
    features = table[SHORTCUT_FEATURES].copy()
    for column in ("format", "mode"):
        features[column] = features[column].astype("category").cat.codes
    return features.fillna(0)


def source_confound(samples: Samples, seed: int = 0, *, table: pd.DataFrame | None = None) -> dict[str, Any]:
    """Per class, how well file metadata alone tells its images from the others: the one-vs-rest ROC-AUC
    of the shortcut check's random forest, cross-validated (the same features, folds and forest).

    Classes at or above :data:`CONFOUND_AUC` are ``flagged``: their images likely came from another
    source, and a model may have learned the source. ``table`` is a :func:`metadata_table` of
    ``samples`` when already at hand. Multi-label data and data with fewer than two classes give
    ``{"auc": {}, "flagged": [], "note": why}``.
    """
    from sklearn.metrics import roc_auc_score

    result: dict[str, Any] = {"method": "one-vs-rest ROC-AUC of a random forest on file metadata "
                                        f"({', '.join(SHORTCUT_FEATURES)}), {SHORTCUT_FOLDS}-fold cross-validated",
                              "threshold": CONFOUND_AUC, "auc": {}, "flagged": [], "note": ""}
    if samples.task != "multiclass":
        return {**result, "note": "not measured: multi-label data"}
    table, problem = _shortcut_rows(metadata_table(samples, hashes=False) if table is None else table, samples, seed)
    if problem:
        return {**result, "note": f"not measured: {problem}"}
    features, labels = _shortcut_features(table), table["label"].to_numpy()
    probs = _cross_validated(features, labels, seed, "predict_proba")[0]
    names = sorted(set(labels))  # the forest's classes_ order
    auc = {name: round(float(roc_auc_score(labels == name, probs[:, k])), 4) for k, name in enumerate(names)}
    flagged = [name for name in names if auc[name] >= CONFOUND_AUC]
    return {**result, "auc": auc, "flagged": flagged, "images": int(len(table)),
            "differences": {name: how_images_differ(table, name) for name in flagged},
            "note": f"{len(flagged)} of {len(names)} classes separable from the others by file metadata alone"}


def how_images_differ(table: pd.DataFrame, name: str) -> str:
    """In plain words, how the images of class ``name`` differ from the others' in a :func:`metadata_table`
    (with a ``label`` column): their usual format, colour mode and size, where those differ."""
    mine, rest = table[table["label"] == name], table[table["label"] != name]
    parts = []
    words = {"L": "grayscale", "I;16": "16-bit grayscale", "I": "32-bit grayscale", "RGB": "colour (RGB)",
             "RGBA": "colour with transparency (RGBA)", "P": "palette colour", "LA": "grayscale with transparency"}
    for column, what in (("format", "stored as"), ("mode", "in")):
        a, b = mine[column].mode(), rest[column].mode()
        if len(a) and len(b) and a.iloc[0] != b.iloc[0]:
            share = float((mine[column] == a.iloc[0]).mean())
            mine_word, rest_word = (words.get(v, v) if column == "mode" else v for v in (a.iloc[0], b.iloc[0]))
            parts.append(f"mostly {what} {mine_word or 'unknown'} ({100 * share:.0f}%) where the others are "
                         f"{rest_word or 'unknown'}")
    width_a, width_b = float(mine["width"].median()), float(rest["width"].median())
    if width_b and not 0.8 <= width_a / width_b <= 1.25:
        parts.append(f"{'wider' if width_a > width_b else 'narrower'} (median {width_a:.0f} px against "
                     f"{width_b:.0f} px)")
    return "; ".join(parts) or "in file size and proportions"


# ------------------------------------------------------------------------------------ findings


def _findings(report: AuditReport) -> list[str]:
    findings = []
    cross = [p for p in report.duplicates if p.scope != AGAINST_SCOPE and p.split_a != p.split_b]
    for scope in dict.fromkeys(p.scope for p in cross):
        pairs = [p for p in cross if p.scope == scope]
        later_split = pairs[0].split_b
        copied = {p.path_b for p in pairs}
        total = sum(report.counts.get(later_split, {}).values()) if report.task == "multiclass" else None
        share = f" of {total}" if total else ""
        findings.append(f"leakage: {len(copied)}{share} {later_split} images have an exact or near copy in "
                        f"{pairs[0].split_a} ({_kinds(pairs)}); scores on {later_split} are inflated")
    within = [p for p in report.duplicates if p.scope.startswith("within")]
    if within:
        findings.append(f"{_count(len(within), 'duplicate pair')} within a split ({_kinds(within)})")
    conflicting = [p for p in report.duplicates if p.label_a != p.label_b]
    if conflicting:
        findings.append(f"{_count(len(conflicting), 'duplicate pair')} "
                        f"{'carries' if len(conflicting) == 1 else 'carry'} different labels")
    against = [p for p in report.duplicates if p.scope == AGAINST_SCOPE]
    if against:
        shared = len({p.path_a for p in against})
        findings.append(f"{_count(shared, 'image')} also appear{'s' if shared == 1 else ''} in {report.against} "
                        f"({_kinds(against)})")
    if report.near_duplicate_note:
        findings.append(report.near_duplicate_note)
    if report.patient_overlap:
        names = ", ".join(p.patient_id for p in report.patient_overlap[:5])
        more = "" if len(report.patient_overlap) <= 5 else ", ..."
        n = len(report.patient_overlap)
        findings.append(f"{_count(n, 'patient')} {'has' if n == 1 else 'have'} images in more than one split "
                        f"({names}{more})")
    unknown = report.images - report.images_with_patient_id
    if unknown:
        findings.append(f"patient unknown for {unknown} of {report.images} images: overlap between splits "
                        "cannot be checked for them")
    if report.shortcut.flagged:
        strong = [c for c, r in report.shortcut.recall_by_class.items() if r >= 0.9]
        tell = f"; recognised from metadata alone: {', '.join(strong)}" if strong else ""
        findings.append(f"shortcut: {report.shortcut.note}{tell}")
    for issues, one, many in ((report.unreadable, "unreadable file", "unreadable files"),
                              (report.skipped, "entry skipped (manifest rows, unreadable folders)",
                               "entries skipped (manifest rows, unreadable folders)")):
        if issues:
            reasons = pd.Series([i.reason for i in issues]).value_counts()
            findings.append(f"{len(issues)} {one if len(issues) == 1 else many}: "
                            + "; ".join(f"{r} ({n})" for r, n in reasons.items()))
    return findings


def _kinds(pairs: list[DuplicatePair]) -> str:
    exact = sum(p.kind == "exact" for p in pairs)
    return f"{exact} exact, {len(pairs) - exact} near pairs"


# ------------------------------------------------------------------------------------- writing


def _write(report: AuditReport, scan: _Scan, out_dir: Path, fmt: ReportFormat) -> None:
    make_folder(out_dir, "report folder")
    report.files = {"report": str(out_dir / f"audit.{fmt}"), "json": str(out_dir / "audit.json"),
                    "images": str(out_dir / "images.csv")}
    markdown = _markdown(report)
    write_text(report.files["report"], markdown if fmt == "md" else _html(markdown, report.data))
    write_text(report.files["json"], report.to_json())
    images = pd.concat([scan.samples.frame, scan.table], axis=1)
    images["phash"] = [row.tobytes().hex() for row in scan.hashes]
    with atomic_path(report.files["images"]) as tmp:
        images.to_csv(tmp, index=False)


def _class_rows(report: AuditReport) -> list[str]:
    seen = {name for split in report.counts.values() for name in split}
    return [c for c in report.classes if c in seen] + sorted(seen - set(report.classes))


def _md_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    """``1 image``, ``2 images``: a count with its noun in the right number."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _shown(items: list, what: str) -> str:
    return f"\n\nFirst {_LISTED} of {len(items)} {what}; all are in audit.json." if len(items) > _LISTED else ""


def _markdown(report: AuditReport) -> str:
    splits, classes = list(report.counts), _class_rows(report)
    parts = [f"# Dataset audit: `{report.data}`",
             f"{report.images} images, {len(report.classes)} classes ({report.task})"
             + (f", compared with `{report.against}` ({report.against_images} images)" if report.against else "")
             + f". Audit took {report.seconds:.1f} s.",
             "## Findings", "\n".join(f"- {f}" for f in report.findings) or "Nothing suspicious found."]
    parts += ["## Images per class and split", _md_table(
        ["class", *splits, "total"],
        [[c, *(report.counts[s].get(c, 0) for s in splits), sum(report.counts[s].get(c, 0) for s in splits)]
         for c in classes])]
    parts += ["## Image properties by class",
              "Readable images only; width, height and file size as min / median / max.",
              _md_table(["class", "images", "width", "height", "file size (KiB)", "formats", "modes", "bit depths"],
                        [[name, s.images, _fmt_spread(s.width), _fmt_spread(s.height),
                          _fmt_spread(s.file_bytes, 1 / 1024), _fmt_tally(s.formats), _fmt_tally(s.modes),
                          _fmt_tally(s.bit_depths)] for name, s in report.image_stats.items()])]
    parts += ["## Unreadable and skipped files"]
    for issues, what in ((report.unreadable, "unreadable files"), (report.skipped, "skipped manifest rows and unreadable folders")):
        parts.append(f"{len(issues)} {what}." + ("" if not issues else "\n\n" + _md_table(
            ["file", "reason"], [[i.path, i.reason] for i in issues[:_LISTED]]) + _shown(issues, what)))
    parts += ["## Duplicates",
              f"Exact: same file content (SHA-256; pixels for `.npz` items). Near: perceptual hashes of the "
              f"preprocessed images ({HASH_SIDE * HASH_SIDE}-bit DCT hash) at most "
              f"{report.near_duplicate_max_distance} bits apart. {report.near_duplicate_note}"]
    scopes = list(dict.fromkeys(p.scope for p in report.duplicates))
    if scopes:
        parts.append(_md_table(["scope", "exact pairs", "near pairs", "pairs with different labels"], [
            [s, sum(p.kind == "exact" for p in report.duplicates if p.scope == s),
             sum(p.kind == "near" for p in report.duplicates if p.scope == s),
             sum(p.label_a != p.label_b for p in report.duplicates if p.scope == s)] for s in scopes]))
        parts.append(_md_table(["scope", "kind", "distance", "image a", "label a", "image b", "label b"], [
            [p.scope, p.kind, p.distance, _relative(p.path_a, report.data), p.label_a,
             _relative(p.path_b, report.against if p.scope == AGAINST_SCOPE else report.data), p.label_b]
            for p in report.duplicates[:_LISTED]]) + _shown(report.duplicates, "pairs"))
    else:
        parts.append("None found.")
    parts += ["## Patients", f"Patient id known for {report.images_with_patient_id} of {report.images} images "
              f"({report.patients} patients). {len(report.patient_overlap)} patients have images in more than "
              "one split."]
    if report.patient_overlap:
        parts.append(_md_table(["patient", "images per split", "labels"], [
            [p.patient_id, _fmt_tally(p.images), ", ".join(p.labels)] for p in report.patient_overlap[:_LISTED]])
            + _shown(report.patient_overlap, "patients"))
    check = report.shortcut
    parts += ["## Shortcut check", "A random forest that sees only file metadata ("
              + ", ".join(check.features) + f") tries to predict the class. {check.note[:1].upper()}{check.note[1:]}."]
    if check.accuracy is not None:
        parts.append(_md_table(["class", "recall from metadata"],
                               [[c, f"{r:.0%}"] for c, r in check.recall_by_class.items()]))
        parts.append("Feature importances: " + ", ".join(
            f"{f} {v:.2f}" for f, v in sorted(check.importances.items(), key=lambda kv: -kv[1])) + ".")
    return "\n\n".join(parts) + "\n"


def _relative(path: str, root: str | None) -> str:
    """``path`` inside the dataset folder ``root`` (or next to its manifest), for shorter tables."""
    base = Path(root or "")
    base = base.parent if base.suffix else base
    return path[len(str(base)) + 1:] if root and path.startswith(f"{base}/") else path


def _fmt_spread(spread: Spread, scale: float = 1.0) -> str:
    return " / ".join(f"{v * scale:,.0f}" for v in (spread.min, spread.median, spread.max))


def _fmt_tally(tally: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in tally.items())


def _html(markdown: str, title: str) -> str:
    from html import escape

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    style = ("body{font-family:system-ui,sans-serif;max-width:75rem;margin:2rem auto;padding:0 1rem}"
             "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;"
             "text-align:left;font-size:.9rem}code{word-break:break-all}")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Audit: {escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")
