"""``finetune run RECIPE``: prepare -> train -> export -> eval, skipping the stages that are already up to date.

Export runs before eval so that the report scores the exported GGUF next to the base and fine-tuned models.

A stage is up to date when its manifest exists, the recipe sections it reads are the same as when it ran (the
manifest records the resolved recipe), and what it was built from has not changed since: the manifests of the
stages upstream of it (fingerprints recorded in runs/<name>/pipeline.json when the pipeline ran it; for a stage
that was run by hand, the upstream stage must have finished before it started) and, for prepare, the local data
files. A stage that runs makes the stages reading its outputs stale (their upstream fingerprint changes), not
the others: a new eval section re-runs eval only. The run ends with a real answer from the fine-tuned
GGUF on one test prompt and the commands to chat with it and serve it.
"""

from __future__ import annotations

import inspect
import json
import shlex
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
    Stage("prepare", "finetune.prepare", ("model", "data", "seed"), ()),
    Stage("train", "finetune.train", ("model", "train", "seed"), ("prepare",)),
    Stage("export", "finetune.export", ("model", "export"), ("train",)),
    Stage("eval", "finetune.evaluate", ("model", "eval", "seed"), ("prepare", "train", "export")),
)
STAGE_NAMES = [s.name for s in STAGES]
STATE_FILE = "pipeline.json"


