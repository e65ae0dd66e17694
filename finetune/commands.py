"""The commands: each turns its parsed command line into a call of a plain function and prints what a user wants
to see, kept out of the stage and tool modules.

A stage or tool module (``finetune.prepare``, ``finetune.train``, ``finetune.chat``, ``finetune.doctor``, ...) is a
function with typed arguments, importable and callable from Python without argparse. ``finetune.cli`` pairs each
command here with its parser (``finetune.cli_parsers``); a function here takes the parsed namespace and imports its
stage only when it runs, so that the command line starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from finetune.cli_parsers import EXIT_USER_ERROR, load_recipe, model_path_problem
from finetune.console import duration, mib, number, table
from finetune.errors import UserError


def prepare_command(ns: argparse.Namespace) -> int:
    from finetune import prepare as stage
    from finetune.data.report import print_summary
    from finetune.run import runs

    recipe = load_recipe(ns)
    with runs.run_lock(recipe, "prepare"):
        report = stage.run(recipe, force=ns.force)
    print_summary(report, recipe.run_dir("prepare"))
    return 0


def train_command(ns: argparse.Namespace) -> int:
    from finetune import train as stage
    from finetune.run import artifacts, runs

    recipe = load_recipe(ns)
    with runs.run_lock(recipe, "train"):
        summary = stage.run(recipe, resume=ns.resume, recipe_path=ns.recipe)
    if int(os.environ.get("RANK", "0")) == 0:
        trained = artifacts.load(recipe, artifacts.Trained, ns.recipe, fresh=False)
        val = summary["final_val_loss"]
        print(f"trained {summary['steps']} steps ({summary['stop_reason']}), {summary['tokens_seen']} tokens in "
              f"{duration(summary['seconds'])} ({summary['tokens_per_s']:.0f} tok/s), peak memory "
              f"{summary['peak_memory_mb']:.0f} MB")
        print(f"train loss {number(summary['final_train_loss'])}" + (f", validation loss {number(val)} "
              f"(best {number(summary['best_val_loss'])} at step {summary['best_step']})" if val is not None else ""))
        print(f"wrote {trained.weights}, {trained.summary}, TensorBoard: tensorboard --logdir {trained.tensorboard}")
    return 0


def export_command(ns: argparse.Namespace) -> int:
    from finetune import export as stage
    from finetune.run import artifacts, runs

    recipe = load_recipe(ns)
    with runs.run_lock(recipe, "export"):
        exported = stage.run(recipe, recipe_path=ns.recipe)
    figures = artifacts.summary(recipe, artifacts.Exported)
    print(f"\nexported to {recipe.run_dir('export')} in {duration(figures['seconds']['total'])}")
    summary = figures["parity"] or {}
    print(gguf_table(exported.gguf, figures["sizes"], summary))
    if exported.adapter_gguf is not None and exported.base_gguf is not None:
        print(f"  {exported.adapter_gguf.name}  (LoRA adapter; load over {exported.base_gguf.name})")
    if summary:
        print(f"parity: tokenization exact: {summary['tokenization_exact']}, chat prompt exact: "
              f"{summary['chat_prompt_exact']}  ({exported.parity})")
    for w in figures["warnings"]:
        print(f"warning: {w}")
    return 0


def gguf_table(ggufs: dict[str, Path], sizes: dict[str, int], parity: dict[str, Any]) -> str:
    """The exported files with their size and, when parity was checked, how close each is to the HF model."""
    columns = ["file", "size"]
    if parity:
        columns += ["top-1", "min top-1", "KL", "ppl", "HF ppl"]
    rows = []
    for qtype, path in ggufs.items():
        s = parity.get(qtype) or {}
        checks = [s.get(k) for k in ("top1_agreement", "min_top1", "kl_mean", "ppl_gguf", "ppl_reference")]
        rows.append([Path(path).name, mib(sizes[qtype]), *(checks if parity else [])])
    return table(columns, rows, right=["size"], indent=2)


def eval_command(ns: argparse.Namespace) -> int:
    from finetune import evaluate as stage
    from finetune.run import artifacts, runs

    recipe = load_recipe(ns)
    with runs.run_lock(recipe, "eval"):
        result = stage.run(recipe, recipe_path=ns.recipe)
    print(summary_table(result))
    print(f"\n{result['verdict']['summary']}")
    if "preference" in result["verdict"] and result["verdict"]["preference"] is not result["verdict"]["improved"]:
        print(result["verdict"]["preference"]["summary"])
    for key in ("overfitting", "underfitting"):
        print(f"{key}: {result['verdict'][key]['finding']}")
    if result["gguf"]["status"] != "scored":
        print(f"gguf: {result['gguf']['reason']}")
    print(f"\nreport: {artifacts.load(recipe, artifacts.Evaluated, ns.recipe, fresh=False).report}")
    return 0


# The eval table's rows, in this order, when some model has them.
EVAL_TABLE_KEYS = ["tool_call_match", "exact_match", "accuracy", "precision", "recall", "f1", "rouge1", "rouge2",
                   "rougeL", "rougeLsum", "bleu", "chrf", "loss", "perplexity", "train_sample_loss",
                   "answers_cut_at_max_new_tokens", "answer_words", "answer_lines", "preference_accuracy",
                   "preference_accuracy_per_token", "logp_margin", "reward_accuracy", "reward_margin"]


def summary_table(result: dict[str, Any]) -> str:
    """eval's metrics.json as a console table: one row per metric, one column per model."""
    names = list(result["models"])
    keys = [k for k in EVAL_TABLE_KEYS if any(k in result["models"][n] for n in names)]
    return table(["metric", *names], [[k, *(result["models"][n].get(k) for n in names)] for k in keys])


