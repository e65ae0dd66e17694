"""The tune stage: search the recipe keys listed under ``tune.space`` for the lowest validation loss.

Each trial is an ordinary training run (``finetune.train.run``) of the recipe with the trial's values applied
(``recipe.with_overrides``) and a small step budget (``tune.trial_max_steps``), written to
runs/<name>/tune/trials/<number>/. After each validation, train calls back: the trial reports its validation
loss to optuna, and a trial whose loss is worse than the median of earlier trials at the same step is pruned
(``tune.prune``). Samplers: grid (every combination of ``values``), random, and TPE. The budget is
``tune.trials`` and/or ``tune.timeout_minutes``.

The study lives in runs/<name>/tune/study.db (sqlite): running the command again continues it up to the trial
budget; ``--fresh`` starts over. Writes results.csv / results.json (one row per trial), best.yaml (the recipe
with the best values, as a new run '<name>-tuned'; it validates) and manifest.json, only when the study ends
with a finished trial: a failed or interrupted study leaves the previous results and best.yaml as they were.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from finetune import recipe as recipe_mod
from finetune.console import table
from finetune.errors import UserError
from finetune.run import artifacts, runs

FINISHED = ("COMPLETE", "PRUNED", "FAIL")
EVALS_PER_TRIAL = 4  # validations per trial when the recipe's eval_every is too sparse for the trial budget


def run(recipe, upstream: artifacts.Upstream | None = None, *, recipe_path: str = "RECIPE",
        fresh: bool = False) -> dict[str, Any]:
    """Run (or continue) the study on ``upstream.prepared`` (default: this recipe's prepared data, fresh); write the
    results table and best.yaml. Returns the results."""
    import optuna

    cfg = recipe.tune
    check_space(recipe)
    upstream = upstream if upstream is not None else artifacts.for_stage(recipe, "tune", recipe_path)
    out = runs.make_dir(recipe.run_dir("tune"))
    db = out / "study.db"
    if fresh:
        for path in (db, out / "trials"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    definition = {"space": {k: v.model_dump() for k, v in cfg.space.items()}, "sampler": cfg.sampler,
                  "trial_max_steps": cfg.trial_max_steps, "metric": cfg.metric, "prune": cfg.prune,
                  "recipe": _fingerprint_without_tune(recipe)}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{db.resolve()}"
    previous = _load_existing(storage, recipe.name)
    if previous is not None and previous.user_attrs.get("definition") != definition:
        raise UserError(
            f"{db} holds a study of this run with another search (space, sampler, trial budget or recipe changed). "
            f"Run `finetune tune {recipe_path} --fresh` to start a new study (the old trials are deleted), or "
            "restore the recipe to continue the old one."
        )
    done_before = _count_finished(previous) if previous is not None else 0
    study = optuna.create_study(
        study_name=recipe.name, storage=storage, direction="minimize", load_if_exists=True,
        sampler=make_sampler(cfg, seed=recipe.seed + done_before),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if cfg.prune
        else optuna.pruners.NopPruner(),
    )
    study.set_user_attr("definition", definition)
    _fail_interrupted(study)

    budget = cfg.trials
    if cfg.sampler == "grid":
        budget = min(budget, grid_size(cfg))
    remaining = max(0, budget - _count_finished(study))
    started = time.time()
    print(f"tune: {cfg.sampler} search over {', '.join(cfg.space)}; {remaining} trial(s) to run "
          f"({_count_finished(study)} done), {cfg.trial_max_steps or 'full'} steps each")
    if remaining:
        study.optimize(lambda t: objective(t, recipe, upstream, out), n_trials=remaining,
                       timeout=cfg.timeout_minutes * 60 if cfg.timeout_minutes else None,
                       catch=_out_of_memory_errors(), gc_after_trial=True)
    rows = results_rows(study)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        states = ", ".join(f"trial {r['trial']} {r['state']}" for r in rows[:8])
        raise UserError(f"no trial finished ({states}): every trial was pruned or failed. "
                        "Widen tune.space, raise tune.trial_max_steps, or set tune.prune: false.")
    # The study itself is resumable state; the results below are replaced only now that it has ended.
    with runs.StageRun(recipe, "tune", inputs={"prepare": upstream.prepared.manifest_id},
                       upstream=upstream.ids()) as stage:
        runs.atomic_write_json(out / "results.json", rows)
        runs.atomic_write_text(out / "results.csv", results_csv(rows))
        best = study.best_trial
        best_path = write_best_recipe(recipe, best.params, out / "best.yaml", trial=best.number,
                                      value=best.value, n_trials=len(rows))
        result = {"study": recipe.name, "storage": storage, "trials": rows, "best_trial": best.number,
                  "best_value": best.value, "best_params": best.params, "best_recipe": str(best_path),
                  "seconds": round(time.time() - started, 1)}
        stage.record(artifacts.Tuned(results_csv=out / "results.csv", results_json=out / "results.json",
                                     best_recipe=Path(best_path), study=db, best_trial=best.number,
                                     best_value=best.value, best_params=best.params))
    return result


# ------------------------------------------------------------------------------------------ the search
def check_space(recipe) -> None:
    """Every key in tune.space names an existing recipe value and every candidate value validates."""
    cfg = recipe.tune
    if not cfg.space:
        raise UserError("tune.space is empty: list the recipe keys to search, e.g.\n  tune:\n    space:\n"
                        "      train.lr: {low: 1.0e-4, high: 1.0e-3, log: true}\n      train.lora.r: {values: [8, 16]}")
    flat = recipe_mod.flat_keys(recipe.to_dict())
    problems = []
    for key, space in cfg.space.items():
        if key not in flat:
            import difflib

            close = difflib.get_close_matches(key, list(flat), n=1, cutoff=0.6)
            problems.append(f"tune.space.{key}: not a recipe key" + (f"; did you mean '{close[0]}'?" if close else ""))
            continue
        if key.startswith("tune."):
            problems.append(f"tune.space.{key}: tune cannot search its own settings")
            continue
        if cfg.sampler == "grid" and space.values is None:
            problems.append(f"tune.space.{key}: the grid sampler needs a 'values' list (got low/high)")
        candidates = space.values if space.values is not None else [space.low, space.high]
        if space.values is not None and not space.values:
            problems.append(f"tune.space.{key}: 'values' is empty")
        for value in candidates:
            if not (value is None or isinstance(value, (bool, int, float, str))):
                problems.append(f"tune.space.{key}: {value!r} is not a single value (number, text, true/false)")
                continue
            if space.values is None and isinstance(flat[key], int) and not isinstance(flat[key], bool):
                value = int(value)
            try:
                recipe_mod.with_overrides(recipe, {key: value})
            except recipe_mod.RecipeError as exc:
                problems += [f"tune.space.{key}: {value!r} is not valid ({p})" for p in exc.problems]
    if problems:
        raise UserError("tune.space has problems:\n  " + "\n  ".join(problems))


def make_sampler(cfg, seed: int):
    import optuna

    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler({k: list(v.values) for k, v in cfg.space.items()}, seed=seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def grid_size(cfg) -> int:
    return math.prod(len(v.values or []) for v in cfg.space.values())


def suggest(trial, key: str, space, current: Any) -> Any:
    """One value for a key: a choice from 'values', or a number in [low, high] of the same type as the recipe's."""
    if space.values is not None:
        return trial.suggest_categorical(key, list(space.values))
    if isinstance(current, int) and not isinstance(current, bool):
        return trial.suggest_int(key, int(space.low), int(space.high), log=space.log)
    return trial.suggest_float(key, float(space.low), float(space.high), log=space.log)


def trial_overrides(recipe, params: dict[str, Any]) -> dict[str, Any]:
    """The trial's values plus the small step budget; validation often enough for pruning to have signal."""
    cfg = recipe.tune
    overrides = dict(params)
    steps = cfg.trial_max_steps
    if steps is not None and "train.max_steps" not in params:
        overrides["train.max_steps"] = steps
        if "train.eval_every" not in params:
            overrides["train.eval_every"] = min(recipe.train.eval_every, max(1, steps // EVALS_PER_TRIAL))
        if "train.save_every" not in params:
            overrides["train.save_every"] = steps  # one checkpoint per trial: saving is time a CPU trial lacks
    return overrides


def objective(trial, recipe, upstream: artifacts.Upstream, out: Path) -> float:
    import optuna

    from finetune import train

    flat = recipe_mod.flat_keys(recipe.to_dict())
    params = {key: suggest(trial, key, space, flat[key]) for key, space in recipe.tune.space.items()}
    overrides = trial_overrides(recipe, params)
    trial_recipe = recipe_mod.with_overrides(recipe, overrides)
    trial_dir = out / "trials" / f"{trial.number:03d}"
    trial.set_user_attr("dir", str(trial_dir))
    pruned_at: list[int] = []

    def on_eval(step: int, val_loss: float) -> bool:
        trial.report(float(val_loss), int(step))
        if recipe.tune.prune and trial.should_prune():
            pruned_at.append(int(step))
            return True  # train stops this trial
        return False

    started = time.time()
    print(f"tune: trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    summary = train.run(trial_recipe, upstream, on_eval=on_eval, out_dir=trial_dir)
    shutil.rmtree(trial_dir / "checkpoints", ignore_errors=True)  # only for resuming a trial; the adapter stays
    trial.set_user_attr("seconds", round(time.time() - started, 1))
    for key in ("steps", "best_step", "best_val_loss", "final_train_loss", "final_val_loss", "tokens_seen"):
        trial.set_user_attr(key, summary.get(key))
    if pruned_at:
        trial.set_user_attr("pruned_at_step", pruned_at[0])
        raise optuna.TrialPruned(f"validation loss above the median of earlier trials at step {pruned_at[0]}")
    value = summary.get("best_val_loss")
    if value is None or not math.isfinite(value):
        raise UserError(
            "a trial ended without a validation loss: tune minimises validation loss, so the prepared data needs a "
            "validation split (data.split.validation > 0) and train must evaluate within tune.trial_max_steps."
        )
    return float(value)


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    # Only running out of memory fails one trial and moves on; any other error stops the search (it is a bug
    # or a setting that every trial would hit).
    import torch

    return (MemoryError, torch.OutOfMemoryError)


def _load_existing(storage: str, name: str):
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def _count_finished(study) -> int:
    return sum(t.state.name in FINISHED for t in study.trials)


def _fail_interrupted(study) -> None:
    """A trial left RUNNING by an interrupted search never finishes: record it as failed so the budget counts it."""
    from optuna.trial import TrialState

    for t in study.trials:
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)


# -------------------------------------------------------------------------------------------- results
def results_rows(study) -> list[dict[str, Any]]:
    rows = []
    for t in study.trials:
        rows.append({
            "trial": t.number, "state": t.state.name.lower(), "validation_loss": t.value,
            **{k: v for k, v in t.params.items()},
            "best_step": t.user_attrs.get("best_step"), "steps": t.user_attrs.get("steps"),
            "pruned_at_step": t.user_attrs.get("pruned_at_step"),
            "final_train_loss": t.user_attrs.get("final_train_loss"), "seconds": t.user_attrs.get("seconds"),
        })
    return rows


def results_csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def results_table(rows: list[dict[str, Any]]) -> str:
    """The trials as an aligned text table, best validation loss first."""
    if not rows:
        return "(no trials)"
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    ordered = sorted(rows, key=lambda r: (r["validation_loss"] is None, r["validation_loss"] or 0.0))
    return table(columns, [[r.get(c) for c in columns] for r in ordered])


def write_best_recipe(recipe, params: dict[str, Any], path: Path, *, trial: int, value: float, n_trials: int) -> Path:
    """The user's recipe with the best values, as run '<name>-tuned'; paths re-based so it loads from its folder."""
    import yaml

    data = recipe.model_dump(mode="json", exclude_unset=True)
    data["name"] = f"{recipe.name}-tuned"
    for key, value_ in params.items():
        recipe_mod.set_key(data, key, value_)
    _rebase_paths(data, recipe, path.parent)
    changed = ", ".join(f"{k}={v}" for k, v in params.items())
    header = (f"# Best of {n_trials} trial(s) of `finetune tune` on run '{recipe.name}': trial {trial}, "
              f"validation loss {value:.4f} after at most {recipe.tune.trial_max_steps or 'all'} steps.\n"
              f"# Changed: {changed}\n# Next: finetune prepare {path} && finetune train {path} && finetune eval {path}\n")
    runs.atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    recipe_mod.load(path)  # it must validate; a failure here is a bug worth seeing at once
    return path


def _rebase_paths(data: dict[str, Any], recipe, new_dir: Path) -> None:
    """Relative paths in a recipe are relative to its file: rewrite them for a recipe file in new_dir."""
    new_dir = Path(new_dir).resolve()

    def rebase(p: str) -> str:
        target = recipe.resolve_path(p)
        return p if Path(p).expanduser().is_absolute() else os.path.relpath(target, new_dir)

    for source in (data.get("data") or {}).get("sources") or []:
        if source.get("path"):
            source["path"] = rebase(source["path"])
    model_id = (data.get("model") or {}).get("id")
    if model_id and not Path(model_id).is_absolute() and (recipe.base_dir / model_id).exists():
        data["model"]["id"] = rebase(model_id)
    template = (data.get("serve") or {}).get("chat_template")
    if template:
        data["serve"]["chat_template"] = rebase(template)


def _fingerprint_without_tune(recipe) -> str:
    data = recipe.to_dict()
    data.pop("tune", None)
    return runs.fingerprint_json(data)
