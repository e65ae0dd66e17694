"""Prepare's tokenized splits as arrays: every example's token ids and labels are views into the split's one Arrow
buffer, never Python lists (a Python int costs 28-36 bytes and a list slot 8 more; a token in the buffer 4 or 8).
Prepare writes them here (``write``), train and eval read them through here; a batch becomes int64 tensors only when
it is collated."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from finetune.data.example import Example, row_kind
from finetune.data.render import IGNORE_INDEX
from finetune.run import runs

# Reward-driven training: each row's columns that its format does not read (a JSON object per row), which the reward
# functions receive as keyword arguments (TRL's convention for a dataset's other columns).
EXTRA_COLUMNS = "extra_columns"


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


def extra_columns(ds: Any) -> list[dict[str, Any]]:
    """Each row's columns for the reward functions ({} for every row of a split prepared without them)."""
    if EXTRA_COLUMNS not in ds.column_names:
        return [{} for _ in range(len(ds))]
    return [json.loads(v) for v in ds[EXTRA_COLUMNS]]


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


# ------------------------------------------------------------------------------------------------ writing
def write(out: Path, final: dict[str, list[Example]], report: dict[str, Any], *, max_tokens: int) -> None:
    """prepare's outputs in ``out``: each split's rows as JSON lines (splits/) and as token arrays (tokenized/, the
    columns its row kind needs: preference pairs, rated rows), their length statistics in ``report`` and
    lengths.png."""
    import datasets

    from finetune.data.report import plot_lengths

    out.mkdir(parents=True, exist_ok=True)
    columns = {
        "input_ids": datasets.Sequence(datasets.Value("int64")),
        "labels": datasets.Sequence(datasets.Value("int64")),
        "length": datasets.Value("int64"),
    }
    kind = next((row_kind(e.example) for rows in final.values() for e in rows), "sft")
    if kind != "sft":  # finetune/training/preference.py reads these
        columns["prompt_length"] = datasets.Value("int64")
    if kind == "pairs":
        columns["rejected_input_ids"] = datasets.Sequence(datasets.Value("int64"))
        columns["rejected_labels"] = datasets.Sequence(datasets.Value("int64"))
    if kind == "rated":
        columns["desirable"] = datasets.Value("int64")
    if any(e.example.get("extra_columns") for rows in final.values() for e in rows):
        columns[EXTRA_COLUMNS] = datasets.Value("string")  # training/rollout.py passes them to the rewards
    report["row_kind"] = kind
    features = datasets.Features(columns)
    lengths = {}
    # save_to_disk draws a progress bar per split: noise in our own summary. Restore the user's setting after.
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        _write_splits(out, final, report, features, lengths)
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    plot_lengths(lengths, out / "lengths.png", max_tokens=max_tokens)


def _write_splits(out: Path, final: dict[str, list[Example]], report: dict[str, Any], features, lengths) -> None:
    import datasets

    from finetune.data.report import length_stats

    used: Counter[str] = Counter()  # ids repeat only for kept duplicates (dedupe off, or weight > 1)
    with runs.atomic_dir(out / "splits") as splits_dir, runs.atomic_dir(out / "tokenized") as tok_dir:
        for split, rows in final.items():
            lines = []
            for e in rows:
                row_id = e.key[:16]
                used[row_id] += 1
                row = {"id": row_id if used[row_id] == 1 else f"{row_id}-{used[row_id]}", **e.example,
                       "origin": e.origin}
                lines.append(json.dumps(row, ensure_ascii=False))
            (splits_dir / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            lengths[split] = [len(e.ids) for e in rows]
            # Arrow list arrays from one flat buffer: ~6x less CPU than converting row by row.
            table = {"input_ids": _list_array([e.ids for e in rows]), "labels": _list_array([e.labels for e in rows]),
                     "length": lengths[split]}
            if "prompt_length" in features:
                table["prompt_length"] = [e.prompt_length for e in rows]
            if "rejected_input_ids" in features:
                table["rejected_input_ids"] = _list_array([e.rejected_ids for e in rows])
                table["rejected_labels"] = _list_array([e.rejected_labels for e in rows])
            if "desirable" in features:
                table["desirable"] = [int(e.example["desirable"]) for e in rows]
            if EXTRA_COLUMNS in features:
                table[EXTRA_COLUMNS] = [json.dumps(e.example.get("extra_columns") or {}, ensure_ascii=False)
                                        for e in rows]
            ds = datasets.Dataset.from_dict(table, features=features)
            # an empty split still gets its one (empty) shard: without one, load_from_disk fails with an IndexError
            ds.save_to_disk(str(tok_dir / split), **({"num_shards": 1} if not rows else {}))
            report["tokens"][split] = length_stats(
                lengths[split], [int((e.labels != IGNORE_INDEX).sum()) for e in rows])


def _list_array(arrays: list[Any]):
    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
