"""Helpers for the eval and tune tests: a prepared run (splits + tokenized, per the prepare contract) on a tiny model.

The prepared folder is built with the real renderer (finetune.data.render) and the real manifest writer, so the
stages under test read exactly what `finetune prepare` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune import recipe as recipe_mod
from finetune import runs


def arithmetic_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append({
            "id": f"ex{i}",
            "messages": [
                {"role": "system", "content": "Answer with the number only."},
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": str(a + b)},
            ],
            "origin": f"synthetic.jsonl:{i + 1}",
        })
    return rows


def make_recipe(tmp_path: Path, model_dir: Path, **sections) -> recipe_mod.Recipe:
    data = {"name": "evaltest", "runs_dir": str(tmp_path / "runs"), "model": {"id": str(model_dir), "dtype": "float32"}}
    data.update(sections)
    return recipe_mod.validate_dict(data, base_dir=tmp_path)


def write_prepared(recipe, model_dir: Path, splits: dict[str, list[dict]]) -> dict:
    """runs/<name>/prepare/ with splits/*.jsonl, tokenized/* (input_ids, labels, length) and a manifest."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from finetune.data.render import render_messages

    tok = AutoTokenizer.from_pretrained(model_dir)
    with runs.StageRun(recipe, "prepare") as stage:
        outputs = {"splits": {}, "tokenized": {}, "rows": {}}
        for split, rows in splits.items():
            path = stage.dir / "splits" / f"{split}.jsonl"
            runs.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
            rendered = [render_messages(tok, r["messages"]) for r in rows]
            ds = Dataset.from_dict({"input_ids": [ids for ids, _ in rendered], "labels": [lab for _, lab in rendered],
                                    "length": [len(ids) for ids, _ in rendered]})
            ds.save_to_disk(str(stage.dir / "tokenized" / split))
            outputs["splits"][split] = str(path)
            outputs["tokenized"][split] = str(stage.dir / "tokenized" / split)
            outputs["rows"][split] = len(rows)
        stage.outputs.update(outputs)
    return runs.read_manifest(recipe.run_dir("prepare"))
