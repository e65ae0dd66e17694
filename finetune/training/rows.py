"""The rows training reads: prepare's tokenized splits as (input ids, labels) views for SFT, or preference rows
for the other objectives (``preference.load_rows``), checked so that a broken or empty split is a clear error."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from finetune.data import tokenized
from finetune.errors import UserError
from finetune.training import preference


def load_sft_rows(path: Path, split: str) -> list[tuple[Any, Any]]:
    """(input ids, labels) of each example: numpy views into the split's buffers (finetune.data.tokenized)."""
    ds = tokenized.load(path)
    missing = {"input_ids", "labels"} - set(ds.column_names)
    if missing:
        raise UserError(f"{path}: the tokenized {split} split lacks columns {sorted(missing)} "
                        f"(has {ds.column_names}); rerun `finetune prepare RECIPE`.")
    rows = tokenized.rows(ds)
    bad = next((n for n, (i, lab) in enumerate(rows) if len(i) != len(lab)), None)
    if bad is not None:
        raise UserError(f"{path}: row {bad} has {len(rows[bad][0])} input_ids but {len(rows[bad][1])} labels; "
                        "rerun `finetune prepare RECIPE`.")
    if preference.LABEL_COLUMN in ds.column_names:
        # rated rows (KTO's shape) under SFT: an undesirable reply must never be a target
        rows = [r for r, good in zip(rows, ds[preference.LABEL_COLUMN], strict=True) if good]
        if split == "train":
            print(f"train: objective sft on rated rows: training on the {len(rows)} desirable of {len(ds)} rows "
                  "(train.objective=kto uses both)", file=sys.stderr)
    rows = [r for r in rows if len(r[0]) > 1]  # a single token predicts nothing
    if split == "train" and not rows:
        raise UserError(f"{path}: the training split is empty; check data.sources and data.clean, rerun prepare.")
    return rows


def load_splits(paths: dict[str, Path], objective: str) -> tuple[list, list, list[int]]:
    """(training rows, validation rows, the training rows' lengths) of the tokenized splits, for the objective."""
    if objective == "grpo":  # prompts (+ references) of the same rows (training/rollout.py)
        from finetune.training import rollout

        train_rows = rollout.load_rows(paths["train"], "train")
        val_rows = rollout.load_rows(paths["validation"], "validation") if paths.get("validation") else []
        return train_rows, val_rows, [r.length for r in train_rows]
    if objective != "sft":
        train_rows = preference.load_rows(paths["train"], "train", objective)
        val_rows = (preference.load_rows(paths["validation"], "validation", objective)
                    if paths.get("validation") else [])
        return train_rows, val_rows, [r.length for r in train_rows]
    train_rows = load_sft_rows(paths["train"], "train")
    val_rows = load_sft_rows(paths["validation"], "validation") if paths.get("validation") else []
    if not any(tokenized.has_target(labels) for _, labels in train_rows):
        raise UserError(f"{paths['train']}: no example has a trained token (every label is -100). "
                        "Check data.train_on and that conversations end with an assistant turn, then rerun "
                        "prepare.")
    return train_rows, val_rows, [len(ids) for ids, _ in train_rows]
