"""Torch datasets over the preprocessing cache, and X-ray-safe augmentation on batched tensors.

Images stay uint8 until they reach the model: a batch is converted to float in [0, 1] and
augmented in one vectorised step (:func:`augment_batch`), on whatever device the model is on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

__all__ = ["CachedDataset", "EpochSampler", "epoch_seed", "to_model_input", "augment_batch", "photometric_batch",
           "mix_batch"]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's random draws: a function of the run's seed and the epoch alone, so that a
    resumed run, or one with another number of loader workers, draws what an uninterrupted one draws."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


class EpochSampler(Sampler[int]):
    """Training order drawn from ``(seed, epoch)`` alone: a permutation of ``n`` rows, or, with ``weights``,
    ``n`` rows drawn with replacement in proportion to them (class balancing).

    torch's ``RandomSampler`` draws from the global generator, so the order depended on what else had
    drawn before it (a loader's worker seeds: a different ``num_workers`` gave a different run) and a
    resumed run could not repeat an uninterrupted one. Lightning calls :meth:`set_epoch` before each epoch.
    """

    def __init__(self, n: int, seed: int, weights: np.ndarray | None = None) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0
        self.p = None if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.p is None else rng.choice(self.n, self.n, replace=True, p=self.p)
        return iter(order.tolist())


class CachedDataset(Dataset):
    """``(image uint8 (1, S, S), target)`` pairs read from a cache array at the given rows."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, rows: np.ndarray) -> None:
        self.images = images
        self.targets = torch.as_tensor(np.array(targets))
        self.rows = np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = int(self.rows[index])
        image = torch.from_numpy(np.array(self.images[row], dtype=np.uint8, copy=True))
        return image.unsqueeze(0), self.targets[row]


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 1, S, S) -> float in [0, 1], the model's input contract."""
    return batch.float().div_(255.0)


def augment_batch(images: torch.Tensor, strength: float = 1.0, hflip: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random X-ray-safe augmentation of a float batch (B, 1, S, S) in [0, 1].

    At ``strength`` 1: rotation up to 10 degrees, scale 0.9-1.1, translation up to 6% of the
    side, brightness +-0.1 and contrast x0.8-1.2. No horizontal flip unless ``hflip`` (the heart
    is on the left; flipping makes anatomically impossible images). ``strength`` 0 returns the batch.
    """
    if strength <= 0:
        return images
    batch, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(batch, generator=generator).to(device) * (high - low) + low

    angle = uniform(-10, 10) * strength * math.pi / 180
    scale = 1 + uniform(-0.1, 0.1) * strength
    shift_x, shift_y = uniform(-0.12, 0.12) * strength, uniform(-0.12, 0.12) * strength
    flip = (torch.rand(batch, generator=generator).to(device) < 0.5).float() * 2 - 1 if hflip else 1.0
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift_x], 1),
                         torch.stack([sin * flip, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = (1 + uniform(-0.2, 0.2) * strength).view(-1, 1, 1, 1)
    brightness = (uniform(-0.1, 0.1) * strength).view(-1, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean + brightness).clamp_(0.0, 1.0)


def photometric_batch(images: torch.Tensor, strength: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Random changes of how an X-ray was acquired and encoded, on a float batch (B, 1, S, S) in [0, 1].

    At ``strength`` 1: a gamma curve x**g with g in exp(+-0.4) (exposure and the scanner's look-up
    table), a Gaussian blur of sigma up to 1.2 px on a random half of the batch (the detector's
    sharpness, resampling by a PACS export), and Gaussian noise of sd up to 0.03 (quantum noise,
    lossy encoding). The geometry is untouched. ``strength`` 0 returns the batch.
    """
    if strength <= 0:
        return images
    batch, device = images.shape[0], images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(batch, generator=generator) * (high - low) + low).to(device)

    gamma = torch.exp(uniform(-0.4, 0.4) * strength).view(-1, 1, 1, 1)
    out = images.clamp(min=1e-6).pow(gamma)
    sigma = uniform(0.0, 1.2 * strength) * (torch.rand(batch, generator=generator) < 0.5).float().to(device)
    radius = max(1, math.ceil(2.5 * 1.2 * strength))
    taps = torch.arange(-radius, radius + 1, device=device, dtype=out.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.clamp(min=1e-3).view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, taps): sigma 0 leaves a unit impulse
    side = out.shape[-1]
    flat = out.view(1, batch, side, side)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(batch, 1, 1, -1), groups=batch)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(batch, 1, -1, 1), groups=batch)
    noise = torch.randn(out.shape, generator=generator).to(device) * uniform(0.0, 0.03 * strength).view(-1, 1, 1, 1)
    return (flat.view_as(out) + noise).clamp_(0.0, 1.0)


def mix_batch(images: torch.Tensor, alpha: float, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup: blend each image with another of the batch, ``lam * x + (1 - lam) * x[order]``.

    ``lam`` is drawn from Beta(``alpha``, ``alpha``); returns the blended batch, ``order`` and ``lam``, so the
    loss is ``lam * loss(targets) + (1 - lam) * loss(targets[order])``. ``alpha`` 0 returns the batch unmixed.
    """
    if alpha <= 0:
        return images, torch.arange(len(images), device=images.device), 1.0
    seed = int(torch.randint(2**31, (1,), generator=generator))  # torch's RNG, so seeded runs repeat
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    order = torch.randperm(len(images), generator=generator).to(images.device)
    return lam * images + (1 - lam) * images[order], order, lam
