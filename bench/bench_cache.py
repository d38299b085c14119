""".venv/bin/python bench/bench_cache.py [--data FOLDER] [--sizes 224 384]

Cache-build throughput: images per second cold (fresh cache folder), warm (second call), with one
worker, and the naive alternative (Pillow full decode + resize of every image, one process).

Prints a table and writes ``bench/results/cache-<date>-<time>.json``. "Cold" means a new cache
folder; the image files themselves are likely in the operating system's page cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, save_result  # noqa: E402

from chestxray.data.cache import build_cache  # noqa: E402
from chestxray.data.sources import Samples, load_samples  # noqa: E402


def timed(action) -> float:
    """Seconds ``action()`` takes."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def naive_decode_resize(samples: Samples, size: int) -> None:
    """What a plain training loop does every epoch: decode each full image, then resize it."""
    for path in samples.frame["path"]:
        with Image.open(path) as image:
            image.convert("L").resize((size, size), Image.Resampling.BILINEAR)


def bench_size(samples: Samples, size: int) -> list[dict]:
    """Cold, warm, one-worker and naive timings at ``size`` pixels."""
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        build = partial(build_cache, samples, size, cache_dir=cache_dir, progress=False)
        rows.append(("cache, cold", timed(build)))
        rows.append(("cache, warm", timed(build)))
    with tempfile.TemporaryDirectory() as cache_dir:
        rows.append(("cache, cold, 1 worker",
                     timed(partial(build_cache, samples, size, cache_dir=cache_dir, progress=False, workers=1))))
    rows.append(("naive: Pillow decode + resize", timed(partial(naive_decode_resize, samples, size))))
    return [{"method": method, "size": size, "seconds": round(seconds, 4),
             "images_per_s": round(len(samples) / seconds, 1)} for method, seconds in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA / "chest_xray_4class",
                        help="dataset folder, manifest or .npz")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224], help="image sizes to cache at")
    args = parser.parse_args()
    samples = load_samples(args.data)
    load_before = os.getloadavg()[0]
    results = [row for size in args.sizes for row in bench_size(samples, size)]
    files = [Path(p) for p in samples.frame["path"] if Path(p).is_file()]
    record = {
        "data": str(args.data), "images": len(samples), "mib": round(sum(f.stat().st_size for f in files) / 2**20, 1),
        "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "results": results}
    table = Table(title=f"{args.data}: {len(samples)} images, {record['mib']} MiB, {os.cpu_count()} CPUs, "
                        f"load {record['load_average_before']} -> {record['load_average_after']}")
    for column in ("method", "size", "seconds", "images/s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in results:
        table.add_row(row["method"], str(row["size"]), f"{row['seconds']:.2f}", f"{row['images_per_s']:,.0f}")
    Console().print(table)
    print(f"written: {save_result('cache', record)}")


if __name__ == "__main__":
    main()
