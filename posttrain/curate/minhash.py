"""MinHash signatures of shingle sets, their Jaccard estimate, the true Jaccard, and the LSH band size.

Hashes are blake2b, never Python's ``hash()``, which is salted per process.

Layer 6 (curate): may import posttrain.data, models, errors and io; never config.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

# Universal hashing h(x) = (a*x + b) mod P with x, a, b < 2**32 and P = 2**32 + 15, the least prime above 2**32:
# a*x + b < 2**64, so the arithmetic is exact in uint64 and numpy does all permutations of all shingles at once,
# and a*x is many times P, so the reduction mixes (with a prime near 2**64 it would hardly wrap, and h would just
# follow the order of x).
_P = np.uint64((1 << 32) + 15)


def _shingle_hash(shingle: tuple[str, ...]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(shingle).encode(), digest_size=4).digest(), "little")


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Derived from blake2b, not a RNG, so the same seed gives the same signatures on every machine and version.
    ab = [hashlib.blake2b(f"minhash:{seed}:{i}".encode(), digest_size=8).digest() for i in range(num_perm)]
    a = np.array([int.from_bytes(d[:4], "little") | 1 for d in ab], dtype=np.uint64)  # a != 0
    b = np.array([int.from_bytes(d[4:], "little") for d in ab], dtype=np.uint64)
    return a, b


def minhash(shingles: set[tuple[str, ...]], num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """(num_perm,) uint64 signature: per hash function, the least hash over the shingles (all P for an empty set).
    The share of equal entries of two signatures estimates the Jaccard similarity of the sets."""
    a, b = _permutations(num_perm, seed)
    if not shingles:
        return np.full(num_perm, _P, dtype=np.uint64)
    x = np.array(sorted(_shingle_hash(s) for s in shingles), dtype=np.uint64)
    return ((x[:, None] * a[None, :] + b[None, :]) % _P).min(axis=0)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def band_rows_for(threshold: float, num_perm: int) -> int:
    """Rows per LSH band: the most (fewest false candidates) for which a pair at the threshold still shares at
    least one of the ``num_perm / r`` bands with probability >= 0.9999, i.e. 1 - (1 - t**r)**(num_perm / r).
    128 permutations: 4 rows (32 bands) for t = 0.8, 2 rows for t = 0.5."""
    for r in (16, 8, 4, 2, 1):
        if num_perm % r == 0 and 1 - (1 - threshold ** r) ** (num_perm // r) >= 0.9999:
            return r
    return 1
