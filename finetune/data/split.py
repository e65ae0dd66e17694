"""Deterministic train/validation/test split, group-aware, with a leakage check.

Rows (or whole groups, when a group column is named) are ordered by a hash of (seed, group key), so the split
depends only on the seed and the rows themselves, not on file order or Python's hash salt. Test and validation
take groups from the front of that order until they hold their share of rows; the rest is train.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

SPLITS = ("train", "validation", "test")


def assign_splits(groups: Sequence[str], *, validation: float, test: float, seed: int) -> list[str]:
    """The split name for each row; rows with the same group key always share a split."""
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    order = sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}\x00{g}".encode()).digest())
    n = len(groups)
    want = {"test": round(test * n), "validation": round(validation * n)}
    where: dict[str, str] = {}
    taken = {"test": 0, "validation": 0}
    it = iter(order)
    for split in ("test", "validation"):
        while taken[split] < want[split]:
            g = next(it, None)
            if g is None:
                break
            where[g] = split
            taken[split] += sizes[g]
    for g in it:
        where[g] = "train"
    return [where[g] for g in groups]


def resample_by_weight(keys: Sequence[str], weight: float, *, seed: int) -> list[int]:
    """How many copies of each row to keep for a source weight: 0.5 keeps about half, 2.0 doubles, 1.5 ..."""
    whole, frac = int(weight), weight - int(weight)
    out = []
    for k in keys:
        u = int.from_bytes(hashlib.sha256(f"{seed}\x01{k}".encode()).digest()[:8], "big") / 2**64
        out.append(whole + (1 if u < frac else 0))
    return out
