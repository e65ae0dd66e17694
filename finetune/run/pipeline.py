"""``finetune run RECIPE``: prepare -> train -> export -> eval, skipping the stages that are already up to date.

Export runs before eval so that the report scores the exported GGUF next to the base and fine-tuned models. Which
stages are up to date is decided by ``finetune.run.freshness``; each stage gets what it reads as typed records
(``finetune.run.artifacts.for_stage``), exactly as when its command runs alone. A stage that runs makes the stages reading
its outputs stale, not the others: a new eval section re-runs eval only. The run ends with a real answer from the
fine-tuned GGUF on one test prompt and the commands to chat with it and serve it.
"""

from __future__ import annotations

import json
import time
from importlib import import_module
from pathlib import Path
from typing import Any

from finetune.console import duration, number, table
from finetune.errors import UserError
from finetune.recipe import Recipe
from finetune.run import artifacts, runs
from finetune.run.freshness import STAGES, Stage, why_stale

STATE_FILE = "pipeline.json"


# ------------------------------------------------------------------------------------------------ run
def run_stage(stage: Stage, recipe: Recipe, recipe_path: str) -> dict[str, Any] | artifacts.Artifact:
    """The stage's ``run``: what it returns (export: its record; the others: a dict of figures)."""
    try:
        module = import_module(stage.module)
    except ModuleNotFoundError as exc:
        if exc.name == stage.module:
            raise UserError(f"stage '{stage.name}' ({stage.module}) is not available in this installation") from None
        raise
    return module.run(recipe, artifacts.for_stage(recipe, stage.name, recipe_path), recipe_path=recipe_path) or {}


def run(recipe: Recipe, *, recipe_path: str = "RECIPE", force: bool = False, start: str | None = None,
        answer: bool = True, stages: tuple[Stage, ...] = STAGES) -> dict[str, Any]:
    """Run the stages in order; returns {"stages": {name: {"status", "seconds", "reason"}}, "answer": ...}."""
    state_path = recipe.run_dir() / STATE_FILE
    runs.make_dir(recipe.run_dir())
    try:
        state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    except ValueError:
        state = {}  # a record of past runs only: staleness is read from the manifests
    results: dict[str, Any] = {}
    rerun = force
    total = time.time()
    for stage in stages:
        if start is not None and stage.name == start:
            rerun = True
        reason = "forced" if rerun else why_stale(recipe, stage)
        if reason is None:
            results[stage.name] = {"status": "up to date", "seconds": 0.0}
            print(f"[{stage.name}] up to date, skipped", flush=True)
            continue
        print(f"[{stage.name}] running ({reason})", flush=True)
        t0 = time.time()
        try:
            result = run_stage(stage, recipe, recipe_path)
        except runs.NothingToDo as exc:  # e.g. eval with an empty test split: say so, go on
            results[stage.name] = {"status": "skipped", "seconds": 0.0, "reason": str(exc)}
            print(f"[{stage.name}] skipped: {exc}", flush=True)
            continue
        seconds = time.time() - t0
        record = artifacts.load_if_finished(recipe, artifacts.RECORDS[stage.name])
        if record is None:
            raise UserError(f"stage '{stage.name}' returned without writing {recipe.run_dir(stage.name)}/manifest.json")
        state[stage.name] = {  # a record for people; staleness is read from the manifests themselves
            "manifest": record.manifest_id,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(seconds, 1),
        }
        runs.atomic_write_json(state_path, state)
        results[stage.name] = {"status": "ran", "seconds": round(seconds, 1), "reason": reason}
        print(f"[{stage.name}] done in {duration(seconds)}{_brief(result, recipe)}", flush=True)
    out: dict[str, Any] = {"stages": results, "seconds": round(time.time() - total, 1)}
    if answer:
        out["answer"] = sample_answer(recipe, recipe_path)
    return out


def _brief(result: dict[str, Any] | artifacts.Artifact, recipe: Recipe) -> str:
    figures = _export_figures(result, recipe) if isinstance(result, artifacts.Exported) else result
    if not isinstance(figures, dict):
        return ""
    scalars = [f"{k}={number(v)}" for k, v in figures.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40]
    return (": " + ", ".join(scalars[:6])) if scalars else ""


def _export_figures(exported: artifacts.Exported, recipe: Recipe) -> dict[str, Any]:
    """What the line after export names, in this order: its files and the types it picked and serves."""
    def text(path: Path | None) -> str | None:
        return str(path) if path is not None else None

    return {"merged": str(exported.merged), "adapter_gguf": text(exported.adapter_gguf),
            "base_gguf": text(exported.base_gguf), "parity": text(exported.parity),
            "quantization": text(exported.quantization), "picked": exported.picked,
            "quantization_chart": text(exported.quantization_chart), "imatrix": text(exported.imatrix),
            "served": artifacts.served_type(list(exported.gguf), exported.picked,
                                            artifacts.requested(recipe.serve, "quant"))}


# --------------------------------------------------------------------------------------------- answer
def test_prompt(recipe: Recipe) -> tuple[list[dict[str, str]], str | None] | None:
    """The first chat row of the test split (falling back to validation, then train): (conversation, expected)."""
    prepared = artifacts.load_if_finished(recipe, artifacts.Prepared)
    if prepared is None:
        return None
    for split in ("test", "validation", "train"):
        path = prepared.splits.get(split)
        if path is None or not path.exists():
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                messages = row.get("messages")
                if not messages:
                    continue
                if messages[-1]["role"] == "assistant":
                    return messages[:-1], messages[-1]["content"]
                return messages, None
    return None


def sample_answer(recipe: Recipe, recipe_path: str) -> dict[str, Any] | None:
    """A real answer from the exported GGUF (llama.cpp, in a child process) on one test prompt."""
    exported = artifacts.load_if_finished(recipe, artifacts.Exported)
    ggufs = exported.gguf if exported is not None else {}
    if not ggufs:
        return None
    quant = exported.gguf_to_serve(artifacts.requested(recipe.serve, "quant"))  # what serve and chat answer with
    found = test_prompt(recipe)
    if found is None:
        return None
    conversation, expected = found
    from finetune.gguf import runtime

    t0 = time.time()
    reply = runtime.chat(ggufs[quant], [conversation], max_tokens=recipe.eval.max_new_tokens, temperature=0.0,
                         n_ctx=recipe.serve.n_ctx)[0]
    system = next((m["content"] for m in conversation if m["role"] == "system"), None)
    return {"gguf": str(ggufs[quant]), "quant": quant, "system": system, "prompt": conversation[-1]["content"],
            "expected": expected,
            "answer": reply["text"], "finish_reason": reply.get("finish_reason"), "seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------------ CLI
def score_table(path: Path) -> tuple[str, str] | None:
    """(split description, a 'metric  base  fine-tuned' table) from eval's metrics.json, if it is there."""
    if not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text())
        base, tuned = metrics["models"]["base"], metrics["models"]["finetuned"]
    except (ValueError, KeyError, TypeError):
        return None
    names = [k for k, v in tuned.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and isinstance(base.get(k), (int, float)) and not k.endswith(("seconds", "tokens"))]
    scores = table(["metric", "base", "fine-tuned"], [[k, float(base[k]), float(tuned[k])] for k in names], indent=2)
    return f"{metrics.get('split', 'test')} split ({metrics.get('examples', '?')} examples)", scores


def indent(label: str, text: str, limit: int = 600) -> str:
    text = text if len(text) <= limit else text[:limit] + " ..."
    lines = text.splitlines() or [""]
    return "\n".join([f"  {label + ':':<10}{lines[0]}"] + [f"  {'':<10}{line}" for line in lines[1:]])
