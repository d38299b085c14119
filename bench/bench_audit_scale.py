""".venv/bin/python bench/bench_audit_scale.py [SET ...] [--nih] [--brute-max 30000] [--faiss]

The audit at NIH scale. Each SET is a folder written by ``bench/make_scale_set.py``; for each:

- the audit of its ``manifest.csv`` with a new (cold) cache folder, timed by phase: file metadata
  (headers and SHA-256), decoding into the cache, perceptual hashing, the near-duplicate search and
  the rest (patients, shortcut check, report files);
- the recall of the planted exact and near pairs (``planted.csv``), the planted pairs' hash
  distances, the pairs found that were not planted (and how many of them come from the same course
  image), and whether the report carries a note on the search;
- the search alone on the set's hashes (from the audit's images.csv): the index, brute force (sets of
  at most ``--brute-max`` images) and, with ``--faiss`` where ``faiss`` imports, FAISS's
  ``IndexBinaryFlat`` and ``IndexBinaryMultiHash`` range searches, each checked against the index.

``--nih`` times reading the 112,120-row NIH label CSV as a manifest (``load_samples``) and its
patient-grouped train/validation split (``train_val_split``). The loader drops rows whose file does
not exist, so the CSV is read next to 112,120 empty placeholder files in a temporary folder.

Writes ``bench/results/audit-scale-<date>-<time>.json``. Run it alone: the load average is recorded
with each figure, and other work on the machine slows every phase.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, save_result  # noqa: E402

import chestxray.data.audit as audit_module  # noqa: E402
from chestxray.data.hamming import close_pairs  # noqa: E402
from chestxray.data.sources import load_samples  # noqa: E402
from chestxray.data.splits import train_val_split  # noqa: E402

NIH_LABELS = DATA / "dicom_samples" / "nih_Data_Entry_2017_v2020.csv.gz"
PHASES = {"metadata_table": "metadata", "build_cache": "decode", "perceptual_hashes": "hash",
          "close_pairs": "search"}


def timed_phases(seconds: dict[str, float]) -> dict:
    """Wrap the audit's steps (module globals it calls) so that each call adds to ``seconds``;
    returns the originals, for :func:`restore`."""
    originals = {name: getattr(audit_module, name) for name in PHASES}
    for name, phase in PHASES.items():
        def wrapper(*args, _original=originals[name], _phase=phase, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_phase] += time.perf_counter() - start
        setattr(audit_module, name, wrapper)
    return originals


def audit_set(folder: Path, work: Path) -> tuple[dict, pd.DataFrame]:
    seconds: dict[str, float] = defaultdict(float)
    originals = timed_phases(seconds)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        report = audit_module.audit(folder / "manifest.csv", out_dir=work / "report", cache_dir=work / "cache",
                                    progress=False)
    finally:
        for name, function in originals.items():
            setattr(audit_module, name, function)
    total = time.perf_counter() - start
    images = pd.read_csv(report.files["images"], keep_default_na=False)
    record = {"set": str(folder), "images": report.images, "seconds": round(total, 1),
              "phases_s": {k: round(v, 2) for k, v in seconds.items()},
              "rest_s": round(total - sum(seconds.values()), 2), "load_average_before": round(load, 2),
              "load_average_after": round(os.getloadavg()[0], 2), "near_duplicate_note": report.near_duplicate_note,
              "cap_note_in_findings": any("not searched" in f for f in report.findings),
              **recall(folder, report, images)}
    return record, images


def recall(folder: Path, report, images: pd.DataFrame) -> dict:
    """Planted pairs found, their hash distances, and the pairs found beyond them."""
    planted = pd.read_csv(folder / "planted.csv", keep_default_na=False)
    origin = pd.read_csv(folder / "origin.csv")
    source = dict(zip((str(folder / f) for f in origin["file"]), origin["source"]))
    found = {frozenset((p.path_a, p.path_b)): p for p in report.duplicates}
    hashes = {p: np.frombuffer(bytes.fromhex(h), dtype=np.uint64) for p, h in zip(images["path"], images["phash"])}
    out: dict = {}
    keys = set()
    for kind in ("exact", "near"):
        rows = planted[planted["kind"] == kind]
        pairs = [frozenset((str(folder / a), str(folder / b))) for a, b in zip(rows["path_a"], rows["path_b"])]
        keys.update(pairs)
        hits = [p in found and (kind == "near" or found[p].kind == "exact") for p in pairs]
        distance = np.array([int(np.bitwise_count(hashes[a] ^ hashes[b]).sum()) for a, b in map(tuple, pairs)])
        out[kind] = {"planted": len(pairs), "found": int(sum(hits)), "recall": round(float(np.mean(hits)), 4),
                     "distance_max": int(distance.max()), "distance_p99": float(np.percentile(distance, 99)),
                     "over_threshold": int((distance > report.near_duplicate_max_distance).sum())}
    extra = [p for p in found if p not in keys]
    out["unplanted_pairs_found"] = len(extra)
    out["unplanted_same_course_image"] = sum(len({source.get(x) for x in p}) == 1 for p in extra)
    return out


def search_only(images: pd.DataFrame, max_distance: int, brute_max: int, use_faiss: bool) -> list[dict]:
    """The near-duplicate search alone on the audit's hashes, by each method, checked against the index."""
    readable = images[images["problem"] == ""]
    hashes = np.stack([np.frombuffer(bytes.fromhex(h), dtype=np.uint64) for h in readable["phash"]])
    rows = []
    start = time.perf_counter()
    reference = close_pairs(hashes, None, max_distance, method="index")
    rows.append({"method": "index (numpy multi-index hashing)", "seconds": time.perf_counter() - start,
                 "pairs": len(reference[0]), "same_pairs": True})
    expected = set(zip(reference[0].tolist(), reference[1].tolist()))
    runs = []
    if len(hashes) <= brute_max:
        runs.append(("brute force (numpy, every pair)", lambda: close_pairs(hashes, None, max_distance, method="brute")))
    if use_faiss:
        runs += faiss_runs(hashes, max_distance, brute_max)
    for name, run in runs:
        start = time.perf_counter()
        i, j, _ = run()
        seconds = time.perf_counter() - start
        rows.append({"method": name, "seconds": seconds, "pairs": len(i),
                     "same_pairs": set(zip(np.asarray(i).tolist(), np.asarray(j).tolist())) == expected})
    for row in rows:
        row.update(images=len(hashes), seconds=round(row["seconds"], 3), load_average=round(os.getloadavg()[0], 2))
    return rows