# ------------------------------------------------------------------------------------------ staleness
def _section(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def changed_keys(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted keys whose values differ between two recipe sections (for a readable reason)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += changed_keys(old.get(key), new.get(key), f"{prefix}.{key}")
        return out
    return [] if old == new else [prefix]


def manifest_fingerprint(recipe: Recipe, stage: str) -> str | None:
    path = recipe.run_dir(stage) / "manifest.json"
    return runs.file_fingerprint(path) if path.exists() else None


def data_files(recipe: Recipe) -> dict[str, str]:
    """Local data source files -> fingerprint (Hub sources are pinned by their recipe revision)."""
    out = {}
    for source in recipe.data.sources:
        if source.path:
            path = recipe.resolve_path(source.path)
            out[str(path)] = runs.file_fingerprint(path) if path.exists() else "missing"
    return out


def _time(text: str | None) -> float | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp() if text else None
    except ValueError:
        return None


def why_stale(recipe: Recipe, stage: Stage, state: dict[str, Any]) -> str | None:
    """None when the stage is up to date, else the reason it must run."""
    manifest = runs.read_manifest(recipe.run_dir(stage.name))
    if manifest is None:
        return "not run yet"
    current = recipe.to_dict()
    for dotted in stage.sections:
        diff = changed_keys(_section(manifest.get("recipe") or {}, dotted), _section(current, dotted), dotted)
        if diff:
            return "recipe changed: " + ", ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
    record = state.get(stage.name)
    if record and record.get("manifest") == manifest_fingerprint(recipe, stage.name):
        for up in stage.upstream:
            if record.get("upstream", {}).get(up) != manifest_fingerprint(recipe, up):
                return f"{up} has changed since"
        if stage.name == "prepare" and record.get("files") != data_files(recipe):
            return "data files changed"
        return None
    # Run by hand (no pipeline record for this manifest): go by time.
    started = _time(manifest.get("started"))
    for up in stage.upstream:
        up_manifest = runs.read_manifest(recipe.run_dir(up))
        if up_manifest is None:
            continue  # an upstream that never ran did not finish after it (eval without an export)
        finished = _time(up_manifest.get("finished"))
        if started is None or finished is None or finished > started:
            return f"{up} finished after it"
    if stage.name == "prepare" and started is not None:
        for path in data_files(recipe):
            if not Path(path).exists() or Path(path).stat().st_mtime > started:
                return f"{path} changed"
    return None


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
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    results: dict[str, Any] = {}
    rerun = force
    total = time.time()
    for stage in stages:
        if start is not None and stage.name == start:
            rerun = True
        reason = "forced" if rerun else why_stale(recipe, stage, state)
        if reason is None:
            results[stage.name] = {"status": "up to date", "seconds": 0.0}
            print(f"[{stage.name}] up to date, skipped", flush=True)
            continue
        print(f"[{stage.name}] running ({reason})", flush=True)
        t0 = time.time()
        result = run_stage(stage, recipe, recipe_path)
        seconds = time.time() - t0
        state[stage.name] = {
            "manifest": manifest_fingerprint(recipe, stage.name),
            "upstream": {up: manifest_fingerprint(recipe, up) for up in stage.upstream},
            **({"files": data_files(recipe)} if stage.name == "prepare" else {}),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(seconds, 1),
        }
        if state[stage.name]["manifest"] is None:
            raise UserError(f"stage '{stage.name}' returned without writing {recipe.run_dir(stage.name)}/manifest.json")
        runs.atomic_write_json(state_path, state)
        results[stage.name] = {"status": "ran", "seconds": round(seconds, 1), "reason": reason}
        print(f"[{stage.name}] done in {_duration(seconds)}{_brief(result)}", flush=True)
    out: dict[str, Any] = {"stages": results, "seconds": round(time.time() - total, 1)}
    if answer:
        out["answer"] = sample_answer(recipe, recipe_path)
    return out


def _brief(result: dict[str, Any]) -> str:
    scalars = [f"{k}={_fmt(v)}" for k, v in result.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40]
    return (": " + ", ".join(scalars[:6])) if scalars else ""


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _duration(seconds: float) -> str:
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
def command(argv: list[str]) -> int:
    from finetune.cli import load_recipe, recipe_parser

    p = recipe_parser("run", "Run prepare, train, export and eval in order; stages that are up to date are skipped.")
    p.add_argument("--force", action="store_true", help="run every stage even if it is up to date")
    p.add_argument("--from", dest="start", choices=STAGE_NAMES, help="run from this stage on (earlier ones if stale)")
    p.add_argument("--no-answer", action="store_true", help="skip the final sample answer from the GGUF")
    ns = p.parse_intermixed_args(argv)
    recipe = load_recipe(ns)
    # The commands printed at the end must find the same run: keep the overrides that say where it lives.
    keep = [o for o in ns.overrides if o.split("=", 1)[0].split(".")[0] in ("runs_dir", "name", "serve")]
    where = " ".join([ns.recipe, *keep])
    print(f"run '{recipe.name}' -> {recipe.run_dir()}", flush=True)
    result = run(recipe, recipe_path=ns.recipe, force=ns.force, start=ns.start, answer=not ns.no_answer)

    print("\nstage      status       time")
    for name, info in result["stages"].items():
        print(f"  {name:<8} {info['status']:<12} {_duration(info['seconds']) if info['status'] == 'ran' else '-'}")
    print(f"  total                  {_duration(result['seconds'])}")
    scores = score_table(recipe.run_dir("eval") / "metrics.json")
    if scores:
        print(f"\nscores on the {scores[0]}:\n{scores[1]}")
        print(f"  report: {recipe.run_dir('eval') / 'report.html'}")
    sample = result.get("answer")
    if sample:
        print(f"\nthe fine-tuned model ({Path(sample['gguf']).name}, llama.cpp) on a test prompt:")
        if sample.get("system"):
            print(_indent("system", sample["system"]))
        print(_indent("prompt", sample["prompt"]))
        if sample["expected"] is not None:
            print(_indent("expected", sample["expected"]))
        print(_indent("answer", sample["answer"]))
        if sample.get("finish_reason") == "length":
            print(f"  (cut at eval.max_new_tokens={recipe.eval.max_new_tokens} tokens)")
    # The model learned its task with the training data's system prompt: chat with the same one.
    system = f" --system {shlex.quote(sample['system'])}" if sample and sample.get("system") else ""
    print("\nchat with it:")
    print(f"  finetune chat {where}{system}")
    print(f"  finetune serve {where}    # web chat + OpenAI-compatible API at http://127.0.0.1:{recipe.serve.port}")
    return 0


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


def _indent(label: str, text: str, limit: int = 600) -> str:
    text = text if len(text) <= limit else text[:limit] + " ..."
    lines = text.splitlines() or [""]
    return "\n".join([f"  {label + ':':<10}{lines[0]}"] + [f"  {'':<10}{line}" for line in lines[1:]])