def tune_command(ns: argparse.Namespace) -> int:
    from finetune import tune as stage
    from finetune.run import runs

    recipe = load_recipe(ns)
    with runs.run_lock(recipe, "tune"):
        result = stage.run(recipe, recipe_path=ns.recipe, fresh=ns.fresh)
    print(stage.results_table(result["trials"]))
    params = ", ".join(f"{k}={v}" for k, v in result["best_params"].items())
    print(f"\nbest: trial {result['best_trial']} (validation loss {number(result['best_value'])}): {params}")
    print(f"best recipe: {result['best_recipe']}")
    print(f"next: finetune prepare {result['best_recipe']} && finetune train {result['best_recipe']} "
          f"&& finetune eval {result['best_recipe']}")
    return 0


def plan_command(ns: argparse.Namespace) -> int:
    from finetune import plan as stage

    if ns.gpu_gb is not None and not (0 < ns.gpu_gb < 10_000):
        raise UserError(f"--gpu-gb: {ns.gpu_gb} is not a card size in GB; try 8, 12, 16 or 24")
    if ns.gpus is not None and not (1 <= ns.gpus <= 4096):
        raise UserError(f"--gpus: {ns.gpus} is not a number of GPUs; try 2, 4 or 8")
    recipe = load_recipe(ns)
    result = stage.run(recipe, gpu_gb=ns.gpu_gb, config_path=ns.config, gpus=ns.gpus)
    print(json.dumps(result, indent=2) if ns.json else stage.format_plan(result))
    return 0 if result["results"][0]["fits"] else 1



def chat_command(ns: argparse.Namespace) -> int:
    from finetune import chat

    return chat.run(ns.target, ns.overrides, url=ns.url, api_key=ns.api_key, system=ns.system,
                    temperature=ns.temperature, max_tokens=ns.max_tokens)


def serve_command(ns: argparse.Namespace) -> int:
    import importlib

    # the optional server package: no finetune module imports it by name (tests/unit/test_layers.py)
    server = importlib.import_module("serve.server")
    return server.serve(ns.target, ns.overrides, host=ns.host, port=ns.port, api_key=ns.api_key, store=ns.store,
                        chat_template=ns.chat_template, log_level=ns.log_level)


def feedback_command(ns: argparse.Namespace) -> int:
    from finetune import feedback

    if ns.action == "stats":
        return feedback.report_stats(ns.target, ns.overrides)
    return feedback.export_file(ns.target, ns.overrides, ns.out, train_on=ns.train_on, kind=ns.kind)


def doctor_command(ns: argparse.Namespace) -> int:
    from finetune import doctor

    return doctor.check(ns.model, config=ns.config, revision=ns.revision, trust_remote_code=ns.trust_remote_code,
                        as_json=ns.json)


