"""Pairs of bit strings within a Hamming distance, found exactly in about linear time.

The audit's near-duplicate search: every pair of perceptual hashes at most ``max_distance`` bits
apart, without comparing every pair. It uses multi-index hashing (Norouzi, Punjani and Fleet,
2012): the bits are dealt into ``m`` disjoint chunks with ``m * (r + 1) > max_distance``; two strings
that differ in at most ``max_distance`` bits then differ in at most ``r`` bits of at least one chunk
(pigeonhole). Each chunk is a key into a table of buckets; a string is looked up under every key
within ``r`` flips of its own, and each candidate so found is checked on the full string. The
result is the same set of pairs as comparing every pair: no pair within the distance is missed.

Which ``(m, r)`` to use is chosen from the data: the bits are dealt so that each chunk holds a share
of the informative ones (a bit set in nearly every hash separates nothing), and the cost of each
plan is estimated from a sample of pairs. Small inputs, and inputs where no plan beats it (hashes
that nearly all agree), are compared pair by pair.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

import numpy as np

__all__ = ["Method", "close_pairs"]

Method = Literal["auto", "index", "brute"]

_MAX_KEY_BITS = 24  # widest chunk: its bucket table has 2**24 entries (128 MiB of int64 starts)
_MAX_RADIUS = 2  # flips tried per chunk: C(24, 2) = 276 keys per chunk at most
_SAMPLE_PAIRS = 20_000  # random pairs that estimate how often a chunk matches by chance
_BLOCK_ELEMENTS = 1 << 23  # hash pairs compared (brute force) or candidates checked per block
# Seconds per unit of work, measured on one core (bench/bench_audit_scale.py): a brute-force
# comparison of two 256-bit hashes, one bucket of a table, one key looked up, one candidate checked.
_COST_PAIR, _COST_TABLE, _COST_PROBE, _COST_CANDIDATE = 1.3e-8, 3e-9, 1.4e-8, 1.2e-7


@dataclass(frozen=True)
class _Plan:
    chunks: list[np.ndarray]  # bit positions of each chunk
    radius: int
    seconds: float  # estimated


def close_pairs(a: np.ndarray, b: np.ndarray | None = None, max_distance: int = 32, *,
                method: Method = "auto", seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows of ``a`` and ``b`` (2-D ``uint64`` arrays, one bit string a row) whose
    Hamming distance is at most ``max_distance``, as arrays ``(i, j, distance)`` sorted by ``(i, j)``.

    With ``b`` None, the pairs ``i < j`` of ``a`` itself. ``method`` ``"index"`` forces the
    multi-index search, ``"brute"`` the comparison of every pair; ``"auto"`` takes the one estimated
    faster. Both give the same pairs; ``seed`` only fixes the sample the estimate is drawn from.
    """
    a = np.ascontiguousarray(a, dtype=np.uint64)
    other = a if b is None else np.ascontiguousarray(b, dtype=np.uint64)
    if a.ndim != 2 or other.ndim != 2 or a.shape[1] != other.shape[1]:
        raise ValueError(f"bit strings must be 2-D uint64 arrays of equal width, not {a.shape} and {other.shape}")
    if max_distance < 0 or not len(a) or not len(other) or (b is None and len(a) < 2):
        return _empty()
    plan = None
    if method != "brute":
        plan = _plan(a, None if b is None else other, max_distance, seed)
        n_pairs = len(a) * (len(a) - 1) // 2 if b is None else len(a) * len(other)
        if method == "auto" and (plan is None or plan.seconds >= n_pairs * _COST_PAIR):
            plan = None
    parts = _brute(a, b, max_distance) if plan is None else _indexed(a, b, max_distance, plan)
    return _sorted(parts)


def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)


