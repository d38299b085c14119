"""Training throughput of the default model: chestxray's pipeline against a naive one.

chestxray: images decoded once into the uint8 cache, augmented as a batch on tensors.
Naive: every step opens the files with PIL and runs torchvision transforms per image (what an
``ImageFolder`` + ``transforms`` script does every epoch). Same model, same optimiser step, same
images, same process, one after the other; median images/s over the timed steps.

    .venv/bin/python bench/bench_train_throughput.py [--steps 12] [--batch-size 32] [--image-size 224]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, save_result  # noqa: E402

from chestxray.data.cache import build_cache  # noqa: E402
from chestxray.training.config import TrainConfig  # noqa: E402
from chestxray.data.dataset import augment_batch, to_model_input  # noqa: E402
from chestxray.model.models import create_model  # noqa: E402
from chestxray.data.sources import load_samples  # noqa: E402


def timed_step(batches, model, optimizer) -> float:
    """Images/s of one training step, getting its batch included."""
    start = time.perf_counter()
    images, targets = next(batches)
    loss = F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return len(images) / (time.perf_counter() - start)


def cached_batches(cache, targets: np.ndarray, batch_size: int, rng: np.random.Generator):
    while True:
        rows = np.sort(rng.choice(len(targets), batch_size, replace=False))
        batch = torch.from_numpy(np.asarray(cache.images[rows])).unsqueeze(1)
        yield augment_batch(to_model_input(batch)), torch.from_numpy(targets[rows])


def naive_batches(paths: list[str], targets: np.ndarray, batch_size: int, size: int, rng: np.random.Generator):
    transform = transforms.Compose([
        transforms.Grayscale(), transforms.Resize(size - 1, max_size=size), transforms.CenterCrop(size),
        transforms.RandomAffine(10, translate=(0.06, 0.06), scale=(0.9, 1.1)),
        transforms.ColorJitter(brightness=0.1, contrast=0.2), transforms.ToTensor()])
    while True:
        rows = rng.choice(len(targets), batch_size, replace=False)
        images = torch.stack([transform(Image.open(paths[r]).convert("RGB")) for r in rows])
        yield images, torch.from_numpy(targets[rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA / "chest_xray_4class")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=TrainConfig().image_size)
    args = parser.parse_args()
    samples = load_samples(args.data).split("train")
    targets = samples.targets()
    config = TrainConfig()
    model = create_model(config.arch, len(samples.classes), config.weights).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    results = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cache = build_cache(samples, args.image_size, cache_dir=cache_dir, progress=False)
        cache_seconds = time.perf_counter() - start
        batches = {"chestxray (cache + tensor augmentation)":
                   cached_batches(cache, targets, args.batch_size, np.random.default_rng(0)),
                   "naive (PIL decode + torchvision transforms per step)":
                   naive_batches(list(samples.frame["path"]), targets, args.batch_size, args.image_size,
                                 np.random.default_rng(0))}
        for _ in range(2):  # warm-up: allocator and kernels, for both pipelines
            for source in batches.values():
                timed_step(source, model, optimizer)
        rates: dict[str, list[float]] = {name: [] for name in batches}
        for _ in range(args.steps):  # interleaved, so that drift in machine speed hits both alike
            for name, source in batches.items():
                rates[name].append(timed_step(source, model, optimizer))
        for name, values in rates.items():
            results[name] = {"median_images_per_s": round(statistics.median(values), 2),
                             "min": round(min(values), 2), "max": round(max(values), 2)}
            print(f"{name}: median {results[name]['median_images_per_s']} images/s")
    ours, naive = (v["median_images_per_s"] for v in results.values())
    record = {"arch": config.arch, "image_size": args.image_size, "batch_size": args.batch_size,
              "steps": args.steps, "results": results, "ratio": round(ours / naive, 2),
              "cache_build_seconds": round(cache_seconds, 2),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    path = save_result("train-throughput", record)
    print(f"ratio {record['ratio']}x, cache built in {cache_seconds:.1f} s, peak memory {record['peak_rss_mb']} MB")
    print(f"result: {path}")


if __name__ == "__main__":
    main()
