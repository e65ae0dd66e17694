"""tune on a tiny model, for real: random and grid searches through the real train stage (a training per trial),
results table, best.yaml, resume of a stored study. The search space's checks: tests/unit/test_tune.py."""

from __future__ import annotations

import csv
import json

import pytest
from eval_fixtures import arithmetic_rows, make_recipe, write_prepared

from finetune import recipe as recipe_mod
from finetune import tune
from finetune.errors import UserError

TRAIN = {"method": "lora", "lora": {"r": 4, "alpha": 8}, "batch_size": 4, "lr": 1e-3, "eval_every": 50,
         "save_every": 50, "log_every": 1, "packing": False}


def _prepared_recipe(tmp_path, model_dir, tune_section):
    data_file = tmp_path / "data" / "rows.jsonl"  # a relative source path, to check best.yaml re-bases it
    data_file.parent.mkdir()
    data_file.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(24)))
    recipe = make_recipe(tmp_path, model_dir, train=TRAIN, tune=tune_section,
                         data={"sources": [{"path": "data/rows.jsonl"}]})
    write_prepared(recipe, model_dir, {"train": arithmetic_rows(24), "validation": arithmetic_rows(6, 30),
                                       "test": arithmetic_rows(4, 40)})
    return recipe


def _check_outputs(recipe, result, n_trials):
    out = recipe.run_dir("tune")
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_trials == len(result["trials"])
    assert {r["state"] for r in rows} <= {"complete", "pruned"}
    complete = [r for r in rows if r["state"] == "complete"]
    assert complete and all(float(r["validation_loss"]) > 0 for r in complete)
    best_row = min(complete, key=lambda r: float(r["validation_loss"]))
    assert int(best_row["trial"]) == result["best_trial"]
    best = recipe_mod.load(out / "best.yaml")  # validates
    assert best.name == f"{recipe.name}-tuned"
    assert best.data.sources[0].path and best.resolve_path(best.data.sources[0].path) == \
        recipe.resolve_path("data/rows.jsonl")
    flat = recipe_mod.flat_keys(best.to_dict())
    for key, value in result["best_params"].items():
        assert flat[key] == pytest.approx(value)
        assert str(value) == best_row[key] or float(best_row[key]) == pytest.approx(value)
    assert best.train.max_steps == recipe.train.max_steps  # the trial budget is not carried into the best recipe
    return rows


@pytest.mark.slow
def test_random_search_three_trials_then_resume(tiny_model_dir, tmp_path):
    recipe = _prepared_recipe(tmp_path, tiny_model_dir, {
        "sampler": "random", "trials": 3, "trial_max_steps": 4,
        "space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
    })
    result = tune.run(recipe)
    rows = _check_outputs(recipe, result, 3)
    lrs = [float(r["train.lr"]) for r in rows]
    assert len(set(lrs)) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert (recipe.run_dir("tune") / "trials" / "000").is_dir()

    # the study is stored: a larger budget continues it with one more trial instead of starting over
    more = recipe_mod.with_overrides(recipe, {"tune.trials": 4})
    result = tune.run(more)
    rows = _check_outputs(more, result, 4)
    assert [float(r["train.lr"]) for r in rows][:3] == lrs

    # a changed search space does not silently mix with the stored study
    changed = recipe_mod.with_overrides(recipe, {"tune.space": {"train.lr": {"low": 1e-3, "high": 1e-2}}})
    with pytest.raises(UserError, match="--fresh"):
        tune.run(changed)


@pytest.mark.slow
def test_grid_search_two_by_two(tiny_model_dir, tmp_path):
    recipe = _prepared_recipe(tmp_path, tiny_model_dir, {
        "sampler": "grid", "trials": 10, "trial_max_steps": 4,
        "space": {"train.lr": {"values": [1e-3, 1e-2]}, "train.lora.r": {"values": [2, 4]}},
    })
    result = tune.run(recipe)
    rows = _check_outputs(recipe, result, 4)  # the grid has 4 points: the budget of 10 stops there
    assert {(float(r["train.lr"]), int(r["train.lora.r"])) for r in rows} == {
        (1e-3, 2), (1e-3, 4), (1e-2, 2), (1e-2, 4)}
    assert "validation_loss" in tune.results_table(result["trials"]).splitlines()[0]
