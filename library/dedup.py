"""Duplicate detection: exact (same bytes) and near (perceptual hashes within a Hamming distance).

The perceptual hash is the classic 64-bit DCT hash: grey, 32x32, 2-D DCT, the 8x8 lowest
frequencies, each bit = coefficient above their median. Re-encoding, resizing and small colour
changes move it by a few bits; different pictures differ in ~32.

Near pairs are found without comparing every pair: split the 64 bits into ``distance + 1`` chunks;
two hashes within ``distance`` bits agree exactly on at least one chunk (pigeonhole), so only hashes
sharing a chunk value are compared (with numpy, in blocks).

:func:`find_duplicates` then walks the images best first; each image not yet claimed is kept and
claims the images that duplicate it. ``duplicate_of`` therefore always names a kept image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

HASH_BITS = 64
_BLOCK = 2048


def _dct_matrix(size: int) -> np.ndarray:
    k = np.arange(size)[:, None]
    n = np.arange(size)[None, :]
    return np.cos(np.pi * (2 * n + 1) * k / (2 * size))


def perceptual_hash(image) -> int:
    """64-bit DCT hash of a PIL image."""
    from PIL import Image

    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    dct = _dct_matrix(32)
    low = (dct @ grey @ dct.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _close_pairs(members: np.ndarray, hashes: np.ndarray, distance: int) -> list[tuple[int, int]]:
    """(i, j) with i < j among ``members`` whose hashes are within ``distance`` bits."""
    pairs = []
    for start in range(0, len(members), _BLOCK):
        rows = members[start : start + _BLOCK]
        bits = np.bitwise_count(hashes[rows][:, None] ^ hashes[members][None, :])
        for r, c in zip(*np.nonzero(bits <= distance)):
            i, j = int(rows[r]), int(members[c])
            if i < j:
                pairs.append((i, j))
    return pairs


def near_pairs(hashes: Sequence[int], distance: int) -> set[tuple[int, int]]:
    """Index pairs (i < j) whose hashes differ in at most ``distance`` bits."""
    values = np.array(hashes, dtype=np.uint64)
    if len(values) < 2 or distance < 0:
        return set()
    chunks = min(distance + 1, 16)  # beyond 16 chunks the buckets are no smaller than brute force
    bounds = np.linspace(0, HASH_BITS, chunks + 1).astype(int)
    pairs: set[tuple[int, int]] = set()
    for low, high in zip(bounds[:-1], bounds[1:]):
        keys = (values >> np.uint64(low)) & np.uint64((1 << int(high - low)) - 1)
        order = np.argsort(keys, kind="stable")
        starts = np.flatnonzero(np.r_[True, keys[order][1:] != keys[order][:-1]])
        for group in np.split(order, starts[1:]):
            if len(group) > 1:
                pairs.update(_close_pairs(group, values, distance))
    return pairs


@dataclass(frozen=True)
class DedupItem:
    content_hash: str
    phash: int
    rank: tuple  # smaller is better: e.g. (-pixels, -bytes, path)


def find_duplicates(items: Sequence[DedupItem], distance: int) -> dict[int, tuple[int, str]]:
    """``{index: (kept_index, "duplicate" | "near-duplicate")}`` for every image that should go.

    Exact copies (same content hash) always go; near copies when ``distance >= 0``.
    """
    order = sorted(range(len(items)), key=lambda i: items[i].rank)
    dropped: dict[int, tuple[int, str]] = {}
    first_with_hash: dict[str, int] = {}
    for i in order:
        kept = first_with_hash.setdefault(items[i].content_hash, i)
        if kept != i:
            dropped[i] = (kept, "duplicate")
    survivors = [i for i in order if i not in dropped]
    neighbours: dict[int, list[int]] = {}
    for a, b in near_pairs([items[i].phash for i in survivors], distance):
        neighbours.setdefault(survivors[a], []).append(survivors[b])
        neighbours.setdefault(survivors[b], []).append(survivors[a])
    for i in survivors:  # best first: a kept image claims its unclaimed neighbours
        if i in dropped:
            continue
        for j in neighbours.get(i, ()):
            if j not in dropped and items[j].rank > items[i].rank:
                dropped[j] = (i, "near-duplicate")
    for i, (kept, why) in list(dropped.items()):  # copies of an image that went go with it
        if why == "duplicate" and kept in dropped:
            dropped[i] = (dropped[kept][0], "near-duplicate")
    return dropped
