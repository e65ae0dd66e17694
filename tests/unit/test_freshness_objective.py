"""Prepared data and train.objective: whether prompt-only rows are kept (grpo only) is one of prepare's inputs, so
switching the objective to or from grpo makes the prepared data stale for `finetune run` and `finetune train`, and
switching between two other objectives does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune import prepare, prepare_inputs
from finetune import recipe as recipe_mod
from finetune.errors import UserError
from finetune.run import artifacts, freshness

PREPARE = freshness.BY_NAME["prepare"]


def _write(tmp: Path, model_dir: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("red", "green", "blue", "cyan", "black", "white")]
    rows += [{"messages": [{"role": "user", "content": f"What is {i} plus 2?"}], "answer": str(i + 2)}
             for i in range(6)]
    (tmp / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "rw_fresh.py").write_text("def f(prompts, completions, **kw):\n    return [0.0 for _ in completions]\n")
    doc = {"name": "f", "seed": 3, "runs_dir": str(tmp / "runs"), "model": {"id": str(model_dir)},
           "data": {"sources": [{"path": "mixed.jsonl"}], "split": {"validation": 0.2, "test": 0.0}},
           "train": {"objective": "sft"}}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_crossing_grpo_makes_prepared_data_stale_and_other_objectives_do_not(tmp_path, tiny_model_dir):
    path = _write(tmp_path, tiny_model_dir)

    def load(*overrides: str):
        return recipe_mod.load(path, list(overrides))

    grpo = ("train.objective=grpo", "train.rewards=[{function: 'rw_fresh:f'}]")
    sft = prepare.run(load())
    assert sft["prompt_only"]["kept"] is False and sft["dropped"] == {"no_assistant_turn": 6}
    assert freshness.why_stale(load(), PREPARE) is None
    for other in ("orpo", "kto", "dpo"):  # what prepare keeps is the same for them: no rebuild
        assert freshness.why_stale(load(f"train.objective={other}"), PREPARE) is None

    reason = freshness.why_stale(load(*grpo), PREPARE)
    assert reason == ("train.objective is grpo now, and prompt-only rows are kept only for grpo (the data was "
                      "prepared without them)")
    with pytest.raises(UserError, match=r"prepared data is stale because train\.objective is grpo now, .*: run "
                                        r"`finetune prepare R`"):
        artifacts.for_stage(load(*grpo), "train", "R")  # what `finetune train` reads first

    built = prepare.run(load(*grpo))  # the fingerprint changed: no reuse of the data prepared for sft
    assert built["reused"] is False and sum(built["prompt_only"]["rows"].values()) == 6
    assert freshness.why_stale(load(*grpo), PREPARE) is None and prepare.run(load(*grpo))["reused"] is True
    assert freshness.why_stale(load(), PREPARE) == ("train.objective is sft now, and prompt-only rows are kept only "
                                                    "for grpo (the data was prepared with them)")
    assert prepare.run(load())["reused"] is False


def test_the_fingerprint_of_data_prepared_for_other_objectives_is_unchanged(tmp_path, tiny_model_dir):
    """Only grpo adds to the fingerprint, so data prepared before the objective was one of prepare's inputs is not
    rebuilt for an objective that keeps no prompt-only rows."""
    from finetune.run import runs

    recipe = recipe_mod.load(_write(tmp_path, tiny_model_dir))
    inputs = prepare_inputs.fingerprint_inputs(recipe, tiny_model_dir)
    assert inputs["prompt_only"] is False
    assert inputs["fingerprint"] == runs.fingerprint_json({
        "version": prepare_inputs.PREPARE_VERSION, "data": recipe.data.model_dump(mode="json"), "seed": recipe.seed,
        "sources": inputs["sources"], "tokenizer": inputs["tokenizer"]})
