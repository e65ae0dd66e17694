"""Helpers for the eval and tune tests: a prepared run (splits + tokenized, per the prepare contract) on a tiny model,
and the inputs of an eval report.

The prepared folder is built with the real renderer (finetune.data.render) and the real manifest writer, so the
stages under test read exactly what `finetune prepare` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune import recipe as recipe_mod
from finetune.run import artifacts, runs


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
        outputs: dict[str, dict] = {"splits": {}, "tokenized": {}, "rows": {}}
        for split, rows in splits.items():
            path = stage.dir / "splits" / f"{split}.jsonl"
            runs.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
            rendered = [render_messages(tok, r["messages"]) for r in rows]
            ds = Dataset.from_dict({"input_ids": [ids for ids, _ in rendered], "labels": [lab for _, lab in rendered],
                                    "length": [len(ids) for ids, _ in rendered]})
            ds.save_to_disk(str(stage.dir / "tokenized" / split))
            outputs["splits"][split] = path
            outputs["tokenized"][split] = stage.dir / "tokenized" / split
            outputs["rows"][split] = len(rows)
        stage.record(artifacts.Prepared(**outputs, report=stage.dir / "report.json",
                                        lengths_png=stage.dir / "lengths.png"))
    return runs.read_manifest(recipe.run_dir("prepare"))


def result_and_examples():
    """An eval result, its examples and a training log as the eval stage writes them (20 made-up router tickets,
    three scored columns): what eval_report.write_report reads."""
    from finetune import verdict as ft_verdict

    log = []
    for step in range(1, 41):
        val = 2.2 - 0.03 * step if step % 10 == 0 else None
        log.append({"step": step, "epoch": step / 20, "loss": 2.5 * 0.95 ** step + 0.3, "val_loss": val, "lr": 5e-4,
                    "tokens": step * 900, "tokens_per_s": 250.0, "time": step * 4.0})
    refs = [f'{{"priority": "high", "product": "router {i}"}}' for i in range(20)]
    answers = {
        "base": [f"Sure! Here is a summary of ticket {i}: the customer has a router problem." for i in range(20)],
        "finetuned": [r if i % 7 else r.replace("high", "low") for i, r in enumerate(refs)],
        "gguf-Q8_0": [r if i % 5 else r.replace("high", "low") for i, r in enumerate(refs)],
    }
    names = ["exact_match", "rouge", "bleu"]
    models, per_example = {}, {}
    for name, outs in answers.items():
        from finetune import metrics

        corpus, rows, sources = metrics.score_generations(names, outs, refs)
        models[name] = {"model": f"/models/{name}", **corpus, "answers_cut_at_max_new_tokens": 0}
        per_example[name] = rows
    models["base"].update(loss=2.41, perplexity=11.1)
    models["finetuned"].update(loss=0.35, perplexity=1.42, train_sample_loss=0.30)
    gguf = {"status": "scored", "variant": "gguf-Q8_0", "path": "/x.gguf", "quant": "Q8_0"}
    verdict = ft_verdict.make_verdict(models, per_example, {}, log, names, gguf)
    result = {"run": "demo", "split": "test", "examples": 20,
              "generation": {"max_new_tokens": 96, "temperature": 0.0, "greedy": True, "batch_size": 16,
                             "padding": "left", "device": "cpu"},
              "models": models, "metric_sources": sources, "gguf": gguf, "verdict": verdict,
              "rules": ft_verdict.VERDICT_RULES}
    examples = [{"id": f"t{i}", "prompt": "...", "messages": [{"role": "user", "content": f"Ticket {i}: my router <b>"}],
                 "reference": refs[i], "answers": {n: a[i] for n, a in answers.items()},
                 "finish_reason": {n: "stop" for n in answers}, "scores": {n: per_example[n][i] for n in answers}}
                for i in range(20)]
    return result, examples, log
