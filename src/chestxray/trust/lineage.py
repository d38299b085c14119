"""What a bundle was trained on and where it came from: compact content hashes and lineage records.

A bundle stores the content hashes of its training and validation images (the first 64 bits of
each image's SHA-256, :func:`~chestxray.decode.content_hash`, sorted and base64-encoded: 8 bytes an
image, 42 KB for PneumoniaMNIST's 5232), so that evaluating or adapting on images it was trained on
is noticed whatever the files are called. A chance collision of two different images is about
one in 10^12 for ten thousand images against ten thousand.

A site-adapted bundle records its *lineage*: the parent bundle's id and weights SHA-256, a
fingerprint of the local images (their content hashes and labels), the image count per class, the
adaptation mode and the date.
"""

from __future__ import annotations

__all__ = ["HASH_BITS", "HASH_NAME", "short_hash", "short_hashes", "encode_hashes", "decode_hashes",
           "seen_images_record", "merge_seen", "SeenCheck", "check_seen", "data_fingerprint", "describe_lineage", "lineage_record"]

import base64
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..data.decode import content_hash
from ..model.bundle import WEIGHTS_FILE
from ..provenance import file_sha256

HASH_BITS = 64
HASH_NAME = "sha256/64"


def short_hash(ref: str) -> int | None:
    """The first 64 bits of an image's content hash as an integer; ``None`` when it cannot be read."""
    try:
        return int(content_hash(ref)[:HASH_BITS // 4], 16)
    except Exception:  # unreadable images are reported by whoever decodes them
        return None


def short_hashes(refs: Iterable[str]) -> np.ndarray:
    """Short hashes (uint64, one per readable image, in order; unreadable ones left out)."""
    values = [h for h in map(short_hash, refs) if h is not None]
    return np.array(values, dtype=np.uint64)


def encode_hashes(hashes: np.ndarray) -> str:
    """Sorted, de-duplicated hashes as base64 of their little-endian bytes."""
    return base64.b64encode(np.unique(np.asarray(hashes, dtype="<u8")).tobytes()).decode()


def decode_hashes(text: str) -> np.ndarray:
    """The hashes :func:`encode_hashes` wrote (sorted uint64)."""
    return np.frombuffer(base64.b64decode(text), dtype="<u8").astype(np.uint64)


def seen_images_record(train_refs: Sequence[str], val_refs: Sequence[str]) -> dict[str, Any]:
    """The bundle's ``seen_images`` field: encoded hashes of the training and validation images."""
    train, val = short_hashes(train_refs), short_hashes(val_refs)
    return {"hash": HASH_NAME, "train": encode_hashes(train), "val": encode_hashes(val),
            "n_train": int(len(np.unique(train))), "n_val": int(len(np.unique(val)))}


def merge_seen(record: dict[str, Any] | None, *, train: np.ndarray = (), val: np.ndarray = ()) -> dict[str, Any]:
    """``record`` (a ``seen_images`` field, or ``None``) with more training and validation hashes added."""
    record = record if record and record.get("hash") == HASH_NAME else {}
    merged_train = np.union1d(decode_hashes(record.get("train", "")), np.asarray(train, dtype=np.uint64))
    merged_val = np.union1d(decode_hashes(record.get("val", "")), np.asarray(val, dtype=np.uint64))
    return {"hash": HASH_NAME, "train": encode_hashes(merged_train), "val": encode_hashes(merged_val),
            "n_train": int(len(merged_train)), "n_val": int(len(merged_val))}


@dataclass
class SeenCheck:
    """How many of some images a bundle was trained (or validated) on."""

    n_checked: int
    n_train: int
    n_val: int
    examples: list[str]

    @property
    def n_seen(self) -> int:
        """Images that were training or validation images."""
        return self.n_train + self.n_val

    def warning(self, what: str = "evaluated") -> str | None:
        """One line for the user, ``None`` when none was seen."""
        if not self.n_seen:
            return None
        return (f"{self.n_seen} of the {self.n_checked} {what} images were this model's training "
                f"({self.n_train}) or validation ({self.n_val}) images (same content), e.g. {self.examples[0]}; "
                "figures on them are optimistic")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"n_checked": self.n_checked, "n_training_images": self.n_train, "n_validation_images": self.n_val,
                "examples": self.examples}


def check_seen(record: dict[str, Any] | None, refs: Sequence[str], hashes: np.ndarray | None = None) -> SeenCheck | None:
    """Which of ``refs`` the bundle's ``seen_images`` record contains; ``None`` when the bundle has none.

    ``hashes`` (one per ref, from :func:`short_hash`; 0 for unreadable) saves reading the files again.
    """
    if not record or record.get("hash") != HASH_NAME:
        return None
    if hashes is None:
        hashes = np.array([short_hash(r) or 0 for r in refs], dtype=np.uint64)
    train, val = decode_hashes(record.get("train", "")), decode_hashes(record.get("val", ""))
    in_train, in_val = np.isin(hashes, train), np.isin(hashes, val) & ~np.isin(hashes, train)
    seen = np.flatnonzero(in_train | in_val)
    return SeenCheck(len(refs), int(in_train.sum()), int(in_val.sum()), [str(refs[i]) for i in seen[:3]])


def data_fingerprint(hashes: np.ndarray, labels: Sequence[str]) -> str:
    """A fingerprint of labelled images by content (not by file name or order): 24 hex digits."""
    pairs = sorted(f"{int(h):016x}:{label}" for h, label in zip(np.asarray(hashes, dtype=np.uint64), labels))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()[:24]


def describe_lineage(lineage: dict[str, Any] | None) -> str | None:
    """One line naming the site adaptation a bundle carries, ``None`` for a bundle that was not adapted."""
    if not lineage:
        return None
    if lineage.get("mode") == "unlabeled":
        ruled_out = ", ".join(lineage.get("absent_classes") or []) or "none"
        return (f"site-adapted without labels on {lineage.get('n_images')} images (classes ruled out: {ruled_out}), "
                f"data {str(lineage.get('data_fingerprint', ''))[:12]}, from parent {lineage.get('parent_id')} "
                f"on {str(lineage.get('date', ''))[:10]}")
    if lineage.get("mode") not in ("recalibrate", "finetune"):
        return f"warm-started from {lineage.get('parent_id')} on {str(lineage.get('date', ''))[:10]}"
    counts = ", ".join(f"{k} {v}" for k, v in (lineage.get("class_counts") or {}).items())
    return (f"site-adapted ({lineage.get('mode')}) on {lineage.get('n_images')} local images ({counts}), "
            f"data {str(lineage.get('data_fingerprint', ''))[:12]}, from parent {lineage.get('parent_id')} "
            f"on {str(lineage.get('date', ''))[:10]}")


def lineage_record(parent_dir: str | Path, parent: Any, mode: str, **fields: Any) -> dict[str, Any]:
    """The one lineage record a child bundle carries (a warm start, every site adaptation): its mode, its
    parent (``parent``: the parent's ``BundleMeta``; id, weights sha256, folder, the parent's own
    lineage), what the mode knows besides (``fields``: the site's data, counts, classes ruled out) and
    the date."""
    return {"mode": mode, "parent_id": parent.model_id,
            "parent_weights_sha256": file_sha256(Path(parent_dir) / WEIGHTS_FILE), "parent_bundle": str(parent_dir),
            "parent_lineage": parent.lineage, **fields,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
