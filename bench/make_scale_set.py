""".venv/bin/python bench/make_scale_set.py N --out DIR [--source FOLDER] [--seed 0] [--workers 2]

Writes N small X-ray images derived from the course images, for audits at NIH scale, with
duplicates planted across splits and the list of what was planted:

- ``images/NNN/sNNNNNNN.png|jpg``: each image a random crop (45-85% of the area) of one of the course
  training images, maybe mirrored, rotated by up to 10 degrees, with its own gamma, contrast,
  brightness and noise, resized to 64-128 px a side and stored as PNG or JPEG;
- ``manifest.csv`` in NIH's format (``Image Index``, ``Finding Labels``, ``Patient ID``) plus a
  ``split`` column: each base image takes a row of the real NIH label file (multi-label findings and
  the patient id), its split follows the patient (train 70%, val 10%, test 20%);
- ``planted.csv``: the planted pairs (``kind`` exact or near, ``path_a``, ``path_b``, their splits and
  the ``edit``). 1% of the images are byte copies of another image, 3% near copies: the other image
  re-rendered with one or two mild edits (JPEG re-encoding, brightness, contrast, gamma, resizing,
  noise, blur, a crop of at most 1%). 80% of the copies go to another split (a leak), 20% to the same
  one; a copy keeps its original's labels and patient id.
- ``origin.csv``: the course image each file was derived from.

Decoding and encoding run in at most ``--workers`` processes. Output goes under ``--out`` (use
/tmp or runs/, never the repository).
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA  # noqa: E402

NIH_LABELS = DATA / "dicom_samples" / "nih_Data_Entry_2017_v2020.csv.gz"
SPLITS = (("train", 0.7), ("val", 0.1), ("test", 0.2))
EXACT_SHARE, NEAR_SHARE, CROSS_SPLIT_SHARE = 0.01, 0.03, 0.8
EDITS = ("jpeg", "brightness", "contrast", "gamma", "resize", "noise", "blur", "crop")
_SOURCE_SIDE = 320  # course images are shrunk to this longer side once, before any crop
_SOURCES: list[np.ndarray] = []


def load_sources(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"{folder}: no PNG or JPEG images")
    return files


def _init_worker(files: list[Path]) -> None:
    for file in files:
        image = cv2.imread(str(file), cv2.IMREAD_GRAYSCALE)
        scale = _SOURCE_SIDE / max(image.shape)
        if scale < 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        _SOURCES.append(image)


def render_base(source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``source``, maybe mirrored, rotated, with new intensities, noise and size."""
    h, w = source.shape
    area, aspect = rng.uniform(0.45, 0.85) * h * w, math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    ch, cw = min(h, round(math.sqrt(area / aspect))), min(w, round(math.sqrt(area * aspect)))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    image = source[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    turn = cv2.getRotationMatrix2D((cw / 2, ch / 2), rng.uniform(-10, 10), 1.0)
    image = cv2.warpAffine(np.ascontiguousarray(image), turn, (cw, ch), borderMode=cv2.BORDER_REFLECT)
    side = int(rng.integers(64, 129))
    scale = side / max(ch, cw)
    image = cv2.resize(image, (max(16, round(cw * scale)), max(16, round(ch * scale))), interpolation=cv2.INTER_AREA)
    values = (image.astype(np.float32) / 255) ** math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
    values = values * rng.uniform(0.8, 1.2) * 255 + rng.uniform(-20, 20)
    values += rng.normal(0, rng.uniform(0, 6), values.shape)
    return np.clip(values, 0, 255).astype(np.uint8)


def edit(image: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """One mild edit of the kind that makes a near copy (those the audit's threshold was measured on)."""
    if name == "jpeg":
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(50, 91))])
        return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if name == "resize":
        scale = rng.uniform(0.6, 0.9)
        return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    if name == "blur":
        return cv2.GaussianBlur(image, (3, 3), 0)
    if name == "crop":
        h, w = image.shape
        cut = max(1, round(0.01 * (h if rng.random() < 0.5 else w)))
        return image[cut:] if rng.random() < 0.5 and h > w else image[:, cut:]
    values = image.astype(np.float32)
    if name == "brightness":
        values += rng.uniform(-0.1, 0.1) * 255
    elif name == "contrast":
        values = (values - values.mean()) * rng.uniform(0.85, 1.2) + values.mean()
    elif name == "gamma":
        values = 255 * (values / 255) ** rng.uniform(0.8, 1.25)
    elif name == "noise":
        values += rng.normal(0, rng.uniform(2, 4), values.shape)
    return np.clip(values, 0, 255).astype(np.uint8)


def _render(job: tuple[int, int, int, str, str, str]) -> int:
    """Render and write one image: the base image of seed ``base_seed``, edited when ``edits``."""
    index, source, base_seed, edits, suffix, path = job
    image = render_base(_SOURCES[source], np.random.default_rng(base_seed))
    rng = np.random.default_rng([base_seed, index])
    for name in filter(None, edits.split("+")):
        image = edit(image, name, rng)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(75, 96))] if suffix == ".jpg" else []
    ok, data = cv2.imencode(suffix, image, params)
    Path(path).write_bytes(data.tobytes())
    return index


