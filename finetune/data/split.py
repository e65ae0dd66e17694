"""Deterministic train/validation/test split, group-aware, with a leakage check.

Rows (or whole groups, when a group column is named) are ordered by a hash of (seed, group key), so the split
depends only on the seed and the rows themselves, not on file order or Python's hash salt. Test and validation
take groups from the front of that order until they hold their share of rows; the rest is train.

A split asked for (ratio > 0) gets at least one row even when its share rounds to 0 (a 3-row dataset), but never
the last group: training keeps at least one, and validation is served before test when groups are that few.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

from finetune.data.clean import NearIndex
from finetune.data.example import Example
from finetune.data.load import Dropped, excerpt

SPLITS = ("train", "validation", "test")


def assign_splits(groups: Sequence[str], *, validation: float, test: float, seed: int) -> list[str]:
    """The split name for each row; rows with the same group key always share a split."""
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    order = sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}\x00{g}".encode()).digest())
    n = len(groups)
    want = {"test": round(test * n), "validation": round(validation * n)}
    for split, ratio in (("test", test), ("validation", validation)):
        if ratio > 0 and want[split] == 0:
            want[split] = 1
    where: dict[str, str] = {}
    taken = {"test": 0, "validation": 0}
    i = 0
    for split in ("test", "validation"):
        # groups to leave for the splits after this one: train's, and validation's while test takes
        keep = 1 + (1 if split == "test" and want["validation"] > 0 else 0)
        while taken[split] < want[split] and len(order) - i > keep:
            where[order[i]] = split
            taken[split] += sizes[order[i]]
            i += 1
    for g in order[i:]:
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


def remove_leakage(examples: list[Example], *, near_threshold: float, dropped: list[Dropped],
                   leakage: Counter[str]) -> list[Example]:
    """Drop train rows that equal, nearly equal, or share a group with a validation/test row (each example has its
    split, key, group and MinHash signature); count them by reason in ``leakage`` and append them to ``dropped``."""
    held = [e for e in examples if e.split != "train"]
    if not held:
        return examples
    exact = {e.key: e for e in held}
    groups = {e.group: e for e in held if e.group.startswith("g:")}
    index = NearIndex(near_threshold)
    by_key = {}
    for e in held:
        index.add(e.key, e.sig)
        by_key[e.key] = e
    kept = []
    for e in examples:
        if e.split == "train":
            reason, other = None, None
            if e.key in exact:
                reason, other = "leakage_exact", exact[e.key]
            elif e.group in groups:
                reason, other = "leakage_group", groups[e.group]
            else:
                hit = index.query(e.sig)
                if hit is not None:
                    reason, other = "leakage_near", by_key[hit[0]]
            if reason:
                leakage[reason] += 1
                dropped.append(Dropped(e.origin, reason, f"duplicates {other.split} row {other.origin}",
                                       excerpt(e.example)))
                continue
        kept.append(e)
    return kept
