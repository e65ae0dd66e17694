"""Stage `prepare` on preference data: pairs (strings, message lists, the Hub shape without a prompt column) and
KTO's rated rows, rendered through the model's own template with the mask on the final reply only; a pair whose
chosen equals its rejected is dropped with a reason; a prompt's pairs stay in one split; then DPO trains on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune import recipe as recipe_mod
from finetune.errors import UserError


def _recipe(tmp_path: Path, model_dir: Path, rows: list[dict], *, split=None, train=None, **source):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {"name": "p", "seed": 1, "runs_dir": str(tmp_path / "runs"), "model": {"id": str(model_dir)},
           "data": {"sources": [{"path": str(data), **source}], "split": split or {"validation": 0, "test": 0}},
           "train": train or {}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return recipe_mod.load(path)


def _prepare(recipe):
    from finetune import prepare

    return prepare.run(recipe)


def _tokenized(recipe, split="train"):
    from datasets import load_from_disk

    return load_from_disk(str(recipe.run_dir("prepare") / "tokenized" / split))


PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "Well, let me think about it at length: 4."},
    {"prompt": [{"role": "user", "content": "Name a colour"}], "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "Colours are many; one of them is blue."}]},
    {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Hi!"},  # nothing to prefer: dropped
]


def test_pairs_render_through_the_template_with_the_final_reply_trained(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    recipe = _recipe(tmp_path, tiny_model_dir, PAIRS)
    report = _prepare(recipe)
    assert report["sources"][0]["format"] == "preference" and report["row_kind"] == "pairs"
    assert report["dropped"] == {"identical_pair": 1}
    ds = _tokenized(recipe)
    assert len(ds) == 2 and {"rejected_input_ids", "rejected_labels", "prompt_length"} <= set(ds.column_names)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for row in ds:
        p = row["prompt_length"]
        assert row["input_ids"][:p] == row["rejected_input_ids"][:p]  # the shared prompt
        assert all(t == -100 for t in row["labels"][:p]) and all(t == -100 for t in row["rejected_labels"][:p])
        chosen = tok.decode([t for t in row["labels"] if t != -100])
        rejected = tok.decode([t for t in row["rejected_labels"] if t != -100])
        assert chosen.endswith("<|im_end|>") and rejected.endswith("<|im_end|>")
        assert chosen.removesuffix("<|im_end|>") in ("4", "Blue.")
        assert tok.decode(row["input_ids"][:p]).endswith("<|im_start|>assistant\n")  # the template's own prompt


def test_hub_shape_without_prompt_column_takes_the_shared_beginning(tmp_path, tiny_model_dir):
    conv = [{"role": "user", "content": "Capital of France?"}]
    rows = [{"chosen": conv + [{"role": "assistant", "content": "Paris."}],
             "rejected": conv + [{"role": "assistant", "content": "Lyon, I believe."}], "score": 3}]
    recipe = _recipe(tmp_path, tiny_model_dir, rows)
    report = _prepare(recipe)
    assert report["sources"][0]["format"] == "preference" and report["splits"]["train"] == 1


def test_kto_rows_keep_their_label_and_sft_rows_are_not_mixed_in(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Question {k}?", "completion": f"Answer {k}.", "label": k % 2 == 0} for k in range(6)]
    recipe = _recipe(tmp_path, tiny_model_dir, rows)
    report = _prepare(recipe)
    assert report["sources"][0]["format"] == "kto" and report["row_kind"] == "rated"
    ds = _tokenized(recipe)
    assert sorted(ds["desirable"]) == [0, 0, 0, 1, 1, 1]
    # a prompt/completion source whose label is a class, not a verdict, stays SFT
    rows = [{"prompt": f"Q{k}", "completion": f"A{k}", "label": "sports"} for k in range(3)]
    other = _recipe(tmp_path / "b", tiny_model_dir, rows)
    assert _prepare(other)["sources"][0]["format"] == "prompt_completion"


def test_bad_kto_label_is_dropped_with_its_reason(tmp_path, tiny_model_dir):
    rows = [{"prompt": "Q1", "completion": "A1", "label": True}, {"prompt": "Q2", "completion": "A2", "label": "maybe"}]
    recipe = _recipe(tmp_path, tiny_model_dir, rows, format="kto")
    report = _prepare(recipe)
    assert report["dropped"] == {"bad_label": 1}


def test_mixing_pairs_with_sft_rows_is_a_clear_error(tmp_path, tiny_model_dir):
    data2 = tmp_path / "sft.jsonl"
    data2.write_text(json.dumps({"prompt": "Q", "completion": "A"}) + "\n")
    _recipe(tmp_path, tiny_model_dir, PAIRS[:2])
    doc = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    doc["data"]["sources"].append({"path": str(data2)})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(UserError, match=r"mix row kinds: pairs \(e.g. data.sources\[0\]\), sft"):
        _prepare(recipe_mod.load(tmp_path / "recipe.yaml"))


def test_a_prompts_pairs_stay_in_one_split_and_dpo_trains_on_them(tmp_path, tiny_model_dir):
    from finetune import train

    rows = []
    for k in range(12):
        for j in range(3):  # three pairs per prompt
            rows.append({"prompt": f"Tell me fact number {k}.", "chosen": f"Fact {k}.",
                         "rejected": f"Here is a long story, version {j}, about the number {k} and many other things."})
    recipe = _recipe(tmp_path, tiny_model_dir, rows, split={"validation": 0.25, "test": 0.0},
                     train={"objective": "dpo", "max_steps": 3, "batch_size": 4, "eval_every": 3, "log_every": 1,
                            "lr": 1e-2})
    report = _prepare(recipe)
    splits = {s: [json.loads(x) for x in (recipe.run_dir("prepare") / "splits" / f"{s}.jsonl").read_text().splitlines()]
              for s in ("train", "validation")}
    prompts = {s: {r["messages"][0]["content"] for r in v} for s, v in splits.items()}
    assert prompts["train"] and prompts["validation"] and not prompts["train"] & prompts["validation"]
    assert report["splits"]["train"] + report["splits"]["validation"] == 36
    summary = train.run(recipe)
    assert summary["objective"] == "dpo" and summary["validation_reward"]["reward_accuracy"] is not None