def run_command(ns: argparse.Namespace) -> int:
    from finetune.run import artifacts, runs
    from finetune.run import pipeline as stage

    recipe = load_recipe(ns)
    # The commands printed at the end must find the same run: keep the overrides that say where it lives.
    keep = [o for o in ns.overrides if o.split("=", 1)[0].split(".")[0] in ("runs_dir", "name", "serve")]
    where = " ".join([ns.recipe, *keep])
    print(f"run '{recipe.name}' -> {recipe.run_dir()}", flush=True)
    with runs.run_lock(recipe, "run"):
        result = stage.run(recipe, recipe_path=ns.recipe, force=ns.force, start=ns.start, answer=not ns.no_answer)

    rows = [[name, info["status"], duration(info["seconds"]) if info["status"] == "ran" else None]
            for name, info in result["stages"].items()]
    print("\n" + table(["stage", "status", "time"], [*rows, ["total", "", duration(result["seconds"])]],
                       right=["time"], indent=2))
    evaluated = artifacts.load_if_finished(recipe, artifacts.Evaluated)
    scores = stage.score_table(evaluated.metrics) if evaluated is not None else None
    if evaluated is not None and scores:
        print(f"\nscores on the {scores[0]}:\n{scores[1]}")
        print(f"  report: {evaluated.report}")
    sample = result.get("answer")
    if sample:
        print(f"\nthe fine-tuned model ({Path(sample['gguf']).name}, llama.cpp) on a test prompt:")
        if sample.get("system"):
            print(stage.indent("system", sample["system"]))
        print(stage.indent("prompt", sample["prompt"]))
        if sample["expected"] is not None:
            print(stage.indent("expected", sample["expected"]))
        print(stage.indent("answer", sample["answer"]))
        if sample.get("finish_reason") == "length":
            print(f"  (cut at eval.max_new_tokens={recipe.eval.max_new_tokens} tokens)")
    # The model learned its task with the training data's system prompt: chat with the same one.
    system = f" --system {shlex.quote(sample['system'])}" if sample and sample.get("system") else ""
    print("\nchat with it:")
    print(f"  finetune chat {where}{system}")
    print(f"  finetune serve {where}    # web chat + OpenAI-compatible API at http://127.0.0.1:{recipe.serve.port}")
    return 0


def push_command(ns: argparse.Namespace) -> int:
    from finetune import hub

    repo = hub.check_repo_id(ns.repo)
    recipe = load_recipe(ns)
    uploads = hub.plan(recipe, ns.what, ns.recipe)
    print(table(["in the repository", "size", "from"],
                [[u.path_in_repo, mib(u.size), "generated (card with eval scores)" if isinstance(u.source, bytes)
                  else str(u.source)] for u in uploads], right=["size"], indent=2))
    total = sum(u.size for u in uploads)
    if ns.dry_run:
        print(f"dry run: {len(uploads)} files, {mib(total)} would go to https://huggingface.co/{repo}"
              + (" (private)" if ns.private else ""))
        return 0
    url = hub.push(repo, uploads, private=ns.private, message=f"finetune push {recipe.name} --what {ns.what}")
    print(f"pushed {len(uploads)} files ({mib(total)}) to {url}")
    return 0


def recipes_command(ns: argparse.Namespace) -> int:
    from finetune import starter

    if ns.action not in ("list", "copy"):
        raise UserError(f"finetune recipes: {ns.action!r} is not list or copy; to copy that recipe: finetune recipes "
                        f"copy {ns.action} [DEST]")
    if ns.action == "list":
        if ns.name:
            raise UserError(f"finetune recipes: {ns.name!r} after list; to copy a recipe: finetune recipes copy "
                            f"{ns.name} [DEST]")
        found = starter.shipped_recipes()
        import shutil

        print(table(["recipe", "what it does"], [[r.name, r.about] for r in found],
                    width=max(80, shutil.get_terminal_size().columns)))
        print(f"\n{len(found)} recipes in {starter.RECIPES_DIR}. Copy one to make it yours: "
              "finetune recipes copy NAME [DEST]")
        return 0
    if not ns.name:
        raise UserError("finetune recipes copy: which one? give NAME as listed by `finetune recipes`, e.g. "
                        "finetune recipes copy tasks/my-data my-recipe.yaml")
    target, missing = starter.copy_recipe(ns.name, ns.dest)
    shown = shlex.quote(_here(target))
    print(f"wrote {shown}")
    for shipped, wanted in missing:
        print(f"  it reads {shipped.name} by a path relative to itself; copy that too: mkdir -p "
              f"{shlex.quote(_here(wanted.parent))} && cp {shlex.quote(str(shipped))} {shlex.quote(_here(wanted))}")
    print(f"next: finetune validate {shown}, then finetune run {shown}")
    return 0


