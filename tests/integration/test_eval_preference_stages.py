"""The eval stage on preference data: prepare -> train (DPO / KTO) -> eval on a tiny model, for real.

The held-out pairs' log-probabilities are checked against an independent computation (the eval stage's own
cross-entropy loss function on the chosen and the rejected conversations, under the base and the fine-tuned model),
the rewards against beta * (fine-tuned - base), and the generation metrics against the chosen replies only."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from finetune import eval_models
from finetune import evaluate as ft_eval
from finetune import recipe as recipe_mod
from finetune.commands import summary_table
from finetune.run import artifacts

WORDS = ["apple", "river", "stone", "cloud", "purple", "seven", "window", "garden", "silver", "tiger", "paper",
         "music", "orange", "candle", "forest", "winter"]


def _pairs(n: int, seed: int = 3) -> list[dict]:
    """A learnable preference: the chosen reply is always "Yes.", the rejected one a random run of words."""
    rng = random.Random(seed)
    return [{"prompt": f"Question {k}: is {rng.choice(WORDS)} a word?", "chosen": "Yes.",
             "rejected": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))} for k in range(n)]


def _rated(n: int, seed: int = 4) -> list[dict]:
    """KTO's rows: per prompt, a desirable "Yes." and an undesirable run of words."""
    rows = []
    for p in _pairs(n, seed):
        rows.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        rows.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
    return rows


def _run(tmp_path: Path, model_dir: Path, rows: list[dict], **train):
    from finetune import prepare
    from finetune import train as ft_train

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {"name": "pe", "seed": 1, "runs_dir": str(tmp_path / "runs"), "model": {"id": str(model_dir),
                                                                                  "dtype": "float32"},
           "data": {"sources": [{"path": str(data)}], "split": {"validation": 0.1, "test": 0.3}},
           "train": {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "scheduler": "constant", "warmup_ratio": 0.0,
                     "log_every": 1, "eval_every": 100, "save_every": 100, **train},
           "eval": {"metrics": ["loss", "exact_match"], "max_new_tokens": 4, "batch_size": 8, "gguf": False,
                    "forgetting": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    recipe = recipe_mod.load(path)
    prepare.run(recipe)
    ft_train.run(recipe)
    return recipe, ft_eval.run(recipe)


def _logps_by_loss(model, ds, ids_col: str, labels_col: str) -> list[float]:
    """Summed log-probabilities of the trained tokens from eval's cross-entropy (mean per token x tokens)."""
    rows = list(zip(ds[ids_col], ds[labels_col], strict=True))
    loss = eval_models.dataset_loss(model, rows, "cpu")
    counts = [sum(1 for t in labels[1:] if t != -100) for labels in ds[labels_col]]
    return [-m * n for m, n in zip(loss["per_example"], counts, strict=True)]


def _models(recipe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = artifacts.load(recipe, artifacts.Trained)
    base = AutoModelForCausalLM.from_pretrained(trained.base_model).float().eval()
    base_logps = lambda ds, a, b: _logps_by_loss(base, ds, a, b)  # noqa: E731
    ref = {"base": base_logps}
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained.base_model).float(),
                                      trained.adapter).eval()
    ref["finetuned"] = lambda ds, a, b: _logps_by_loss(tuned, ds, a, b)
    return ref


def test_dpo_eval_scores_held_out_pairs_for_base_and_tuned(tmp_path, tiny_model_dir):
    from datasets import load_from_disk

    recipe, result = _run(tmp_path, tiny_model_dir, _pairs(40), objective="dpo", preference={"beta": 0.5})
    out = recipe.run_dir("eval")
    test = load_from_disk(str(recipe.run_dir("prepare") / "tokenized" / "test"))
    pref = result["preference"]
    assert pref["kind"] == "pairs" and pref["pairs"] == len(test) >= 8 and pref["beta"] == 0.5
    per_pair = [json.loads(line) for line in (out / "preference.jsonl").read_text().splitlines()]
    assert len(per_pair) == len(test)

    # log-probabilities equal an independent computation, for both models
    for name, logps in _models(recipe).items():
        chosen = logps(test, "input_ids", "labels")
        rejected = logps(test, "rejected_input_ids", "rejected_labels")
        assert [p["chosen_logp"][name] for p in per_pair] == pytest.approx(chosen, abs=1e-3)
        assert [p["rejected_logp"][name] for p in per_pair] == pytest.approx(rejected, abs=1e-3)
        acc = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(test)
        assert result["models"][name]["preference_accuracy"] == pytest.approx(acc)

    # rewards: beta * (fine-tuned - base), and the accuracy is read from them
    for p in per_pair:
        assert p["chosen_reward"] == pytest.approx(0.5 * (p["chosen_logp"]["finetuned"] - p["chosen_logp"]["base"]),
                                                   abs=1e-3)
    tuned = result["models"]["finetuned"]
    assert tuned["reward_accuracy"] == pytest.approx(sum(p["reward_margin"] > 0 for p in per_pair) / len(per_pair))
    assert "reward_accuracy" not in result["models"]["base"]  # the reference has no reward of its own
    # the chosen reply is learnable: DPO moved the held-out pairs the right way
    assert tuned["reward_accuracy"] >= 0.75 and tuned["reward_margin"] > 0
    assert tuned["preference_accuracy"] >= result["models"]["base"]["preference_accuracy"]
    assert result["verdict"]["preference"]["n"] == len(test)

    # generation metrics score the chosen replies; the report and the table show both
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert examples and all(x["reference"] == "Yes." for x in examples)
    assert result["models"]["finetuned"]["answer_words"] is not None
    assert (out / "preference.png").stat().st_size > 1000
    assert "Preferences on" in (out / "report.html").read_text()
    assert "reward_accuracy" in summary_table(result)


def test_kto_rated_rows_pair_by_prompt_and_only_desirable_replies_are_references(tmp_path, tiny_model_dir):
    from datasets import load_from_disk

    recipe, result = _run(tmp_path, tiny_model_dir, _rated(30), objective="kto", max_steps=4)
    test = load_from_disk(str(recipe.run_dir("prepare") / "tokenized" / "test"))
    good = sum(test["desirable"])
    assert 0 < good < len(test)
    pref = result["preference"]
    assert pref["kind"] == "rated" and pref["rows"] == len(test)
    assert pref["pairs"] == good == len(test) - good  # one desirable and one undesirable reply per prompt
    assert 0 <= result["models"]["finetuned"]["rated_accuracy"] <= 1
    examples = [json.loads(line) for line in (recipe.run_dir("eval") / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == good and all(x["reference"] == "Yes." for x in examples)
    # the loss is on the desirable replies only
    assert result["models"]["base"]["loss_tokens"] == sum(
        sum(1 for t in labels[1:] if t != -100) for labels, d in zip(test["labels"], test["desirable"], strict=True)
        if d)
