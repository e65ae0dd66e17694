"""tune's search space: errors reported together, the trial budget, validation. The searches themselves (a training
per trial): tests/integration/test_tune_search.py."""

from __future__ import annotations

import pytest
from eval_fixtures import make_recipe

from finetune import recipe as recipe_mod
from finetune import tune
from finetune.errors import UserError


def test_space_errors_are_reported_together(tiny_model_dir, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model_dir, tune={"sampler": "grid", "space": {
        "train.lrr": {"values": [1e-3]},
        "train.batch_size": {"values": [0, 4]},
        "train.lr": {"low": 1e-4, "high": 1e-3},
    }})
    with pytest.raises(UserError) as err:
        tune.check_space(recipe)
    text = str(err.value)
    assert "train.lrr: not a recipe key; did you mean 'train.lr'" in text
    assert "train.batch_size: 0 is not valid" in text
    assert "train.lr: the grid sampler needs a 'values' list" in text


def test_empty_space_says_what_to_write(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="tune.space is empty"):
        tune.check_space(make_recipe(tmp_path, tiny_model_dir))


def test_trial_overrides_apply_the_step_budget(tiny_model_dir, tmp_path):
    recipe = make_recipe(tmp_path, tiny_model_dir, train={"eval_every": 50},
                         tune={"trial_max_steps": 20, "space": {"train.lr": {"values": [1e-3]}}})
    overrides = tune.trial_overrides(recipe, {"train.lr": 1e-3})
    assert overrides == {"train.lr": 1e-3, "train.max_steps": 20, "train.eval_every": 5, "train.save_every": 20}
    trial_recipe = recipe_mod.with_overrides(recipe, overrides)
    assert trial_recipe.train.max_steps == 20 and trial_recipe.train.lr == 1e-3


def test_param_space_validation():
    with pytest.raises(recipe_mod.RecipeError, match="log-scale range needs low > 0"):
        recipe_mod.validate_dict({"name": "x", "tune": {"space": {"train.lr": {"low": 0, "high": 1, "log": True}}}})
    with pytest.raises(recipe_mod.RecipeError, match="not both"):
        recipe_mod.validate_dict({"name": "x", "tune": {"space": {"train.lr": {"values": [1], "low": 0, "high": 1}}}})