def _here(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when it is below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def init_command(ns: argparse.Namespace) -> int:
    from finetune import starter

    if ns.gpu_gb is not None and not (0 < ns.gpu_gb < 10_000):
        raise UserError(f"--gpu-gb: {ns.gpu_gb} is not a card size in GB; try 8, 12, 16 or 24")
    w = starter.init_recipe(ns.data, ns.model, check=check_inputs, out=ns.output, gpu_gb=ns.gpu_gb)
    shown = shlex.quote(_here(w.path))
    print(f"wrote {shown}: {w.rows} rows, {w.format} format; train: {w.why}")
    print(f"it passes `finetune validate`; next: finetune run {shown}")
    return 0


def validate_command(ns: argparse.Namespace) -> int:
    from finetune import recipe

    files: list[Path] = []
    for item in ns.recipes:
        path = Path(item)
        if path.is_dir():
            from finetune.recipe import recipe_files

            files += recipe_files(path)
        else:
            files.append(path)
    bad = 0
    for f in files:
        try:
            r = recipe.load(f)
            problems = check_inputs(r)
            if problems:
                raise recipe.RecipeError(str(f), problems)
            print(f"ok      {f}  (name: {r.name}, model: {r.model.id})")
        except recipe.RecipeError as exc:
            bad += 1
            print(f"INVALID {exc}", file=sys.stderr)
    print(f"{len(files) - bad} valid, {bad} invalid")
    return EXIT_USER_ERROR if bad else 0


def check_inputs(r) -> list[str]:
    """What `prepare` and the later stages would refuse that needs no model and no network: no data source, a
    local data file that is missing, a folder, unreadable, of an unknown format or without the mapped columns,
    and a local model path (a .gguf file or a folder) that does not exist. Hub ids and Hub datasets are not
    checked (that needs the network)."""
    from finetune import prepare
    from finetune.data import formats
    from finetune.errors import UserError

    problems = []
    if not r.data.sources:
        problems.append("data.sources: no data source; prepare and train need one, e.g. "
                        "data: {sources: [{path: train.jsonl}]}")
    for i, src in enumerate(r.data.sources):
        if src.path is None:
            continue
        try:
            loaded, fmt = prepare.read_source(r, i)
            formats.check_fields_present((row.record for row in loaded.rows), fmt, src.columns, source=loaded.name,
                                         where=f"data.sources[{i}]")
        except UserError as exc:
            problems.append(str(exc))
    produced = {r.export.outtype, *r.export.quantizations}  # the keys of the export's GGUFs, which serve looks up
    # only a serve.quant the recipe sets: left at its default, serve takes the type export wrote (gguf_to_serve)
    if "quant" in r.serve.model_fields_set and r.serve.quant != "auto" and r.serve.quant not in produced:
        problems.append(f"serve.quant: {r.serve.quant} is not a type export writes (export.outtype "
                        f"{r.export.outtype} and export.quantizations {r.export.quantizations}); add {r.serve.quant} to "
                        f"export.quantizations or set serve.quant to one of {', '.join(sorted(produced))}")
    model_problem = model_path_problem(r.model.id, r.base_dir)
    if model_problem:
        problems.append(model_problem)
    else:
        problems += _model_config_problems(r)
    return problems


def _model_config_problems(r) -> list[str]:
    """What the model's config.json already refuses (``finetune.refusals``), when it is at hand without the
    network (a local folder, or the Hub cache)."""
    from finetune import refusals

    config_file = _cached_config_file(r)
    if config_file is None:
        return []
    return refusals.problems(json.loads(config_file.read_text()), method=r.train.method,
                             adapter_gguf=r.export.adapter_gguf)


def _cached_config_file(r) -> Path | None:
    """The model's config.json when it is on this machine (a local folder, or the Hub cache); None otherwise."""
    from finetune.models import EMBEDDED_MODEL

    if r.model.id == EMBEDDED_MODEL:
        return None
    candidate = Path(r.model.id).expanduser()
    folder = next((p for p in ([candidate] if candidate.is_absolute() else [r.base_dir / candidate, candidate])
                   if (p / "config.json").is_file()), None)
    if folder is not None:
        config_file: Path | None = folder / "config.json"
    elif r.model.id.count("/") == 1 and not candidate.suffix:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(r.model.id, "config.json", revision=r.model.revision)
        config_file = Path(cached) if isinstance(cached, str) else None
    else:
        config_file = None
    return config_file


def show_command(ns: argparse.Namespace) -> int:
    from finetune import recipe

    print(recipe.dump(load_recipe(ns)), end="")
    return 0
