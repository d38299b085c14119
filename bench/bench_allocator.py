"""Training images/s of the default model on glibc's malloc against tcmalloc, interleaved in one run.

Each measurement is a fresh process (the allocator is chosen when a process starts): the default
model (architecture, image size, channels-last) trains ``--steps`` steps on real cached X-rays with the
default augmentation, batch 32; the processes alternate glibc, tcmalloc, glibc, tcmalloc... so that a
change in machine speed hits both alike. Reported per allocator: median images/s over the timed steps
(after two warm-up steps), user and system CPU seconds and minor page faults of the whole process.

    .venv/bin/python bench/bench_allocator.py [--rounds 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, save_result  # noqa: E402

from chestxray.allocator import find_library  # noqa: E402


def child(args: argparse.Namespace) -> None:
    """One process: time training steps, print a JSON line."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from chestxray.allocator import active_allocator
    from chestxray.data.cache import build_cache
    from chestxray.training.config import TrainConfig
    from chestxray.data.dataset import augment_batch, to_model_input
    from chestxray.model.models import create_model
    from chestxray.data.sources import load_samples

    config = TrainConfig()
    samples = load_samples(args.data).split("train")
    targets = samples.targets()
    cache = build_cache(samples, config.preprocessing(), progress=False)
    model = create_model(config.arch, len(samples.classes), config.weights).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    rng = np.random.default_rng(0)
    rates = []
    for step in range(args.steps + 2):
        start = time.perf_counter()
        rows = np.sort(rng.choice(len(targets), args.batch_size, replace=False))
        images = augment_batch(to_model_input(torch.from_numpy(np.asarray(cache.images[rows])).unsqueeze(1)))
        loss = F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)),
                               torch.from_numpy(targets[rows]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 2:
            rates.append(args.batch_size / (time.perf_counter() - start))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"allocator": active_allocator(), "median_images_per_s": statistics.median(rates),
                      "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
                      "peak_rss_mb": usage.ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA / "chest_xray_4class")
    parser.add_argument("--rounds", type=int, default=2, help="glibc/tcmalloc pairs")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    library = find_library("tcmalloc")
    if library is None:
        sys.exit("tcmalloc is not installed (make installs it: Debian libtcmalloc-minimal4)")
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    envs = {"glibc": base, "tcmalloc": {**base, "LD_PRELOAD": str(library)}}
    runs: dict[str, list[dict]] = {name: [] for name in envs}
    command = [sys.executable, __file__, "--child", "--data", str(args.data), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size)]
    for round_ in range(args.rounds):
        for name, env in envs.items():
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {name}: {runs[name][-1]['median_images_per_s']:.2f} images/s, "
                  f"sys {runs[name][-1]['sys_s']:.0f} s, {runs[name][-1]['minor_faults'] / 1e6:.2f} M faults",
                  flush=True)
    summary = {name: {"median_images_per_s": round(statistics.median(r["median_images_per_s"] for r in values), 2),
                      "runs": values} for name, values in runs.items()}
    ratio = summary["tcmalloc"]["median_images_per_s"] / summary["glibc"]["median_images_per_s"]
    record = {"batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "results": summary,
              "ratio_tcmalloc_over_glibc": round(ratio, 2)}
    path = save_result("allocator", record)
    print(f"tcmalloc / glibc: {ratio:.2f}x  ->  {path}")


if __name__ == "__main__":
    main()
