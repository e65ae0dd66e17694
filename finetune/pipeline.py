"""``finetune run RECIPE``: prepare -> train -> export -> eval, skipping the stages that are already up to date.

Export runs before eval so that the report scores the exported GGUF next to the base and fine-tuned models.

A stage is up to date when its manifest exists, the recipe sections it reads are the same as when it ran (the
manifest records the resolved recipe), what it was built from has not changed since - for prepare, the content
of the local data files and the tokenizer (sha256, never modification times); for the others, the manifests of
the stages upstream of it, recorded in its own manifest when it ran - and the same holds for those upstream
stages. A stage that runs makes the stages reading its outputs stale, not the others: a new eval section re-runs
eval only. Each stage checks its upstream the same way before using it (``require_fresh``), so a stage run by
hand refuses stale inputs instead of using them. The run ends with a real answer from the fine-tuned GGUF on one
test prompt and the commands to chat with it and serve it.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass
from datetime import datetime
from importlib import import_module
from pathlib import Path
from typing import Any

from finetune import runs
from finetune.errors import UserError
from finetune.recipe import Recipe


@dataclass(frozen=True)
class Stage:
    name: str          # folder under runs/<name>/ and the CLI command
    module: str        # the module whose run(recipe) does the work
    sections: tuple[str, ...]   # recipe keys whose change makes the stage stale
    upstream: tuple[str, ...]   # stages whose outputs it reads


STAGES = (
    # prepare depends on the model only through its tokenizer, whose files it fingerprints (prepare.stale_inputs)
    Stage("prepare", "finetune.prepare", ("data", "seed"), ()),
    Stage("train", "finetune.train", ("model", "train", "seed"), ("prepare",)),
    Stage("export", "finetune.export", ("model", "export"), ("train",)),
    Stage("eval", "finetune.evaluate", ("model", "eval", "seed"), ("prepare", "train", "export")),
)
STAGE_NAMES = [s.name for s in STAGES]
BY_NAME = {s.name: s for s in STAGES} | {"tune": Stage("tune", "finetune.tune", ("tune",), ("prepare",))}
OUTPUT_NAMES = {"prepare": "prepared data", "train": "the trained model", "export": "the exported GGUF"}
STATE_FILE = "pipeline.json"
changed_keys = runs.changed_keys


# ------------------------------------------------------------------------------------------ staleness
def _section(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _time(text: str | None) -> float | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp() if text else None
    except ValueError:
        return None


def why_stale(recipe: Recipe, stage: Stage) -> str | None:
    """None when the stage's finished outputs still match the recipe and what they were built from, else why
    not ("data.system_prompt changed", "data file x.jsonl changed", "prepare ran since", ...). Upstream stages
    are not checked here (``require_fresh`` and ``run`` walk the chain)."""
    manifest = runs.read_manifest(recipe.run_dir(stage.name))
    if manifest is None:
        return "not run yet"
    current = recipe.to_dict()
    diff = [key for dotted in stage.sections
            for key in changed_keys(_section(manifest.get("recipe") or {}, dotted), _section(current, dotted), dotted)]
    if diff:
        return ", ".join(diff[:4]) + (" ..." if len(diff) > 4 else "") + " changed"
    if stage.name == "prepare":
        from finetune import prepare

        reason = prepare.stale_inputs(recipe, manifest)
        if reason:
            return reason
    recorded = (manifest.get("inputs") or {}).get("upstream")
    for up in stage.upstream:
        now = runs.read_manifest(recipe.run_dir(up))
        if recorded is None:
            # Written without an upstream record (by an older finetune, or by hand): go by finishing order.
            started, finished = _time(manifest.get("started")), _time((now or {}).get("finished"))
            if now is not None and (started is None or finished is None or finished > started):
                return f"{up} ran since"
        elif recorded.get(up) != runs.manifest_id(now):
            return f"{up} ran since" if now is not None else f"the {up} outputs it used are gone"
    return None


def require_fresh(recipe: Recipe, name: str, recipe_path: str = "RECIPE") -> dict[str, Any]:
    """The manifest of a finished stage whose outputs still match the recipe and their inputs, as do the stages
    before it. Otherwise a UserError: "prepared data is stale because X changed: run `finetune prepare R`"."""
    manifest = runs.require_stage(recipe, name, recipe_path)
    for up in BY_NAME[name].upstream:
        if (recipe.run_dir(up) / "manifest.json").exists():
            require_fresh(recipe, up, recipe_path)
    reason = why_stale(recipe, BY_NAME[name])
    if reason is not None:
        raise UserError(f"{OUTPUT_NAMES.get(name, name + ' outputs')} is stale because {reason}: run "
                        f"`finetune {name} {recipe_path}`" + (" (or `finetune run`, which rebuilds what is stale)"
                                                              if name in STAGE_NAMES else ""))
    return manifest


# ------------------------------------------------------------------------------------------------ run
def run_stage(stage: Stage, recipe: Recipe, recipe_path: str) -> dict[str, Any]:
    try:
        module = import_module(stage.module)
    except ModuleNotFoundError as exc:
        if exc.name == stage.module:
            raise UserError(f"stage '{stage.name}' ({stage.module}) is not available in this installation") from None
        raise
    fn = module.run
    kwargs = {"recipe_path": recipe_path} if "recipe_path" in inspect.signature(fn).parameters else {}
    return fn(recipe, **kwargs) or {}


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
        manifest = runs.read_manifest(recipe.run_dir(stage.name))
        if manifest is None:
            raise UserError(f"stage '{stage.name}' returned without writing {recipe.run_dir(stage.name)}/manifest.json")
        state[stage.name] = {  # a record for people; staleness is read from the manifests themselves
            "manifest": runs.manifest_id(manifest),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(seconds, 1),
        }
        runs.atomic_write_json(state_path, state)
        results[stage.name] = {"status": "ran", "seconds": round(seconds, 1), "reason": reason}
        print(f"[{stage.name}] done in {duration(seconds)}{_brief(result)}", flush=True)
    out: dict[str, Any] = {"stages": results, "seconds": round(time.time() - total, 1)}
    if answer:
        out["answer"] = sample_answer(recipe, recipe_path)
    return out


def _brief(result: dict[str, Any]) -> str:
    scalars = [f"{k}={_fmt(v)}" for k, v in result.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40]
    return (": " + ", ".join(scalars[:6])) if scalars else ""


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


# --------------------------------------------------------------------------------------------- answer
def test_prompt(recipe: Recipe) -> tuple[list[dict[str, str]], str | None] | None:
    """The first chat row of the test split (falling back to validation): (conversation, expected answer)."""
    manifest = runs.read_manifest(recipe.run_dir("prepare")) or {}
    splits = (manifest.get("outputs") or {}).get("splits") or {}
    for split in ("test", "validation", "train"):
        path = Path(splits.get(split) or recipe.run_dir("prepare") / "splits" / f"{split}.jsonl")
        if not path.exists():
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
    manifest = runs.read_manifest(recipe.run_dir("export"))
    ggufs = ((manifest or {}).get("outputs") or {}).get("gguf") or {}
    if not ggufs:
        return None
    quant = recipe.serve.quant if recipe.serve.quant in ggufs else next(iter(ggufs))
    found = test_prompt(recipe)
    if found is None:
        return None
    conversation, expected = found
    from finetune.gguf import runtime

    t0 = time.time()
    reply = runtime.chat(ggufs[quant], [conversation], max_tokens=recipe.eval.max_new_tokens, temperature=0.0,
                         n_ctx=recipe.serve.n_ctx)[0]
    system = next((m["content"] for m in conversation if m["role"] == "system"), None)
    return {"gguf": ggufs[quant], "quant": quant, "system": system, "prompt": conversation[-1]["content"],
            "expected": expected,
            "answer": reply["text"], "finish_reason": reply.get("finish_reason"), "seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------------ CLI
def score_table(path: Path) -> tuple[str, str] | None:
    """(split description, 'metric  base -> fine-tuned' lines) from eval's metrics.json, if it is there."""
    if not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text())
        base, tuned = metrics["models"]["base"], metrics["models"]["finetuned"]
    except (ValueError, KeyError, TypeError):
        return None
    names = [k for k, v in tuned.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and isinstance(base.get(k), (int, float)) and not k.endswith(("seconds", "tokens"))]
    lines = [f"  {'metric':<16}{'base':>10}  {'fine-tuned':>10}"]
    lines += [f"  {k:<16}{_fmt(float(base[k])):>10}  {_fmt(float(tuned[k])):>10}" for k in names]
    return f"{metrics.get('split', 'test')} split ({metrics.get('examples', '?')} examples)", "\n".join(lines)


def indent(label: str, text: str, limit: int = 600) -> str:
    text = text if len(text) <= limit else text[:limit] + " ..."
    lines = text.splitlines() or [""]
    return "\n".join([f"  {label + ':':<10}{lines[0]}"] + [f"  {'':<10}{line}" for line in lines[1:]])
