"""Tests for chestxray.data: the batched X-ray augmentation and mixup."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chestxray.data.dataset import augment_batch, mix_batch, photometric_batch


def left_heavy_batch(n: int = 8, side: int = 32) -> torch.Tensor:
    """Gray squares bright on their left third (like a heart on one side)."""
    images = torch.full((n, 1, side, side), 0.3)
    images[..., : side // 3] = 0.9
    return images


def test_strength_zero_returns_the_batch_and_a_seed_repeats_it():
    images = left_heavy_batch()
    assert augment_batch(images, 0.0) is images
    first = augment_batch(images, 1.0, generator=torch.Generator().manual_seed(1))
    again = augment_batch(images, 1.0, generator=torch.Generator().manual_seed(1))
    other = augment_batch(images, 1.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other) and not torch.allclose(first, images)
    assert first.shape == images.shape and 0 <= first.min() and first.max() <= 1


@pytest.mark.parametrize(("hflip", "left_always_brighter"), [(False, True), (True, False)])
def test_no_horizontal_flip_unless_asked(hflip, left_always_brighter):
    images = left_heavy_batch(64)
    out = augment_batch(images, 1.0, hflip, generator=torch.Generator().manual_seed(0))
    left, right = out[..., :10].mean(dim=(1, 2, 3)), out[..., -10:].mean(dim=(1, 2, 3))
    assert bool((left > right).all()) is left_always_brighter


def test_mixup_blends_pairs_and_zero_alpha_is_identity():
    images = torch.rand(6, 1, 8, 8)
    unmixed, order, lam = mix_batch(images, 0.0)
    assert unmixed is images and lam == 1.0 and order.tolist() == list(range(6))
    mixed, order, lam = mix_batch(images, 0.4, torch.Generator().manual_seed(3))
    assert 0 < lam < 1 and sorted(order.tolist()) == list(range(6))
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images[order])
    again, order_again, lam_again = mix_batch(images, 0.4, torch.Generator().manual_seed(3))
    assert lam_again == lam and torch.equal(order_again, order)
    lams = [mix_batch(images, 0.4, torch.Generator().manual_seed(s))[2] for s in range(200)]
    assert abs(np.mean(lams) - 0.5) < 0.06 and np.mean(np.minimum(lams, 1 - np.array(lams)) < 0.1) > 0.3  # Beta(.4,.4): U-shaped


def test_photometric_changes_the_look_not_the_geometry():
    """Gamma, blur and noise: off at strength 0, repeated by a seed, values kept in [0, 1], and the anatomy
    stays where it was (a bright left half stays brighter than the right in every image)."""
    images = torch.zeros(16, 1, 32, 32)
    images[..., :16] = 0.8
    assert photometric_batch(images, 0.0) is images
    first = photometric_batch(images, 1.0, torch.Generator().manual_seed(4))
    again = photometric_batch(images, 1.0, torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, photometric_batch(images, 1.0, torch.Generator().manual_seed(5)))
    assert first.min() >= 0 and first.max() <= 1 and first.shape == images.shape
    assert (first[..., :12].mean(dim=(1, 2, 3)) > first[..., 20:].mean(dim=(1, 2, 3)) + 0.3).all()
    edge = (first[..., 15] - first[..., 16]).mean(dim=(1, 2))  # blurred images soften the edge, sharp ones keep it
    assert edge.min() < edge.max() - 0.05