def plan(n: int, n_sources: int, seed: int) -> pd.DataFrame:
    """One row per output image: which source, base seed, edits, format, split, NIH row, original."""
    rng = np.random.default_rng(seed)
    n_exact, n_near = round(n * EXACT_SHARE), round(n * NEAR_SHARE)
    n_base = n - n_exact - n_near
    nih = pd.read_csv(NIH_LABELS, usecols=["Finding Labels", "Patient ID"], dtype=str)
    rows = rng.choice(len(nih), n_base, replace=n_base > len(nih))
    base = pd.DataFrame({"source": rng.integers(0, n_sources, n_base), "base_seed": rng.integers(0, 2**62, n_base),
                         "edits": "", "suffix": rng.choice([".png", ".jpg"], n_base), "original": -1,
                         "labels": nih["Finding Labels"].to_numpy()[rows], "patient": nih["Patient ID"].to_numpy()[rows]})
    patient_split = _split_of_patients(base["patient"].unique(), rng)
    base["split"] = base["patient"].map(patient_split)
    originals = rng.choice(n_base, n_exact + n_near, replace=False)
    copies = base.iloc[originals].copy()
    copies["original"] = originals
    copies["kind"] = ["exact"] * n_exact + ["near"] * n_near
    picks = [rng.choice(EDITS, int(rng.integers(1, 3)), replace=False) for _ in range(n_near)]
    copies.loc[copies["kind"] == "near", "edits"] = ["+".join(p) for p in picks]
    copies.loc[copies["edits"].str.contains("jpeg"), "suffix"] = ".jpg"
    names = [s for s, _ in SPLITS]
    cross = rng.random(len(copies)) < CROSS_SPLIT_SHARE
    copies["split"] = [rng.choice([s for s in names if s != old]) if c else old for old, c in zip(copies["split"], cross)]
    base["kind"] = ""
    table = pd.concat([base, copies], ignore_index=True)
    order = rng.permutation(len(table))  # copies are not all at the end of the listing
    position = np.empty(len(table), dtype=np.int64)
    position[order] = np.arange(len(table))
    table = table.iloc[np.argsort(position)].reset_index(drop=False).rename(columns={"index": "row"})
    new_index = dict(zip(table["row"], table.index))
    table["original"] = [new_index[o] if o >= 0 else -1 for o in table["original"]]
    table["file"] = [f"images/{i // 1000:03d}/s{i:07d}{s}" for i, s in zip(table.index, table["suffix"])]
    return table.drop(columns="row")


def _split_of_patients(patients: np.ndarray, rng: np.random.Generator) -> dict[str, str]:
    draws = rng.random(len(patients))
    edges = np.cumsum([share for _, share in SPLITS])
    return {p: SPLITS[int(np.searchsorted(edges, d, side="right"))][0] for p, d in zip(patients, draws)}


def write_set(table: pd.DataFrame, out: Path, sources: list[Path], workers: int) -> None:
    for folder in sorted({str(Path(f).parent) for f in table["file"]}):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rendered = table[table["kind"] != "exact"]
    jobs = [(int(i), int(r.source), int(r.base_seed), r.edits, r.suffix, str(out / r.file))
            for i, r in zip(rendered.index, rendered.itertuples())]
    with Pool(workers, initializer=_init_worker, initargs=(sources,)) as pool:
        for _ in pool.imap_unordered(_render, jobs, chunksize=64):
            pass
    for row in table[table["kind"] == "exact"].itertuples():  # a copy keeps its original's suffix
        shutil.copyfile(out / table.at[row.original, "file"], out / row.file)


def write_tables(table: pd.DataFrame, out: Path, sources: list[Path]) -> None:
    table[["file", "labels", "patient", "split"]].set_axis(
        ["Image Index", "Finding Labels", "Patient ID", "split"], axis=1).to_csv(out / "manifest.csv", index=False)
    copies = table[table["kind"] != ""]
    planted = pd.DataFrame({"kind": copies["kind"], "path_a": table.loc[copies["original"], "file"].to_numpy(),
                            "path_b": copies["file"], "split_a": table.loc[copies["original"], "split"].to_numpy(),
                            "split_b": copies["split"], "edit": copies["edits"]})
    planted.to_csv(out / "planted.csv", index=False, quoting=csv.QUOTE_MINIMAL)
    pd.DataFrame({"file": table["file"], "source": [str(sources[s]) for s in table["source"]]}).to_csv(
        out / "origin.csv", index=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, help="number of images to write")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; must be empty or new)")
    parser.add_argument("--source", type=Path, default=DATA / "chest_xray_4class" / "train",
                        help="folder of the real images to derive from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes (at most 2 on the shared machine)")
    args = parser.parse_args()
    if args.n < 10:
        raise SystemExit("N must be at least 10")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out}: not empty")
    started = time.perf_counter()
    sources = load_sources(args.source)
    table = plan(args.n, len(sources), args.seed)
    write_set(table, args.out, sources, min(2, max(1, args.workers)))
    write_tables(table, args.out, sources)
    mib = sum(f.stat().st_size for f in (args.out / "images").rglob("*") if f.is_file()) / 2**20
    print(f"{args.out}: {len(table)} images ({mib:.0f} MiB), {int((table['kind'] == 'exact').sum())} exact and "
          f"{int((table['kind'] == 'near').sum())} near copies planted, in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
