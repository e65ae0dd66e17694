"""Prepare's tokenized splits as arrays: every example's token ids and labels are views into the split's one Arrow
buffer, never Python lists (a Python int costs 28-36 bytes and a list slot 8 more; a token in the buffer 4 or 8).
Train and eval read the splits through here; a batch becomes int64 tensors only when it is collated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.data.render import IGNORE_INDEX


def column_arrays(ds: Any, name: str) -> list[Any]:
    """The rows of a list column of a ``datasets.Dataset`` loaded from disk, as numpy views (no copy of the
    memory-mapped data when the column is one chunk). The dataset must not carry an indices mapping
    (``select``/``filter``): select rows from the returned list instead."""
    column = ds.data.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    return [values[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]


def rows(ds: Any, prefix: str = "") -> list[tuple[Any, Any]]:
    """(input ids, labels) of every example, as views (see ``column_arrays``); ``prefix`` picks another pair of
    columns (``rejected_``: a preference pair's rejected side)."""
    return list(zip(column_arrays(ds, f"{prefix}input_ids"), column_arrays(ds, f"{prefix}labels"), strict=True))


def load(path: Path) -> Any:
    """The tokenized split at ``path`` (a ``datasets`` folder written by prepare)."""
    from datasets import load_from_disk

    return load_from_disk(str(path))


def has_target(labels: Any) -> bool:
    """Whether an example has a token that carries loss once labels are shifted (its first label never does)."""
    import numpy as np

    return bool((np.asarray(labels[1:]) != IGNORE_INDEX).any())


def count_targets(labels: Any) -> int:
    import numpy as np

    return int((np.asarray(labels[1:]) != IGNORE_INDEX).sum())