def faiss_runs(hashes: np.ndarray, max_distance: int, brute_max: int) -> list:
    try:
        import faiss
    except ImportError:
        print("faiss does not import: its rows are left out")
        return []
    codes = np.ascontiguousarray(hashes).view(np.uint8)
    bits = codes.shape[1] * 8

    def ranged(index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        index.add(codes)
        lims, distance, found = index.range_search(codes, max_distance + 1)  # radius is exclusive
        i = np.repeat(np.arange(len(codes)), np.diff(lims).astype(np.int64))
        keep = i < found
        return i[keep], found[keep], distance[keep]

    def multihash():  # exact: 11 tables of 23 bits, 2 flips each (11 * 3 > 32)
        index = faiss.IndexBinaryMultiHash(bits, max_distance // 3 + 1, min(bits // (max_distance // 3 + 1), 24))
        index.nflip = 2
        return ranged(index)

    runs = [(f"faiss {faiss.__version__} IndexBinaryFlat range search ({faiss.omp_get_max_threads()} threads)",
             lambda: ranged(faiss.IndexBinaryFlat(bits)))]
    if len(hashes) <= brute_max:
        runs.append(("faiss IndexBinaryMultiHash range search (nflip 2)", multihash))
    return runs


def nih_sources_and_splits() -> dict:
    with tempfile.TemporaryDirectory(prefix="nih-placeholders-") as tmp:
        folder = Path(tmp)
        manifest = folder / "manifest.csv"
        with gzip.open(NIH_LABELS, "rb") as src, open(manifest, "wb") as dst:
            shutil.copyfileobj(src, dst)
        names = pd.read_csv(manifest, usecols=["Image Index"])["Image Index"]
        for name in names:
            (folder / name).touch()
        load = os.getloadavg()[0]
        start = time.perf_counter()
        samples = load_samples(manifest)
        sources_s = time.perf_counter() - start
        start = time.perf_counter()
        train, val = train_val_split(samples, 0.2, seed=0)
        splits_s = time.perf_counter() - start
        return {"rows": len(names), "samples": len(samples), "classes": len(samples.classes), "task": samples.task,
                "patients": int(samples.frame["patient_id"].nunique()), "sources_s": round(sources_s, 2),
                "splits_s": round(splits_s, 2), "train": len(train), "val": len(val),
                "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", type=Path, nargs="*", help="folders written by bench/make_scale_set.py")
    parser.add_argument("--nih", action="store_true", help="time sources + splits on the NIH label CSV")
    parser.add_argument("--brute-max", type=int, default=30_000, help="largest set compared pair by pair")
    parser.add_argument("--faiss", action="store_true", help="also time FAISS's binary indexes (if installed)")
    parser.add_argument("--work", type=Path, default=None, help="folder for caches and reports (default: a temp folder)")
    args = parser.parse_args()
    record: dict = {"audits": [], "search": [], "uptime_before": Path("/proc/loadavg").read_text().strip()}
    console = Console()
    for folder in args.sets:
        with tempfile.TemporaryDirectory(prefix="audit-scale-", dir=args.work) as work:
            result, images = audit_set(folder, Path(work))
        record["audits"].append(result)
        console.print(result)
        record["search"] += search_only(images, audit_module.NEAR_DUPLICATE_MAX_DISTANCE, args.brute_max, args.faiss)
    if args.nih:
        record["nih"] = nih_sources_and_splits()
        console.print(record["nih"])
    record["uptime_after"] = Path("/proc/loadavg").read_text().strip()
    table = Table(title="near-duplicate search alone (256-bit hashes, distance <= 32)")
    for column in ("images", "method", "seconds", "pairs", "same pairs"):
        table.add_column(column)
    for row in record["search"]:
        table.add_row(str(row["images"]), row["method"], f"{row['seconds']:.2f}", str(row["pairs"]), str(row["same_pairs"]))
    console.print(table)
    print(f"written: {save_result('audit-scale', record)}")


if __name__ == "__main__":
    main()
