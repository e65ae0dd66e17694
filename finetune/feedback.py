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

import argparse
import json
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


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="finetune feedback",
        description="Turn feedback collected by `finetune serve` / `finetune chat` into training data.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    exp = sub.add_parser("export", help="write approved and corrected replies as {messages: [...]} JSONL rows")
    stats = sub.add_parser("stats", help="count stored exchanges, ratings and corrections")
    for sp in (exp, stats):
        sp.add_argument("target", metavar="RECIPE|DIR|MODEL.gguf",
                        help="the recipe (reads runs/<name>/serve/), the served .gguf, or the store folder")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. runs_dir=/tmp/runs")
        sp.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    exp.add_argument("-o", "--out", required=True, help="output JSONL file (add it to data.sources to train on it)")
    exp.add_argument("--train-on", choices=TRAIN_ON_CHOICES,
                     help="the data.train_on of the recipe that will train the file (default: the recipe's when a "
                     "recipe is given, else assistant). With assistant or all, conversations whose earlier model "
                     "replies are not approved are left out, since those replies would be trained on too")
    exp.add_argument("--as", dest="kind", choices=("sft", "preferences"), default="sft",
                     help="sft (default): approved and corrected replies as {messages} rows; preferences: DPO/ORPO "
                     "pairs from corrections to -o, KTO rows from ratings and corrections to <out>.kto.jsonl "
                     "(train them with train.objective dpo/orpo/simpo or kto)")
    ns, extra = p.parse_known_args(argv)  # overrides may come after -o
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    overrides = ns.overrides + extra
    recipe_train_on = None
    if Path(ns.target).suffix in (".yaml", ".yml"):
        from finetune import recipe as recipe_mod

        recipe = recipe_mod.load(Path(ns.target), overrides)
        folder, recipe_train_on = recipe.run_dir("serve"), recipe.data.train_on
    else:
        folder = store_dir_for(ns.target, overrides)
    if ns.action == "stats":
        if not (folder / STORE_FILE).exists():
            raise UserError(f"no feedback store at {folder / STORE_FILE}")
        store = FeedbackStore(folder)
        counts = store.counts()
        store.close()
        print(f"{folder / STORE_FILE}: {counts['exchanges']} exchanges, {counts['up']} thumbs up, "
              f"{counts['down']} thumbs down, {counts['corrections']} better answers")
        return 0
    out = Path(ns.out)
    if out.is_dir():
        raise UserError(f"-o {out}: is a folder; give a file name, e.g. -o {out / 'feedback.jsonl'}")
    if out.suffix != ".jsonl":
        raise UserError(f"-o {out}: the export writes JSON Lines; name the file *.jsonl (e.g. -o {out.with_suffix('.jsonl')})"
                        " so that prepare reads it as such")
    if ns.kind == "preferences":
        if ns.train_on:
            raise UserError("--train-on applies to --as sft; preference rows always train the final reply only")
        res = export_preferences(folder, out)
        left = sum(res["left_out"].values())
        print(f"wrote {res['pairs']} pairs (corrections) to {res['out']} and {res['desirable'] + res['undesirable']} "
              f"rated rows ({res['desirable']} desirable, {res['undesirable']} undesirable) to {res['kto_out']}")
        print(f"left out {left}: {left_out_text(res['left_out'], 'last_assistant')}" if left else "left out nothing")
        print(f"train on them: add `- path: {out.resolve()}` under data.sources and set train.objective: dpo (or "
              f"orpo, simpo); or `- path: {Path(res['kto_out']).resolve()}` with train.objective: kto")
        return 0
    train_on = ns.train_on or recipe_train_on or "assistant"
    result = export(folder, out, train_on=train_on)
    left = sum(result["left_out"].values())
    print(f"wrote {result['rows']} conversations to {result['out']} ({result['approved']} approved, "
          f"{result['corrected']} corrected; only approved or corrected replies get loss with data.train_on: {train_on})")
    print(f"left out {left}: {left_out_text(result['left_out'], train_on)}" if left else "left out nothing")
    print(f"train on them: add `- path: {out.resolve()}` under data.sources in your recipe, then "
          "`finetune run RECIPE`")
    return 0
