"""Answer-only scoring and streamed reasoning: eval's two columns read a reply the same way (reasoning apart, tool
calls parsed), tool-call exact match, reasoning streamed as reasoning_content, special tokens kept in chat replies.

Real templates and vocabularies from the llama.cpp source (test_tools_reasoning's families). The server's worker
reading replies through llama.cpp: tests/integration/test_worker_replies.py.
"""

from __future__ import annotations

import json

import pytest
from eval_fixtures import make_recipe, write_prepared
from test_templates import _llama_cpp_models
from test_tools_reasoning import FAMILIES, TOOLS, family_tokenizer

from finetune import eval_models, metrics, models
from finetune import evaluate as ft_eval
from finetune.data.render import prompt_text

HARMONY_REPLY = ("<|channel|>analysis<|message|>The date is in the text.<|end|><|start|>assistant<|channel|>final"
                 "<|message|>1962-06-06")


def _template(family: str) -> str:
    return (_llama_cpp_models() / "templates" / FAMILIES[family]["template"]).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ metrics
def test_json_equal_and_call_match():
    assert metrics.json_equal({"a": 25, "b": [1, "x"]}, {"b": [1.0, "x"], "a": 25.0})
    assert not metrics.json_equal({"a": True}, {"a": 1})  # a boolean is not a number
    assert not metrics.json_equal({"a": "25"}, {"a": 25})
    ref = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
           {"type": "function", "function": {"name": "g", "arguments": '{"y": "z"}'}}]
    assert metrics.calls_match([{"name": "g", "arguments": {"y": "z"}}, {"name": "f", "arguments": {"x": 1.0}}], ref)
    assert not metrics.calls_match([{"name": "f", "arguments": {"x": 1}}], ref)  # one call missing
    assert not metrics.calls_match([{"name": "f", "arguments": {"x": 2}}, {"name": "g", "arguments": {"y": "z"}}], ref)
    assert not metrics.calls_match([{"name": "h", "arguments": {"x": 1}}, {"name": "g", "arguments": {"y": "z"}}], ref)
    assert metrics.calls_match([], None)
    corpus, rows = metrics.score_tool_calls([[{"name": "f", "arguments": {"x": 1}}], [], []],
                                            [[ref[0]], [], [ref[1]]])
    assert [r["tool_call_match"] for r in rows] == [1.0, 1.0, 0.0]
    assert corpus == {"tool_call_match": pytest.approx(2 / 3), "tool_call_rows": 2.0}
    # exact match over the answer text sees the calls too, canonically written
    assert metrics.answer_text("", [{"name": "f", "arguments": {"x": 1.0, "a": "b"}}]) == \
        '{"arguments": {"a": "b", "x": 1}, "name": "f"}'


# --------------------------------------------------------------------------------- the columns read alike
@pytest.mark.parametrize("family, raw, answer, reasoning", [
    ("gpt-oss", HARMONY_REPLY, "1962-06-06", "The date is in the text."),
    ("qwen3", "<think>\nThe date is in the text.\n</think>\n\n2006-06-06", "2006-06-06", "The date is in the text."),
])
def test_transformers_and_gguf_columns_score_the_same_answer_text(family, raw, answer, reasoning):
    """The issue's failure: the transformers column decoded gpt-oss's reply without special tokens
    (`final1962-06-06`) while the GGUF column kept them, so exact match never scored. Now generate() keeps
    special tokens and both columns are read by read_answer."""
    tok = family_tokenizer(family)
    ids = tok(raw, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) != answer  # what the old transformers column compared
    hf_text = tok.decode(ids, skip_special_tokens=False).strip()  # what generate() returns now
    template = tok.chat_template
    hf = eval_models.read_answer({"text": hf_text, "finish_reason": "stop"}, template)
    gguf = eval_models.read_answer({"text": raw, "finish_reason": "stop"}, template)
    assert hf["text"] == gguf["text"] == answer
    assert hf["reasoning"] == gguf["reasoning"] == reasoning
    _, per_example, _ = metrics.score_generations(["exact_match"], [hf["text"], gguf["text"]], [answer, answer],
                                                  prefer_hub=False)
    assert [r["exact_match"] for r in per_example] == [1.0, 1.0]


def test_gpt_oss_generation_does_not_stop_at_the_end_of_its_analysis():
    """<|end|> closes gpt-oss's analysis message: a stop there would cut every answer off before its final channel."""
    tok = family_tokenizer("gpt-oss")

    class Config:
        eos_token_id = tok.convert_tokens_to_ids("<|return|>")

    class Model:
        generation_config = Config()

    assert tok.convert_tokens_to_ids("<|end|>") not in eval_models.stop_ids_of(Model(), tok)