def _sorted(parts: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    found = list(parts)
    if not found:
        return _empty()
    i, j, d = (np.concatenate(column).astype(np.int64) for column in zip(*found))
    if not len(i):
        return _empty()
    _, first = np.unique(i * (int(j.max()) + 1) + j, return_index=True)  # unique also sorts by (i, j)
    return i[first], j[first], d[first]


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances of the rows of ``a`` and ``b`` (same shape), row by row."""
    distance = np.zeros(len(a), dtype=np.int64)
    for word in range(a.shape[1]):
        distance += np.bitwise_count(a[:, word] ^ b[:, word])
    return distance


# ---------------------------------------------------------------------------------- brute force


def _brute(a: np.ndarray, b: np.ndarray | None, max_distance: int):
    """Compare every pair, block by block (bounded memory)."""
    targets = a if b is None else b
    block_rows = max(1, _BLOCK_ELEMENTS // max(1, len(targets)))
    for start in range(0, len(a), block_rows):
        block = a[start:start + block_rows]
        first = start if b is None else 0  # within one set, compare only with later rows
        candidates = targets[first:]
        distance = np.zeros((len(block), len(candidates)), dtype=np.uint16)
        for word in range(a.shape[1]):
            distance += np.bitwise_count(block[:, None, word] ^ candidates[None, :, word])
        close = distance <= max_distance
        if b is None:
            close &= np.arange(len(candidates))[None, :] > np.arange(len(block))[:, None]
        i, j = np.nonzero(close)
        yield start + i, first + j, distance[i, j]


# -------------------------------------------------------------------------------------- planning


def _bits(strings: np.ndarray) -> np.ndarray:
    """(N, 64 * words) 0/1 uint8: bit k of word w at column 64 w + k (any fixed order works)."""
    return np.unpackbits(strings.view(np.uint8), axis=1, bitorder="little")


def _deal(spread: np.ndarray, m: int, width: int) -> list[np.ndarray]:
    """Deal the ``m * width`` most informative bit positions into ``m`` chunks, in turn and in a snake
    order, so that no chunk is made of bits that nearly every string shares (a chunk keeps its bits
    most informative first; bits left over are not indexed, which the pigeonhole argument allows)."""
    order = np.argsort(-spread, kind="stable")[:m * width]
    chunks: list[list[int]] = [[] for _ in range(m)]
    for rank, bit in enumerate(order):
        lap, place = divmod(rank, m)
        chunks[place if lap % 2 == 0 else m - 1 - place].append(int(bit))
    return [np.array(chunk, dtype=np.int64) for chunk in chunks]


def _plan(a: np.ndarray, b: np.ndarray | None, max_distance: int, seed: int) -> _Plan | None:
    """The cheapest multi-index plan by estimated seconds, or None when no plan is possible.

    For each radius ``r`` the fewest chunks ``m = max_distance // (r + 1) + 1``; for each key width
    (up to :data:`_MAX_KEY_BITS`) the cost of building the tables, looking keys up and checking
    the candidates, whose number comes from how often sampled pairs match within ``r`` on a chunk
    (at least as often as for random bits).
    """
    n_bits = 64 * a.shape[1]
    rng = np.random.default_rng(seed)
    other = a if b is None else b
    sample_a = _bits(a[rng.integers(0, len(a), _SAMPLE_PAIRS)])
    sample_b = _bits(other[rng.integers(0, len(other), _SAMPLE_PAIRS)])
    pooled = np.concatenate([sample_a, sample_b]).mean(axis=0)
    differ = sample_a != sample_b
    n_pairs = len(a) * (len(a) - 1) / 2 if b is None else len(a) * len(other)
    best = None
    for radius in range(_MAX_RADIUS + 1):
        m = max_distance // (radius + 1) + 1
        widest = min(_MAX_KEY_BITS, n_bits // m)
        if widest < 1:
            continue
        chunks = _deal(pooled * (1 - pooled), m, widest)
        hit = np.zeros(widest)  # summed over chunks: chance that a sampled pair matches within radius
        for chunk in chunks:
            hit += (differ[:, chunk].cumsum(axis=1) <= radius).mean(axis=0)
        for width in range(1, widest + 1):
            flips = _n_flips(width, radius)
            chance = max(float(hit[width - 1]), m * flips / 2.0 ** width)
            seconds = (m * (2 ** width * _COST_TABLE + len(a) * flips * _COST_PROBE)
                       + n_pairs * chance * _COST_CANDIDATE)
            if best is None or seconds < best.seconds:
                best = _Plan([chunk[:width] for chunk in chunks], radius, seconds)
    return best


def _n_flips(width: int, radius: int) -> int:
    return sum(math.comb(width, k) for k in range(radius + 1))


def _flip_masks(width: int, radius: int) -> np.ndarray:
    """Every key offset of at most ``radius`` set bits among ``width`` (0 first)."""
    masks = [0]
    for k in range(1, radius + 1):
        masks += [sum(1 << bit for bit in bits) for bits in combinations(range(width), k)]
    return np.array(masks, dtype=np.int32)


# -------------------------------------------------------------------------------- indexed search


def _keys(bits: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """The chunk's bits of each row as an integer key (int32: a key has at most 24 bits)."""
    return (bits[:, chunk].astype(np.int32) @ (np.int32(1) << np.arange(len(chunk), dtype=np.int32))).astype(np.int32)


def _indexed(a: np.ndarray, b: np.ndarray | None, max_distance: int, plan: _Plan):
    """Look every row of ``a`` up in one bucket table per chunk; check each candidate in full."""
    bits_a = _bits(a)
    bits_b = bits_a if b is None else _bits(b)
    targets = a if b is None else b
    for chunk in plan.chunks:
        keys_a, keys_b = _keys(bits_a, chunk), _keys(bits_b, chunk)
        counts = np.bincount(keys_b, minlength=1 << len(chunk))
        starts = np.cumsum(counts) - counts
        occupied = counts > 0  # a byte a bucket: the lookups stay in cache longer than in counts
        members = np.argsort(keys_b, kind="stable")  # rows of b grouped by key, in bucket order
        masks = _flip_masks(len(chunk), plan.radius)
        per_block = max(1, _BLOCK_ELEMENTS // 4 // len(keys_a))
        for first in range(0, len(masks), per_block):
            probe = (keys_a[None, :] ^ masks[first:first + per_block, None]).ravel()
            hit = np.flatnonzero(occupied[probe])
            if len(hit):
                keys = probe[hit]
                yield from _checked(a, targets, b is None, hit % len(keys_a), starts[keys], counts[keys], members,
                                    max_distance)


def _checked(a: np.ndarray, targets: np.ndarray, within: bool, rows: np.ndarray, starts: np.ndarray,
             sizes: np.ndarray, members: np.ndarray, max_distance: int):
    """The candidates (each of ``rows`` against its bucket of ``sizes`` members from ``starts``)
    within ``max_distance``, checked in blocks of bounded size: first on two words, then in full."""
    ends = np.cumsum(sizes)
    begin = 0
    while begin < len(rows):
        stop = max(begin + 1, int(np.searchsorted(ends, ends[begin] - sizes[begin] + _BLOCK_ELEMENTS, side="right")))
        block_sizes = sizes[begin:stop]
        if (block_sizes == 1).all():  # the usual case in a wide table: one string a bucket
            i, j = rows[begin:stop], members[starts[begin:stop]]
        else:
            i = np.repeat(rows[begin:stop], block_sizes)
            before = np.cumsum(block_sizes) - block_sizes
            j = members[np.repeat(starts[begin:stop] - before, block_sizes) + np.arange(len(i))]
        if within:
            keep = i < j
            i, j = i[keep], j[keep]
        distance = np.zeros(len(i), dtype=np.int64)
        for word in range(a.shape[1]):
            distance += np.bitwise_count(a[i, word] ^ targets[j, word])
            if word == 1 < a.shape[1] - 1:  # two words already rule out most unrelated candidates
                close = distance <= max_distance
                i, j, distance = i[close], j[close], distance[close]
        close = distance <= max_distance
        yield i[close], j[close], distance[close]
        begin = stop
