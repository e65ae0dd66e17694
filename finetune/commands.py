"""The stage commands: argument parsing and console output for each stage, kept out of the stage modules.

A stage module (``finetune.prepare``, ``finetune.train``, ...) is a function ``run(recipe, ...)`` importable and
callable from Python without argparse; each function here parses a command line, calls that ``run`` and prints what
a user wants to see. ``finetune.cli`` maps command names to these functions and imports them only when they run.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from finetune.cli import check_inputs, load_recipe, recipe_parser
from finetune.console import duration, mib, number, table
from finetune.errors import UserError
from finetune.run import runs


def prepare_command(argv: list[str]) -> int:
    from finetune import prepare as stage
    from finetune.data.report import print_summary

    parser = recipe_parser("prepare", "Load, clean, split and tokenize the recipe's data into runs/<name>/prepare/.")
    parser.add_argument("--force", action="store_true", help="rebuild even when inputs are unchanged")
    ns = parser.parse_args(argv)
    recipe = load_recipe(ns)
    with runs.run_lock(recipe, "prepare"):
        report = stage.run(recipe, force=ns.force)
    print_summary(report, recipe.run_dir("prepare"))
    return 0


def train_command(argv: list[str]) -> int:
    from finetune import train as stage

    p = recipe_parser("train", "Train the recipe's model on the prepared data (LoRA, DoRA, QLoRA or full). "
                               "Several processes: `torchrun --nproc_per_node N -m finetune train RECIPE` or "
                               "`accelerate launch -m finetune train RECIPE`.")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint (an interrupted run also resumes by itself "
                        "when its settings are unchanged)")
    ns = p.parse_args(argv)
    recipe = load_recipe(ns)
    with runs.run_lock(recipe, "train"):
        summary = stage.run(recipe, resume=ns.resume, recipe_path=ns.recipe)
    if int(os.environ.get("RANK", "0")) == 0:
        out = recipe.run_dir("train")
        val = summary["final_val_loss"]
        print(f"trained {summary['steps']} steps ({summary['stop_reason']}), {summary['tokens_seen']} tokens in "
              f"{duration(summary['seconds'])} ({summary['tokens_per_s']:.0f} tok/s), peak memory "
              f"{summary['peak_memory_mb']:.0f} MB")
        print(f"train loss {number(summary['final_train_loss'])}" + (f", validation loss {number(val)} "
              f"(best {number(summary['best_val_loss'])} at step {summary['best_step']})" if val is not None else ""))
        print(f"wrote {out / ('model' if recipe.train.method == 'full' else 'adapter')}, {out / 'summary.json'}, "
              f"TensorBoard: tensorboard --logdir {out / 'tb'}")
    return 0


def export_command(argv: list[str]) -> int:
    from finetune import export as stage

    ns = recipe_parser("export", "Merge the trained adapter, convert to GGUF (F16 + quantizations), check parity, "
                                 "write Ollama Modelfiles. Run after `finetune train`.").parse_args(argv)
    recipe = load_recipe(ns)
    with runs.run_lock(recipe, "export"):
        result = stage.run(recipe, recipe_path=ns.recipe)
    print(f"\nexported to {recipe.run_dir('export')} in {duration(result['seconds']['total'])}")
    summary = result["parity_summary"] or {}
    print(gguf_table(result["gguf"], result["sizes"], summary))
    if result["adapter_gguf"]:
        print(f"  {Path(result['adapter_gguf']).name}  (LoRA adapter; load over {Path(result['base_gguf']).name})")
    if summary:
        print(f"parity: tokenization exact: {summary['tokenization_exact']}, chat prompt exact: "
              f"{summary['chat_prompt_exact']}  ({result['parity']})")
    for w in result["warnings"]:
        print(f"warning: {w}")
    return 0


def gguf_table(ggufs: dict[str, str], sizes: dict[str, int], parity: dict[str, Any]) -> str:
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


def eval_command(argv: list[str]) -> int:
    from finetune import evaluate as stage

    parser = recipe_parser("eval", "Score the base and the fine-tuned model (and the exported GGUF) on held-out "
                           "examples; write metrics.json and report.html under runs/<name>/eval/.")
    ns = parser.parse_args(argv)
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
    print(f"\nreport: {recipe.run_dir('eval') / 'report.html'}")
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


def tune_command(argv: list[str]) -> int:
    from finetune import tune as stage

    parser = recipe_parser("tune", "Search hyperparameters (tune.space) for the lowest validation loss; write "
                           "runs/<name>/tune/results.csv and best.yaml. Running it again continues the study.")
    parser.add_argument("--fresh", action="store_true", help="delete the stored study and its trials and start over")
    ns = parser.parse_args(argv)
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


def plan_command(argv: list[str]) -> int:
    from finetune import plan as stage

    p = recipe_parser("plan", "Estimate training memory and time for a recipe; say whether it fits and what to change.")
    p.add_argument("--gpu-gb", type=float, default=None, metavar="N",
                   help="plan for a GPU with N GB (e.g. 8, 12, 16, 24) instead of the detected device")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="plan N such GPUs: memory per GPU with the model sharded (FSDP2) and the launch command; "
                        "if it does not fit, try more GPUs or fsdp_activation_checkpointing")
    p.add_argument("--config", default=None, metavar="PATH",
                   help="the model's config.json (or a folder with it); default: from the model folder or the Hub")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    ns = p.parse_args(argv)
    if ns.gpu_gb is not None and not (0 < ns.gpu_gb < 10_000):
        raise UserError(f"--gpu-gb: {ns.gpu_gb} is not a card size in GB; try 8, 12, 16 or 24")
    if ns.gpus is not None and not (1 <= ns.gpus <= 4096):
        raise UserError(f"--gpus: {ns.gpus} is not a number of GPUs; try 2, 4 or 8")
    recipe = load_recipe(ns)
    result = stage.run(recipe, gpu_gb=ns.gpu_gb, config_path=ns.config, gpus=ns.gpus)
    print(json.dumps(result, indent=2) if ns.json else stage.format_plan(result))
    return 0 if result["results"][0]["fits"] else 1


def run_command(argv: list[str]) -> int:
    from finetune.run import pipeline as stage
    from finetune.run.freshness import STAGE_NAMES

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
    with runs.run_lock(recipe, "run"):
        result = stage.run(recipe, recipe_path=ns.recipe, force=ns.force, start=ns.start, answer=not ns.no_answer)

    rows = [[name, info["status"], duration(info["seconds"]) if info["status"] == "ran" else None]
            for name, info in result["stages"].items()]
    print("\n" + table(["stage", "status", "time"], [*rows, ["total", "", duration(result["seconds"])]],
                       right=["time"], indent=2))
    scores = stage.score_table(recipe.run_dir("eval") / "metrics.json")
    if scores:
        print(f"\nscores on the {scores[0]}:\n{scores[1]}")
        print(f"  report: {recipe.run_dir('eval') / 'report.html'}")
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



def push_command(argv: list[str]) -> int:
    from finetune import hub

    p = recipe_parser("push", "Upload a run's adapter, merged checkpoint or GGUF files (each with its model card) to "
                              "a Hugging Face model repository. Needs a token: `huggingface-cli login` or HF_TOKEN.")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="the model repository (created if missing)")
    p.add_argument("--what", choices=hub.WHAT, default="gguf",
                   help="adapter: train's adapter; merged: export's merged checkpoint; gguf (default): export's GGUF "
                        "files, Modelfiles and card; all: adapter/ and merged/ as folders, the GGUF files at the root")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps "
                                                          "its visibility)")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded where, and upload nothing")
    ns = p.parse_intermixed_args(argv)
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


def recipes_command(argv: list[str]) -> int:
    from finetune import starter
    from finetune.cli import CommandParser, add_global_flags

    p = CommandParser(prog="finetune recipes", description="List the shipped recipes, or copy one to start from.")
    p.add_argument("action", nargs="?", default="list", metavar="list|copy", help="list (default) or copy")
    p.add_argument("name", nargs="?", metavar="NAME", help="copy: the recipe, as listed (e.g. tasks/my-data)")
    p.add_argument("dest", nargs="?", metavar="DEST", help="copy: a new .yaml file or a folder (default: here)")
    add_global_flags(p)
    ns = p.parse_args(argv)
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


def init_command(argv: list[str]) -> int:
    from finetune import starter
    from finetune.cli import CommandParser, add_global_flags

    p = CommandParser(prog="finetune init", description="Write a recipe for your data file and a model: the format "
                      "detected from the columns, a train/validation/test split, and the training method "
                      "`finetune plan` says fits this machine (or --gpu-gb). An existing file is never replaced.")
    p.add_argument("data", metavar="DATA", help="your data file (.jsonl .json .csv .tsv .parquet .txt)")
    p.add_argument("--model", required=True, metavar="ID_OR_PATH",
                   help="a Hub id (org/name), a local model folder, a .gguf file, or smollm2-135m-instruct")
    p.add_argument("--gpu-gb", type=float, default=None, metavar="N",
                   help="choose the method for a GPU with N GB instead of this machine")
    p.add_argument("-o", "--output", default=None, metavar="RECIPE",
                   help="the recipe file to write (default: <data name>.yaml here)")
    add_global_flags(p)
    ns = p.parse_args(argv)
    if ns.gpu_gb is not None and not (0 < ns.gpu_gb < 10_000):
        raise UserError(f"--gpu-gb: {ns.gpu_gb} is not a card size in GB; try 8, 12, 16 or 24")
    w = starter.init_recipe(ns.data, ns.model, check=check_inputs, out=ns.output, gpu_gb=ns.gpu_gb)
    shown = shlex.quote(_here(w.path))
    print(f"wrote {shown}: {w.rows} rows, {w.format} format; train: {w.why}")
    print(f"it passes `finetune validate`; next: finetune run {shown}")
    return 0