def test_eval_renders_tools_and_scores_tool_calls(tmp_path, tiny_model_dir):
    """A test split with tools: prompts carry the tool definitions (as training rendered them), answers are read
    with the template's call syntax, and tool_call_match is reported next to exact match."""
    from transformers import AutoTokenizer

    template = _template("qwen2.5")
    template_file = tmp_path / "tools.jinja"
    template_file.write_text(template, encoding="utf-8")
    recipe = make_recipe(tmp_path, tiny_model_dir, model={"id": str(tiny_model_dir), "dtype": "float32", "chat_template": str(template_file)},
                         eval={"metrics": ["tool_call_match", "exact_match"], "max_new_tokens": 4, "gguf": False})
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    rows = [{"tools": TOOLS, "messages": [{"role": "user", "content": f"Weather in Oslo? {i}"},
                                          {"role": "assistant", "content": "", "tool_calls": [call]}]}
            for i in range(3)]
    tok = models.load_tokenizer(tiny_model_dir, chat_template=recipe.chat_template_path())
    assert tok.chat_template == template
    prompt = prompt_text(tok, rows[0]["messages"][:-1], tools=TOOLS)
    assert '"name": "get_weather"' in prompt and prompt.endswith("<|im_start|>assistant\n")
    own = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert "get_weather" not in prompt_text(own, rows[0]["messages"][:-1])  # its own template has no tools

    read = eval_models.read_answer({"text": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                        '</tool_call>', "finish_reason": "stop"}, template, TOOLS)
    assert read["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert read["text"] == metrics.answer_text("", [call])


def test_eval_run_reports_tool_call_match(tmp_path, tiny_model_dir):
    import shutil

    from test_eval import _log, _write_trained
    from transformers import AutoTokenizer

    template_file = tmp_path / "tools.jinja"
    template_file.write_text(_template("qwen2.5"), encoding="utf-8")
    model_dir = tmp_path / "model"  # its tokenizer carries the tool template, as train saves it beside the adapter
    shutil.copytree(tiny_model_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = template_file.read_text(encoding="utf-8")
    tok.save_pretrained(model_dir)
    recipe = make_recipe(tmp_path, model_dir, model={"id": str(model_dir), "dtype": "float32",
                                                     "chat_template": str(template_file)},
                         eval={"metrics": ["tool_call_match", "exact_match"], "max_new_tokens": 4, "gguf": False,
                               "batch_size": 4})
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    rows = [{"tools": TOOLS, "messages": [{"role": "user", "content": f"Weather in Oslo? {i}"},
                                          {"role": "assistant", "content": "", "tool_calls": [call]}]}
            for i in range(4)]
    write_prepared(recipe, model_dir, {"train": rows, "validation": rows[:1], "test": rows})
    _write_trained(recipe, model_dir, _log([3.0, 2.5, 2.0, 1.6]))
    result = ft_eval.run(recipe)
    for name in ("base", "finetuned"):
        assert result["models"][name]["tool_call_rows"] == 4.0
        assert 0.0 <= result["models"][name]["tool_call_match"] <= 1.0
    assert result["verdict"]["improved"]["metric"] == "tool_call_match"
    examples = [json.loads(line) for line in (recipe.run_dir("eval") / "examples.jsonl").read_text().splitlines()]
    assert '"name": "get_weather"' in examples[0]["prompt"]
    assert examples[0]["reference"] == metrics.answer_text("", [call])
    assert set(examples[0]["scores"]["base"]) == {"tool_call_match", "exact_match"}


# ------------------------------------------------------------------------------------------- streaming
def _stream(template: str, reply: str, prompt: str = "", step: int = 1) -> tuple[str, str]:
    from finetune.data.toolcalls import ReplyStream

    reading = ReplyStream(template, prompt)
    got = {"reasoning": "", "content": ""}
    for k in range(0, len(reply), step):
        for part, text in reading.feed(reply[k:k + step]):
            got[part] += text
            assert "<think>" not in text and "<|" not in text and "</think>" not in text, text
    for part, text in reading.finish():
        got[part] += text
    return got["reasoning"], got["content"]


@pytest.mark.parametrize("step", [1, 3, 7])
def test_streamed_reasoning_comes_apart_from_the_answer(step):
    assert _stream(_template("qwen3"), "<think>\nLet me see.\n</think>\n\nParis.", step=step) == ("Let me see.",
                                                                                                  "Paris.")
    # Qwen3.5's generation prompt opens the block: the reply starts inside it
    assert _stream(_template("qwen3.5"), "Let me see.\n</think>\n\nParis.", prompt="<|im_start|>assistant\n<think>\n",
                   step=step) == ("Let me see.", "Paris.")
    assert _stream(_template("gpt-oss"), HARMONY_REPLY, step=step) == ("The date is in the text.", "1962-06-06")
    assert _stream(_template("qwen2.5"), "No reasoning here, a < b.", step=step) == ("", "No reasoning here, a < b.")
