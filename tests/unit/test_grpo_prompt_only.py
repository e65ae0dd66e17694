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


EVAL_REWARD_MODULE = '''
SEEN = []


def right_sum(prompts, completions, answer, **kwargs):
    """The rows' "answer" column, as in training; None (no opinion) on a row without one."""
    SEEN.append({"prompts": list(prompts), "answer": list(answer), "reference": list(kwargs["reference"])})
    return [None if a is None else float(c.strip() == str(a)) for c, a in zip(completions, answer)]
'''


def test_eval_of_a_grpo_run_answers_prompt_only_rows_and_scores_them_by_reward(tmp_path, tiny_model_dir):
    """prepare -> train (2 GRPO steps) -> eval on prompt-only rows, with a few rows that have a reply in the test
    split: every model's answers are scored by the rewards (the rows' columns passed), the reference metrics count
    only the rows with a reference, and the report says so."""
    from finetune import evaluate, verdict

    (tmp_path / "rw_eval_prompt_only.py").write_text(EVAL_REWARD_MODULE)
    _write_jsonl(tmp_path / "prompts.jsonl", _sum_rows(16))
    _write_jsonl(tmp_path / "test_prompts.jsonl", _sum_rows(4, 30))
    _write_jsonl(tmp_path / "test_chats.jsonl", [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
        for w in ("red", "green", "blue")])
    sources = [{"path": "prompts.jsonl"}, {"path": "test_prompts.jsonl", "role": "test"},
               {"path": "test_chats.jsonl", "role": "test"}]
    path = _recipe(tmp_path, tiny_model_dir, sources,
                   **_grpo(rewards=[{"function": "rw_eval_prompt_only:right_sum"},
                                    {"name": "length", "max_tokens": 3, "weight": 0.5}]))
    doc = yaml.safe_load(path.read_text())
    doc["eval"] = {"metrics": ["loss", "exact_match"], "gguf": False, "forgetting": False, "max_new_tokens": 4,
                   "batch_size": 4}
    path.write_text(yaml.safe_dump(doc))
    recipe = recipe_mod.load(path)
    prepare.run(recipe)
    assert train.run(recipe)["steps"] == 2
    seen = sys.modules["rw_eval_prompt_only"].SEEN
    seen.clear()

    result = evaluate.run(recipe)
    assert result["examples"] == 7 and result["examples_with_reference"] == 3
    for name in ("base", "finetuned"):
        model = result["models"][name]
        assert isinstance(model["reward"], float) and "reward/rw_eval_prompt_only:right_sum" in model and "reward/length" in model
        assert "exact_match" in model and model["loss_tokens"] > 0  # the loss: the three rows with a reply
    assert result["rules"] == verdict.rules(True) and result["verdict"]["improved"]["metric"] == "reward"
    assert result["verdict"]["improved"]["n"] == 7

    out = recipe.run_dir("eval")
    rows = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    with_reference = [r for r in rows if r["reference"] is not None]
    assert len(with_reference) == 3 and {r["reference"] for r in with_reference} == {"red", "green", "blue"}
    for name in ("base", "finetuned"):
        # exact match over the rows with a reference only; every row has its reward
        matches = [r["scores"][name]["exact_match"] for r in with_reference]
        assert result["models"][name]["exact_match"] == pytest.approx(sum(matches) / 3)
        assert all("exact_match" not in r["scores"][name] for r in rows if r["reference"] is None)
        assert all("reward" in r["scores"][name] for r in rows)
    for r in rows:  # a prompt-only row's prompt is its whole conversation
        assert r["messages"][-1]["role"] == "user" and r["messages"][-1]["content"] in r["prompt"]

    # the rows' columns reached the reward function: each prompt-only row's own answer, None on the rows without
    assert len(seen) == 2  # base and fine-tuned, all rows at once
    for call in seen:
        for prompt, answer, reference in zip(call["prompts"], call["answer"], call["reference"], strict=True):
            if found := re.search(r"What is (\d+) plus (\d+)\?", prompt):
                assert answer == str(sum(map(int, found.groups()))) and reference is None
            else:
                assert answer is None and reference in ("red", "green", "blue")

    html = (out / "report.html").read_text()
    assert "(none: a prompt-only row, scored by train.rewards)" in html
    assert "held-out reward (train.rewards)" in html and "count the other 3" in html
    assert verdict.REWARD_RULES["overfitting"] in html and verdict.VERDICT_RULES["overfitting"] not in html

    # without a generation metric the models still answer, and the reward is measured
    doc["eval"]["metrics"] = ["loss"]
    path.write_text(yaml.safe_dump(doc))
    again = evaluate.run(recipe_mod.load(path))
    assert all(isinstance(again["models"][n]["reward"], float) for n in ("base", "finetuned"))
    assert "exact_match" not in again["models"]["finetuned"] and again["verdict"]["improved"]["metric"] == "reward"


def test_reference_metrics_count_only_the_rows_with_a_reference():
    from finetune import evaluate

    answers = {"base": [{"text": t, "tool_calls": [], "finish_reason": "stop"} for t in ("3", "4", "x", "6")]}
    variants = {"base": {}}
    scores, _ = evaluate._score_answers(answers, [None, "4", "5", None], [[], [], [], []],
                                        ["exact_match", "tool_call_match"], variants, hub_metrics=False)
    assert variants["base"]["exact_match"] == 0.5 and variants["base"]["tool_call_match"] == 1.0  # of 2 rows, not 4
    assert [sorted(s) for s in scores["base"]] == [[], ["exact_match", "tool_call_match"],
                                                   ["exact_match", "tool_call_match"], []]


def test_the_gguf_column_of_a_grpo_run_answers_without_a_generation_metric(tmp_path, monkeypatch):
    """A GRPO run's GGUF answers are scored by its rewards, so the column answers when eval.metrics names no
    generation metric; for the other objectives it is still left out then."""
    from types import SimpleNamespace

    from finetune import eval_models, evaluate
    from finetune.recipe.output_sections import EvalConfig

    gguf = tmp_path / "model-Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    exported = SimpleNamespace(gguf={"Q8_0": str(gguf)}, gguf_to_serve=lambda asked=None: "Q8_0")
    recipe = SimpleNamespace(serve=SimpleNamespace(n_ctx=512, model_fields_set=set()), seed=0,
                             data=SimpleNamespace(reasoning="off"))
    asked = []
    monkeypatch.setattr(eval_models, "gguf_processes", lambda path, n: 1)
    monkeypatch.setattr(eval_models, "gguf_generate", lambda path, examples, **kw: asked.append(examples) or (
        [{"text": "3", "finish_reason": "stop"} for _ in examples], ""))
    examples = [{"messages": [{"role": "user", "content": "1+2?"}], "prompt_only": True}]
    cfg = EvalConfig(metrics=["loss"])

    answers, variants = {}, {}
    status = evaluate._gguf_column(recipe, exported, examples, answers, variants, [], cfg, template="",
                                   by_reward=True)
    assert status["status"] == "scored" and answers["gguf-Q8_0"][0]["text"] == "3" and asked == [examples]
    status = evaluate._gguf_column(recipe, exported, examples, {}, {}, [], cfg, template="")
    assert status["status"] == "absent" and "no generation metric" in status["reason"]
