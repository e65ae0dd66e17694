"""``finetune feedback export|stats RECIPE|DIR|MODEL.gguf``: feedback from serve and chat as training data.

``finetune feedback export RECIPE|DIR -o out.jsonl`` writes the approved replies (thumbs up) and the corrected
ones (the suggested better answer replaces the model's) as ``{"messages": [...]}`` rows, the format ``prepare``
reads: add the file as a data source and train again. The latest feedback on a reply wins; what is left out, and
why, is decided in finetune/data/feedback.py and printed.

``--as preferences`` writes preference data instead: DPO/ORPO pairs ``{"prompt", "chosen", "rejected"}`` from
corrections to the output file, and KTO rows ``{"prompt", "completion", "label"}`` to ``<out>.kto.jsonl``.
The store itself is finetune/feedback_store.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.data.feedback import left_out_text, preference_rows, training_rows
from finetune.errors import UserError
from finetune.feedback_store import STORE_FILE, FeedbackStore, open_store, store_dir_for

TRAIN_ON_CHOICES = ("assistant", "all", "last_assistant", "completion")  # prepare's data.train_on


def kto_path(out: Path) -> Path:
    """Where --as preferences writes the KTO rows beside the pairs file: <out stem>.kto.jsonl."""
    return out.with_name(out.stem + ".kto.jsonl")


def export_preferences(store_folder: Path, out: Path) -> dict[str, Any]:
    from finetune.run.runs import atomic_write_text

    store = open_store(store_folder)
    try:
        pairs, rated, stats = preference_rows(store.feedback())
    finally:
        store.close()
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs))
    atomic_write_text(kto_path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rated))
    return {"out": str(out), "kto_out": str(kto_path(out)), **stats}


def export(store_folder: Path, out: Path, *, train_on: str = "assistant") -> dict[str, Any]:
    from finetune.run.runs import atomic_write_text

    store = open_store(store_folder)
    try:
        rows, stats = training_rows(store.feedback(), train_on=train_on)
    finally:
        store.close()
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"rows": len(rows), "out": str(out), **stats}


def store_folder(target: str, overrides: Sequence[str] = ()) -> tuple[Path, str | None]:
    """The feedback store of ``target`` (a recipe: its runs/<name>/serve/; a .gguf file or a folder) and, for a
    recipe, its data.train_on."""
    if Path(target).suffix in (".yaml", ".yml"):
        from finetune import recipe as recipe_mod

        recipe = recipe_mod.load(Path(target), list(overrides))
        return recipe.run_dir("serve"), recipe.data.train_on
    return store_dir_for(target, list(overrides)), None


def report_stats(target: str, overrides: Sequence[str] = ()) -> int:
    """Print how many exchanges, ratings and corrections the store of ``target`` holds."""
    folder, _ = store_folder(target, overrides)
    if not (folder / STORE_FILE).exists():
        raise UserError(f"no feedback store at {folder / STORE_FILE}")
    store = FeedbackStore(folder)
    counts = store.counts()
    store.close()
    print(f"{folder / STORE_FILE}: {counts['exchanges']} exchanges, {counts['up']} thumbs up, "
          f"{counts['down']} thumbs down, {counts['corrections']} better answers")
    return 0


def export_file(target: str, overrides: Sequence[str], out: str | Path, *, train_on: str | None = None,
                kind: str = "sft") -> int:
    """Write the store of ``target`` to ``out`` as training data (``kind`` sft: {messages} rows for ``train_on``,
    by default the recipe's data.train_on; preferences: pairs, and KTO rows beside them) and say what was left out."""
    folder, recipe_train_on = store_folder(target, overrides)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"-o {out}: is a folder; give a file name, e.g. -o {out / 'feedback.jsonl'}")
    if out.suffix != ".jsonl":
        raise UserError(f"-o {out}: the export writes JSON Lines; name the file *.jsonl (e.g. -o {out.with_suffix('.jsonl')})"
                        " so that prepare reads it as such")
    if kind == "preferences":
        if train_on:
            raise UserError("--train-on applies to --as sft; preference rows always train the final reply only")
        res = export_preferences(folder, out)
        left = sum(res["left_out"].values())
        print(f"wrote {res['pairs']} pairs (corrections) to {res['out']} and {res['desirable'] + res['undesirable']} "
              f"rated rows ({res['desirable']} desirable, {res['undesirable']} undesirable) to {res['kto_out']}")
        print(f"left out {left}: {left_out_text(res['left_out'], 'last_assistant')}" if left else "left out nothing")
        print(f"train on them: add `- path: {out.resolve()}` under data.sources and set train.objective: dpo (or "
              f"orpo, simpo); or `- path: {Path(res['kto_out']).resolve()}` with train.objective: kto")
        return 0
    train_on = train_on or recipe_train_on or "assistant"
    result = export(folder, out, train_on=train_on)
    left = sum(result["left_out"].values())
    print(f"wrote {result['rows']} conversations to {result['out']} ({result['approved']} approved, "
          f"{result['corrected']} corrected; only approved or corrected replies get loss with data.train_on: {train_on})")
    print(f"left out {left}: {left_out_text(result['left_out'], train_on)}" if left else "left out nothing")
    print(f"train on them: add `- path: {out.resolve()}` under data.sources in your recipe, then "
          "`finetune run RECIPE`")
    return 0
