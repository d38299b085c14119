""".venv/bin/python bench/bench_ood.py BUNDLE [--test FOLDER] [--other-xrays FOLDER]

How well a bundle's OOD guard separates chest X-rays from inputs it must not classify.

In-distribution: the course test X-rays. Reported apart: other real chest X-rays (adult NIH, SIIM,
RSNA, PadChest, TBX11K samples: a shift in population and devices, not a wrong input) and
transformed course X-rays (rotated, upside down, mirrored, inverted as a mishandled MONOCHROME1
would be). Out-of-distribution, from scikit-image's bundled images and synthesised here: natural
photos, documents, other imaging modalities (a CT phantom, a synthetic chest-CT-like slice, a
retina fundus photo, microscopy) and degenerate inputs (blank, noise, gradients, checkerboard).

For each group: the AUROC of the OOD score against the course test X-rays and the share flagged
at the bundle's threshold, and the median percentile (where the group falls among held-out training
X-rays, 50 = typical). Prints a table and writes ``bench/results/ood-<date>-<time>.json``
with every image's score.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from skimage import data as skdata
from skimage.transform import iradon, radon
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, save_result  # noqa: E402

from chestxray.inference.predict import Predictor, expand_inputs, load_model  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "horse", "hubble_deep_field",
          "clock", "grass", "gravel", "brick", "colorwheel", "logo", "cat")
DOCUMENTS = ("page", "text")
MODALITIES = ("shepp_logan_phantom", "retina", "cell", "immunohistochemistry", "microaneurysms")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Any scikit-image array (bool, float, uint8; gray, RGB, RGBA) as uint8."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    image = image.astype(np.float64)
    low, high = image.min(), image.max()
    return np.uint8(np.round(255 * (image - low) / (high - low if high > low else 1)))


def ct_like_slice(size: int = 256) -> np.ndarray:
    """An axial chest-CT-like slice: body, two dark lungs, heart, bright spine, with CT reconstruction texture."""
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1

    slice_ = np.zeros((size, size))
    slice_[ellipse(0, 0, 0.85, 0.6)] = 0.45
    slice_[ellipse(0, 0, 0.8, 0.55)] = 0.55
    slice_[ellipse(-0.38, -0.05, 0.3, 0.4)] = 0.05
    slice_[ellipse(0.38, -0.05, 0.3, 0.4)] = 0.05
    slice_[ellipse(0.05, 0.1, 0.2, 0.22)] = 0.6
    slice_[ellipse(0, 0.45, 0.09, 0.08)] = 1.0
    angles = np.linspace(0, 180, 180, endpoint=False)
    sinogram = radon(slice_, angles, circle=False)
    sinogram += np.random.default_rng(0).normal(0, 0.02 * sinogram.max(), sinogram.shape)
    return to_uint8(np.clip(iradon(sinogram, angles, circle=False, output_size=size), 0, None))


def synthetic(size: int = 256) -> dict[str, np.ndarray]:
    ramp = np.tile(np.linspace(0, 255, size), (size, 1))
    return {"black": np.zeros((size, size)), "white": np.full((size, size), 255), "gray": np.full((size, size), 128),
            "noise": np.random.default_rng(0).integers(0, 256, (size, size)), "horizontal_gradient": ramp,
            "vertical_gradient": ramp.T, "checkerboard": skdata.checkerboard(), "binary_blobs": skdata.binary_blobs()}


def squares(predictor: Predictor, images: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    return list(images), np.stack([predictor.prepare(to_uint8(image)) for image in images.values()])


def file_squares(predictor: Predictor, folder: Path) -> tuple[list[str], np.ndarray]:
    files = [f for f, error in expand_inputs([folder]) if error is None]
    return [Path(f).name for f in files], np.stack([predictor.prepare(f) for f in files])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--test", type=Path, default=DATA / "chest_xray_4class" / "test")
    parser.add_argument("--other-xrays", type=Path, default=DATA / "dicom_samples")
    args = parser.parse_args()
    predictor = load_model(args.bundle)
    if predictor.guard is None:
        raise SystemExit(f"{args.bundle}: the bundle has no OOD guard (meta.ood is empty)")
    test_names, test = file_squares(predictor, args.test)
    groups: dict[str, tuple[list[str], np.ndarray]] = {
        "other real chest X-rays": file_squares(predictor, args.other_xrays),
        "rotated 90°": ([f"rot90 {n}" for n in test_names], np.rot90(test, axes=(1, 2)).copy()),
        "upside down": ([f"rot180 {n}" for n in test_names], test[:, ::-1, ::-1].copy()),
        "mirrored": ([f"mirror {n}" for n in test_names], test[:, :, ::-1].copy()),
        "inverted": ([f"inverted {n}" for n in test_names], 255 - test),
        "photos": squares(predictor, {n: getattr(skdata, n)() for n in PHOTOS}),
        "documents": squares(predictor, {n: getattr(skdata, n)() for n in DOCUMENTS}),
        "other modalities": squares(predictor, {**{n: getattr(skdata, n)() for n in MODALITIES},
                                                "ct_like_slice": ct_like_slice()}),
        "blank and synthetic": squares(predictor, synthetic()),
    }
    foreign = ("photos", "documents", "other modalities", "blank and synthetic")
    _, test_scores = predictor.predict_arrays(test)
    threshold = predictor.guard.threshold

    def group_row(group_scores: np.ndarray) -> dict[str, float]:
        return {"n": len(group_scores), "auroc": auroc(test_scores, group_scores),
                "flagged": float(predictor.guard.is_ood(group_scores).mean()),
                "median_score": float(np.median(group_scores)),
                "median_percentile": float(np.median(predictor.ood_percentiles(group_scores)))}

    rows, scores = {}, {"course test X-rays": dict(zip(test_names, test_scores.round(2).tolist()))}
    for name, (names, images) in groups.items():
        _, group_scores = predictor.predict_arrays(images)
        scores[name] = dict(zip(names, group_scores.round(2).tolist()))
        rows[name] = group_row(group_scores)
    rows["all foreign inputs"] = group_row(np.concatenate([list(scores[g].values()) for g in foreign]))
    summary = {"in_distribution_n": len(test_scores), "in_distribution_false_flag_rate":
               float(predictor.guard.is_ood(test_scores).mean()), "in_distribution_median_score":
               float(np.median(test_scores)), "in_distribution_median_percentile":
               float(np.median(predictor.ood_percentiles(test_scores))),
               "threshold": threshold, "quantile": predictor.guard.quantile}
    record = {"bundle": str(args.bundle), "arch": predictor.meta.arch, "image_size": predictor.image_size, **summary,
              "groups": rows, "scores": scores}
    table = Table(title=f"OOD guard of {args.bundle} (threshold {threshold:.1f}, quantile {predictor.guard.quantile}): "
                        f"{summary['in_distribution_false_flag_rate']:.1%} of {len(test_scores)} course test X-rays "
                        f"flagged, median score {summary['in_distribution_median_score']:.1f} "
                        f"(percentile {summary['in_distribution_median_percentile']:.0f})")
    for column in ("group", "n", "AUROC vs test X-rays", "flagged", "median score", "median percentile"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for name, row in rows.items():
        table.add_row(name, str(row["n"]), f"{row['auroc']:.3f}", f"{row['flagged']:.0%}",
                      f"{row['median_score']:.1f}", f"{row['median_percentile']:.0f}")
    Console().print(table)
    print(f"written: {save_result('ood', record)}")


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Probability that an out-of-distribution image scores above an in-distribution one."""
    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(labels, np.r_[in_scores, out_scores]))


if __name__ == "__main__":
    main()
