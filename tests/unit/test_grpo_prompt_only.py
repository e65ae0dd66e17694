"""GRPO on prompt-only rows (TRL's prompt-only datasets): prepare keeps them, and the columns their format does not
read, only for train.objective grpo; a few GRPO steps train on them on the tiny model, and the reward functions
receive those columns as keyword arguments (training, validation and eval); any other objective refuses such a
file in one line naming the file, the line and the fix."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from finetune import eval_reward, prepare, train
from finetune import recipe as recipe_mod
from finetune.data import tokenized
from finetune.errors import UserError
from finetune.training import rewards

REWARD_MODULE = '''
SEEN = []


def right_sum(prompts, completions, answer, level=None, **kwargs):
    """TRL's signature: the data's "answer" and "level" columns arrive as keyword arguments."""
    SEEN.append({"prompts": list(prompts), "answer": list(answer), "level": list(level),
                 "reference": list(kwargs["reference"])})
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]
'''


def _sum_rows(n: int, offset: int = 0, *, shape: str = "prompt") -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        a, b = i % 9 + 1, i // 9 + 2
        question = f"What is {a} plus {b}?"
        if shape == "prompt":  # TRL's conversational prompt-only row
            rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(a + b), "level": i % 3})
        elif shape == "text":  # TRL's standard prompt-only row
            rows.append({"prompt": question, "answer": str(a + b), "level": i % 3})
        else:  # a conversation ending with the user's turn
            rows.append({"messages": [{"role": "system", "content": "Answer with the number only."},
                                      {"role": "user", "content": question}], "answer": str(a + b), "level": i % 3})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp: Path, model_dir: Path, sources: list[dict], **train_section) -> Path:
    doc = {"name": "p", "seed": 7, "runs_dir": str(tmp / "runs"), "model": {"id": str(model_dir), "dtype": "float32"},
           "data": {"sources": sources, "split": {"validation": 0.2, "test": 0.0}},
           "train": train_section or {"objective": "sft"}}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _grpo(**extra) -> dict:
    return {"objective": "grpo", "rewards": [{"function": "rw_prompt_only:right_sum"},
                                             {"name": "length", "max_tokens": 3, "weight": 0.5}],
            "grpo": {"generations": 2, "max_new_tokens": 4, "eval_examples": 2}, "max_steps": 2, "batch_size": 2,
            "lr": 1e-2, "scheduler": "constant", "warmup_ratio": 0.0, "log_every": 1, "eval_every": 2,
            "save_every": 100, **extra}


def test_prompt_only_rows_train_grpo_and_the_rewards_see_their_columns(tmp_path, tiny_model_dir):
    (tmp_path / "rw_prompt_only.py").write_text(REWARD_MODULE)
    _write_jsonl(tmp_path / "prompts.jsonl", _sum_rows(16))
    _write_jsonl(tmp_path / "chats.jsonl", _sum_rows(6, 40, shape="messages"))
    _write_jsonl(tmp_path / "plain.jsonl", _sum_rows(4, 60, shape="text"))
    recipe = recipe_mod.load(_recipe(tmp_path, tiny_model_dir, [{"path": "prompts.jsonl"}, {"path": "chats.jsonl"},
                                                                {"path": "plain.jsonl"}], **_grpo()))
    report = prepare.run(recipe)
    assert [s["format"] for s in report["sources"]] == ["prompt", "messages", "prompt"]
    assert report["dropped_total"] == 0 and report["prompt_only"]["kept"] is True
    assert sum(report["prompt_only"]["rows"].values()) == 26 and report["extra_columns"] == ["answer", "level"]
    assert any("26 prompt-only rows" in n for n in report["notes"])

    out = recipe.run_dir("prepare")
    rows = [json.loads(x) for x in (out / "splits" / "train.jsonl").read_text().splitlines()]
    assert all(r["prompt_only"] and r["messages"][-1]["role"] == "user" for r in rows)
    assert {type(r["extra_columns"]["level"]) for r in rows} == {int}  # JSON values kept as they are
    ds = tokenized.load(out / "tokenized" / "train")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for row, (ids, labels), extra in zip(rows, tokenized.rows(ds), tokenized.extra_columns(ds), strict=True):
        assert (labels == -100).all() and extra == row["extra_columns"]
        text = tok.decode(ids)
        assert text.endswith("<|im_start|>assistant\n") and row["messages"][-1]["content"] in text  # generation prompt

    summary = train.run(recipe)
    assert summary["steps"] == 2 and "val_reward" in summary["validation_reward"]
    log = [json.loads(x) for x in (recipe.run_dir("train") / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e.get("reward") is not None] == [1, 2]
    seen = sys.modules["rw_prompt_only"].SEEN
    assert len(seen) >= 3  # two training steps and the validation
    for call in seen:
        assert call["reference"] == [None] * len(call["prompts"])
        for prompt, answer, level in zip(call["prompts"], call["answer"], call["level"], strict=True):
            a, b = map(int, re.search(r"What is (\d+) plus (\d+)\?", prompt).groups())
            assert answer == str(a + b) and level in (0, 1, 2)  # each completion's own row's columns


def test_prompt_only_rows_are_one_line_errors_for_objectives_that_learn_from_replies(cli, tmp_path, tiny_model_dir):
    _write_jsonl(tmp_path / "prompts.jsonl", _sum_rows(8))
    for objective in ("sft", "dpo"):
        code, out, err = cli("prepare", str(_recipe(tmp_path, tiny_model_dir, [{"path": "prompts.jsonl"}],
                                                    objective=objective)))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert "prompts.jsonl:1 is a prompt-only row" in lines[0] and f"train.objective {objective}" in lines[0]
        assert "format: prompt_completion and columns: {completion: answer}" in lines[0]
        assert "train.objective: grpo" in lines[0] and "Traceback" not in err
    code, out, err = cli("validate", str(tmp_path / "recipe.yaml"))  # validate says so before prepare runs
    assert code != 0 and "prompts.jsonl:1 is a prompt-only row" in out + err

    _write_jsonl(tmp_path / "chats.jsonl", _sum_rows(5, shape="messages"))
    code, _, err = cli("prepare", str(_recipe(tmp_path, tiny_model_dir, [{"path": "chats.jsonl"}])))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "chats.jsonl:1 is a prompt-only row (its conversation has no assistant reply, like all 5 rows" in lines[0]
    assert not (tmp_path / "runs" / "p" / "prepare" / "manifest.json").exists()


def test_a_prepared_split_is_rebuilt_when_the_objective_changes_what_it_keeps(tmp_path, tiny_model_dir):
    rows = _sum_rows(6, shape="messages") + [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
        for w in ("red", "green", "blue", "cyan", "black", "white")]
    _write_jsonl(tmp_path / "mixed.jsonl", rows)
    sft = prepare.run(recipe_mod.load(_recipe(tmp_path, tiny_model_dir, [{"path": "mixed.jsonl"}])))
    assert sft["dropped"] == {"no_assistant_turn": 6} and sft["extra_columns"] == []
    (tmp_path / "rw_prompt_only.py").write_text(REWARD_MODULE)
    grpo = prepare.run(recipe_mod.load(_recipe(tmp_path, tiny_model_dir, [{"path": "mixed.jsonl"}], **_grpo())))
    assert grpo["reused"] is False and grpo["dropped_total"] == 0 and sum(grpo["prompt_only"]["rows"].values()) == 6


def test_a_column_named_like_a_reward_argument_is_refused(tmp_path, tiny_model_dir):
    _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1 plus 2?", "reference": "3"}])
    recipe = recipe_mod.load(_recipe(tmp_path, tiny_model_dir, [{"path": "prompts.jsonl"}],
                                     objective="grpo", rewards=[{"name": "length", "max_tokens": 3}]))
    with pytest.raises(UserError, match=r"prompts.jsonl:1: column 'reference' would reach the reward functions as "
                                        r"reference=, a name they already receive"):
        prepare.run(recipe)


def test_rewards_receive_the_rows_columns_and_built_ins_keep_their_settings(tmp_path):
    name = "rw_columns_seen"
    (tmp_path / f"{name}.py").write_text("def f(prompts, completions, answer, pattern=None, **kw):\n"
                                         "    return [float(c == a) + (0.5 if p else 0.0) "
                                         "for c, a, p in zip(completions, answer, pattern)]\n")
    built = rewards.build([recipe_mod.RewardConfig(function=f"{name}:f"),
                           recipe_mod.RewardConfig(name="regex", pattern=r"\d+")], tmp_path)
    out = rewards.score(built, ["p", "p", "q"], ["7", "x", "8"], [None, None, None], [[1], [2], [3]],
                        ["row 0", "row 0", "row 1"],
                        columns=[{"answer": "7", "pattern": "y"}, {"answer": "7", "pattern": "y"}, {"answer": "9"}])
    # the user's function gets every column (None where a row lacks one); regex keeps its own pattern
    assert out.tolist() == [[1.5, 1.0], [0.5, 0.0], [0.0, 1.0]]


def test_eval_scores_prompt_only_rows_by_reward(tmp_path, capsys):
    name = "rw_eval_columns"
    (tmp_path / f"{name}.py").write_text("def f(prompts, completions, answer, **kw):\n"
                                         "    return [float(c == a) for c, a in zip(completions, answer)]\n")
    rows = [{"messages": [{"role": "user", "content": "1+2?"}], "prompt_only": True, "extra_columns": {"answer": "3"}},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
             "extra_columns": {"answer": "4"}},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
             "desirable": False}]
    examples = eval_reward.examples(rows)
    assert examples == rows[:2] and [eval_reward.has_reference(r) for r in examples] == [False, True]
    assert [len(eval_reward.prompt_messages(r)) for r in examples] == [1, 1]
    variants = {"base": {}, "finetuned": {}}
    scores: dict[str, list[dict[str, float]]] = {"base": [{}, {"exact_match": 0.0}]}
    answers = {"base": [{"text": "3", "tokens": 1}, {"text": "5", "tokens": 1}],
               "finetuned": [{"text": "3", "tokens": 1}, {"text": "4", "tokens": 1}]}
    eval_reward.score([recipe_mod.RewardConfig(function=f"{name}:f")], tmp_path, answers, ["a", "b"], [None, "4"],
                      variants, scores, columns=[r.get("extra_columns", {}) for r in examples])
    assert variants["base"]["reward"] == 0.5 and variants["finetuned"]["reward"] == 1.0
    assert scores["base"] == [{"reward": 1.0}, {"exact_match": 0.0, "reward": 0.0}]
    assert scores["finetuned"] == [{"reward": 1.0}, {"reward": 1.0}]
    assert "held-out reward" in capsys.readouterr().out


def test_the_prompt_format_is_detected_where_prepare_asks_for_it():
    from finetune import starter
    from finetune.data import formats

    rows = [{"prompt": [{"role": "user", "content": "1+2?"}], "answer": "3"}]
    assert formats.detect_format(rows, {}, source="s", where="w", prompts=True) == "prompt"
    assert formats.detect_format(rows + [{"prompt": "a", "completion": "b"}], {}, source="s", where="w",
                                 prompts=True) == "prompt_completion"
    with pytest.raises(UserError, match="cannot tell the row format"):
        formats.detect_format(rows, {}, source="s", where="w")
    # `finetune init` still reads a prompt column beside an answer-like one as prompt/completion (SFT)
    assert starter.detect(rows, "s") == ("prompt_completion", {"prompt": "prompt", "completion": "answer"})
