"""The indexed near-duplicate search finds exactly the pairs that comparing every pair finds."""

from __future__ import annotations

import numpy as np
import pytest

from chestxray.data.hamming import _deal, _indexed, _plan, _sorted, close_pairs


def hashes_with_planted_pairs(rng: np.random.Generator, n: int, words: int, max_flips: int,
                              bias: float = 0.5) -> np.ndarray:
    """``n`` random bit strings (each bit set with chance ``bias``); a tenth of them are copies of
    another one with 0 to ``max_flips`` bits flipped, some copied twice (chains of near pairs)."""
    bits = (rng.random((n, 64 * words)) < bias).astype(np.uint8)
    for target in rng.choice(n, n // 10, replace=False):
        source = int(rng.integers(0, n))
        bits[target] = bits[source]
        flips = rng.choice(64 * words, int(rng.integers(0, max_flips + 1)), replace=False)
        bits[target, flips] ^= 1
    return np.packbits(bits, axis=1, bitorder="little").view(np.uint64)


def same(found, expected) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(found, expected))


@pytest.mark.parametrize("max_distance", [0, 3, 8, 16, 32, 45])
def test_indexed_search_finds_every_pair_brute_force_finds(max_distance):
    rng = np.random.default_rng(max_distance)
    hashes = hashes_with_planted_pairs(rng, 1500, 4, max_distance + 8)
    expected = close_pairs(hashes, None, max_distance, method="brute")
    found = close_pairs(hashes, None, max_distance, method="index")
    assert len(expected[0]) > 20  # planted pairs exist on both sides of the threshold
    assert same(found, expected)
    assert (expected[0] < expected[1]).all() and (expected[2] <= max_distance).all()


@pytest.mark.parametrize("max_distance", [0, 12, 32])
def test_indexed_search_between_two_sets(max_distance):
    rng = np.random.default_rng(7)
    both = hashes_with_planted_pairs(rng, 1600, 4, max_distance + 6)
    a, b = both[:700], both[700:]
    expected = close_pairs(a, b, max_distance, method="brute")
    assert len(expected[0]) > 5
    assert same(close_pairs(a, b, max_distance, method="index"), expected)
    assert same(close_pairs(a, b, max_distance), expected)


def test_biased_bits_and_exact_copies_change_nothing():
    """Bits set in nearly every string and many identical strings (large buckets) are still exact."""
    rng = np.random.default_rng(3)
    hashes = hashes_with_planted_pairs(rng, 1200, 4, 40, bias=0.9)
    hashes[100:160] = hashes[99]  # 61 identical strings: 1830 pairs at distance 0
    expected = close_pairs(hashes, None, 32, method="brute")
    assert (expected[2] == 0).sum() >= 1830
    assert same(close_pairs(hashes, None, 32, method="index"), expected)


def test_one_word_strings_and_edge_cases():
    rng = np.random.default_rng(5)
    hashes = hashes_with_planted_pairs(rng, 800, 1, 10)
    assert same(close_pairs(hashes, None, 6, method="index"), close_pairs(hashes, None, 6, method="brute"))
    assert len(close_pairs(hashes[:1], None, 64)[0]) == 0
    far = hashes_with_planted_pairs(rng, 300, 4, 0)[:20]  # the first rows: unrelated random strings
    for method in ("index", "brute", "auto"):
        assert all(len(x) == 0 and x.dtype == np.int64 for x in close_pairs(far, None, 3, method=method))
    assert len(close_pairs(hashes, None, -1)[0]) == 0
    assert len(close_pairs(hashes[:5], None, 64)[0]) == 10  # every pair is within 64 of 64 bits
    with pytest.raises(ValueError, match="equal width"):
        close_pairs(hashes, np.zeros((3, 2), np.uint64), 4)


def test_chunks_mix_informative_bits_and_satisfy_the_pigeonhole_bound():
    spread = np.r_[np.zeros(128), np.full(128, 0.25)]  # half the bits are the same in every string
    chunks = _deal(spread, 8, 16)
    assert all(len(c) == 16 and (spread[c] > 0).sum() == 16 for c in chunks)
    assert len(np.unique(np.concatenate(chunks))) == 128
    rng = np.random.default_rng(0)
    plan = _plan(hashes_with_planted_pairs(rng, 5000, 4, 40), None, 32, 0)
    assert len(plan.chunks) * (plan.radius + 1) > 32
    assert len(np.unique(np.concatenate(plan.chunks))) == sum(len(c) for c in plan.chunks)


@pytest.mark.parametrize("max_distance", [5, 16, 32])
def test_pairs_built_to_dodge_the_index_are_still_found(max_distance):
    """The worst case of the pigeonhole bound: a pair exactly ``max_distance`` apart whose differing
    bits fill as many chunks of the plan as possible with ``radius + 1`` flips each (one flip short
    of a chunk that would still match is the least the bound leaves)."""
    rng = np.random.default_rng(11)
    hashes = hashes_with_planted_pairs(rng, 2000, 4, 0)
    plan = _plan(hashes, None, max_distance, 0)
    bits = np.unpackbits(hashes.view(np.uint8), axis=1, bitorder="little")
    indexed = np.concatenate(plan.chunks)
    outside = np.setdiff1d(np.arange(bits.shape[1]), indexed)
    for target in range(0, 200, 2):
        flips, left = [], max_distance
        for chunk in plan.chunks:
            take = min(plan.radius + 1, left, len(chunk))
            flips += list(rng.choice(chunk, take, replace=False))
            left -= take
        flips += list(outside[:left])  # bits no chunk indexes, where there are any
        bits[target + 1] = bits[target]
        bits[target + 1, flips] ^= 1
    hashes = np.packbits(bits, axis=1, bitorder="little").view(np.uint64)
    expected = close_pairs(hashes, None, max_distance, method="brute")
    assert sum(d == max_distance for d in expected[2]) >= 50
    assert same(_sorted(_indexed(hashes, None, max_distance, plan)), expected)
