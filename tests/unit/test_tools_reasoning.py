"""Tool calls and reasoning: data validation, rendering and masking through each family's real chat template,
and reading the replies back (tool calls to the same JSON, reasoning apart from the answer).

Real templates and vocabularies from the llama.cpp source, as in test_templates.py. Stand-ins where llama.cpp has
no vocabulary of the family (the template is always the family's own):
  smollm3     ggml-vocab-llama-bpe (SmolLM3's vocabulary is Llama 3's) with <|im_start|>/<|im_end|> added
  ministral3  ggml-vocab-llama-spm with the Mistral control tokens the template writes added
  mistral3.2  the same, for Mistral Small 3.2 (tool-call ids must be 9 characters: its template checks)
  gpt-oss     ggml-vocab-qwen2 with the harmony tokens added (o200k_harmony is not in llama.cpp's models)
"""

from __future__ import annotations

import copy
import json

import pytest
from test_templates import IGNORE, _llama_cpp_models, load_tokenizer, spans

MISTRAL_TOKENS = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]",
                  "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[TOOL_CONTENT]", "[/TOOL_RESULTS]",
                  "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
FAMILIES = {
    "qwen2.5": dict(gguf="ggml-vocab-qwen2.gguf", template="Qwen-Qwen2.5-7B-Instruct.jinja", syntax="hermes"),
    "qwen3": dict(gguf="ggml-vocab-qwen2.gguf", template="Qwen-Qwen3-0.6B.jinja", syntax="hermes", thinks=True),
    "qwen3.5": dict(gguf="ggml-vocab-qwen35.gguf", template="Qwen3.5-4B.jinja", syntax="xml", thinks=True),
    "llama3.1": dict(gguf="ggml-vocab-llama-bpe.gguf", template="meta-llama-Llama-3.1-8B-Instruct.jinja",
                     syntax="llama3"),
    "ministral3": dict(gguf="ggml-vocab-llama-spm.gguf", template="mistralai-Ministral-3-14B-Reasoning-2512.jinja",
                       syntax="mistral", add=MISTRAL_TOKENS, thinks=True),
    "mistral3.2": dict(gguf="ggml-vocab-llama-spm.gguf", template="Mistral-Small-3.2-24B-Instruct-2506.jinja",
                       syntax="mistral", add=MISTRAL_TOKENS),
    "smollm3": dict(gguf="ggml-vocab-llama-bpe.gguf", template="HuggingFaceTB-SmolLM3-3B.jinja", syntax=None,
                    add=["<|im_start|>", "<|im_end|>"], thinks=True),
    "gpt-oss": dict(gguf="ggml-vocab-qwen2.gguf", template="openai-gpt-oss-120b.jinja", syntax="harmony",
                    add=["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>",
                         "<|constrain|>"], thinks=True),
}
TOOL_FAMILIES = [f for f, spec in FAMILIES.items() if spec["syntax"]]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
CALL = {"id": "call00001", "type": "function", "function": {"name": "get_weather",
                                                            "arguments": {"city": "Paris", "days": 2}}}
CONVERSATION = [
    {"role": "system", "content": "You are a helper. SYSTEM-MARK"},
    {"role": "user", "content": "Weather in Paris? USER-ONE"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool. THINK-ONE", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "sunny TOOL-RESULT"},
    {"role": "assistant", "content": "It is sunny. REPLY-TWO", "reasoning_content": "Tool says sunny. THINK-TWO"},
]
_TOKENIZERS: dict[str, object] = {}


def family_tokenizer(name: str):
    if name not in _TOKENIZERS:
        from tokenizers import AddedToken

        spec = FAMILIES[name]
        tok = copy.deepcopy(load_tokenizer(spec["gguf"]))
        if spec.get("add"):
            tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in spec["add"]], special_tokens=True)
        tok.chat_template = (_llama_cpp_models() / "templates" / spec["template"]).read_text(encoding="utf-8")
        _TOKENIZERS[name] = tok
    return _TOKENIZERS[name]


def trained_texts(tok, ids, labels) -> list[str]:
    return [tok.decode(ids[a:b], skip_special_tokens=False) for a, b in spans(labels)]


# ------------------------------------------------------------------------------------------------ data
def _example(messages, tools=None):
    from collections import Counter

    from finetune.data import formats

    rec = {"messages": messages, **({"tools": tools} if tools is not None else {})}
    return formats.to_example(rec, "messages", {}), Counter()


def test_tool_conversation_is_read_with_arguments_parsed_and_reasoning_split():
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "<think>\nIt said sunny.\n</think>\n\nSunny."}]
    ex, _ = _example(msgs, json.dumps(TOOLS))  # tools as JSON text, as Hub datasets often store them
    assert ex["tools"] == TOOLS
    assert ex["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert ex["messages"][1]["content"] == ""
    assert ex["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    assert ex["messages"][3]["content"] == "Sunny." and ex["messages"][3]["reasoning_content"] == "It said sunny."

    from finetune.data.clean import clean_example, dedupe_text

    cleaned, _ = clean_example(ex, unicode=True, whitespace=True, require_assistant_last=True, system_prompt=None)
    assert cleaned["tools"] == TOOLS and cleaned["messages"][1]["tool_calls"]
    assert "get_weather" in dedupe_text(cleaned) and "It said sunny." in dedupe_text(cleaned)


@pytest.mark.parametrize("messages, tools, reason, field", [
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}],
     TOOLS, "bad_tool_arguments", "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "get_weather", "arguments": {}}}]},
      {"role": "tool", "tool_call_id": "b", "content": "x"}, {"role": "assistant", "content": "done"}],
     TOOLS, "unmatched_tool_result", "messages[2].tool_call_id 'b'"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}],
     None, "unmatched_tool_result", "messages[1]"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "tool_calls": [{"function": {"name": "get_wether", "arguments": {}}}]}],
     TOOLS, "unknown_tool", "calls 'get_wether'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>never closed"}],
     None, "bad_reasoning", "messages[1].content opens <think>"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     "[{bad json", "bad_tools", "field 'tools' is not valid JSON"),
])
def test_malformed_agent_rows_name_the_field(messages, tools, reason, field):
    from finetune.data.formats import RowError

    with pytest.raises(RowError) as err:
        _example(messages, tools)
    assert err.value.reason == reason
    assert field in err.value.detail, err.value.detail


def test_prepare_counts_agent_row_errors_in_its_report(tmp_path):
    """Field-level errors drop the row under their reason, counted in report.json with the row's file:line."""
    from finetune import prepare, recipe

    good = {"messages": [{"role": "user", "content": "Weather in city {i}?"},
                         {"role": "assistant", "tool_calls": [{"id": "c1", "function": {
                             "name": "get_weather", "arguments": {"city": "C{i}"}}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "sunny {i}"},
                         {"role": "assistant", "content": "It is sunny in city number {i} today."}],
            "tools": TOOLS}
    rows = [json.loads(json.dumps(good).replace("{i}", str(i))) for i in range(8)]
    for i, row in enumerate(rows):
        for m in row["messages"]:
            if m["role"] != "tool" and m.get("content"):
                m["content"] = m["content"].replace("city", f"city {i} " + "abcdefgh"[i] * (i + 1))
    rows[1]["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"city": '
    rows[2]["messages"][2]["tool_call_id"] = "zz"
    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text("name: tools\ndata:\n  sources:\n    - path: tools.jsonl\n"
                                     "  split: {validation: 0.0, test: 0.0}\n  clean: {near_dedupe: false}\n")
    r = recipe.load(tmp_path / "r.yaml", overrides=[f"runs_dir={tmp_path / 'runs'}"])
    # prepare's own build, with Qwen2.5's real tokenizer and template (the embedded model's template has no tools)
    report = prepare.build(r, family_tokenizer("qwen2.5"), tmp_path / "out")
    assert report["dropped"]["bad_tool_arguments"] == 1 and report["dropped"]["unmatched_tool_result"] == 1
    assert report["samples"]["bad_tool_arguments"][0]["origin"] == "tools.jsonl:2"
    assert "messages[1].tool_calls[0].function.arguments" in report["samples"]["bad_tool_arguments"][0]["detail"]
    assert report["splits"]["train"] == 6


# ------------------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_tool_conversation_renders_like_the_template_and_trains_only_the_assistant(name):
    from finetune.data.render import render_messages

    tok = family_tokenizer(name)
    ids, labels = render_messages(tok, CONVERSATION, tools=TOOLS, reasoning="auto")
    from finetune.data.render import template_messages

    expected = tok.apply_chat_template(template_messages(CONVERSATION, tok.chat_template), tools=TOOLS,
                                       tokenize=True)
    assert ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    trained = trained_texts(tok, ids, labels)
    assert len(trained) == 2, trained
    call_turn, answer_turn = trained
    assert "get_weather" in call_turn and "Paris" in call_turn, call_turn
    assert "REPLY-TWO" in answer_turn
    for marker in ("SYSTEM-MARK", "USER-ONE", "TOOL-RESULT", "Weather of a city"):
        assert all(marker not in t for t in trained), (name, marker, trained)
    from finetune.data.render import END_OF_TURN_TOKENS

    for a, b in spans(labels):  # each trained span closes with the template's end-of-turn token
        assert tok.convert_ids_to_tokens(ids[b - 1]) in END_OF_TURN_TOKENS, (name, tok.decode(ids[a:b]))
    if FAMILIES[name].get("thinks"):  # the final answer's reasoning is trained with it
        assert "THINK-TWO" in answer_turn, (name, answer_turn)


@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_trained_tool_call_parses_back_to_the_same_json(name):
    from finetune.data.render import render_messages
    from finetune.data.toolcalls import parse_reply, tool_syntax

    tok = family_tokenizer(name)
    assert tool_syntax(tok.chat_template) == FAMILIES[name]["syntax"]
    ids, labels = render_messages(tok, CONVERSATION, tools=TOOLS)
    (a, b), (c, d) = spans(labels)
    reply = parse_reply(tok.decode(ids[a:b], skip_special_tokens=False), tok.chat_template, tools=TOOLS)
    assert reply.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}], reply
    assert reply.unparsed is None
    assert json.loads(reply.openai_tool_calls()[0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    answer = parse_reply(tok.decode(ids[c:d], skip_special_tokens=False), tok.chat_template, tools=TOOLS,
                         end_tokens=(tok.convert_ids_to_tokens(ids[d - 1]),))
    assert answer.tool_calls == [] and answer.content == "It is sunny. REPLY-TWO", answer
    if FAMILIES[name].get("thinks"):
        assert answer.reasoning == "Tool says sunny. THINK-TWO", answer


def test_smollm3_template_has_no_place_for_tool_calls():
    """SmolLM3's template renders only an assistant turn's content: a row with tool_calls is refused by name
    (prepare drops it as template_error) instead of training a turn whose call vanished."""
    from finetune.data.render import RenderError, render_messages

    with pytest.raises(RenderError, match="tool call 'get_weather' does not appear"):
        render_messages(family_tokenizer("smollm3"), CONVERSATION, tools=TOOLS)


@pytest.mark.parametrize("name", ["qwen3", "qwen3.5", "smollm3", "gpt-oss", "ministral3"])
def test_reasoning_drop_removes_it_and_keep_trains_it(name):
    from finetune.data.render import render_messages

    tok = family_tokenizer(name)
    conv = [CONVERSATION[1], {"role": "assistant", "content": "It is sunny. REPLY-TWO",
                              "reasoning_content": "Probably sunny. THINK-TWO"}]
    ids, labels = render_messages(tok, conv, reasoning="keep")
    (trained,) = trained_texts(tok, ids, labels)
    assert "THINK-TWO" in trained and "REPLY-TWO" in trained
    ids, labels = render_messages(tok, conv, reasoning="drop")
    assert "THINK-TWO" not in tok.decode(ids, skip_special_tokens=False)
    assert "REPLY-TWO" in trained_texts(tok, ids, labels)[0]


def test_a_template_without_reasoning_drops_it_under_auto_and_inlines_it_under_keep():
    from finetune.data.render import render_messages

    tok = family_tokenizer("qwen2.5")
    conv = [CONVERSATION[1], {"role": "assistant", "content": "A. REPLY", "reasoning_content": "THINK-X"}]
    assert "THINK-X" not in tok.decode(render_messages(tok, conv)[0])
    ids, labels = render_messages(tok, conv, reasoning="keep")
    assert "<think>\nTHINK-X\n</think>" in trained_texts(tok, ids, labels)[0]


@pytest.mark.parametrize("name", ["qwen3", "qwen3.5", "smollm3"])
def test_answer_without_reasoning_trains_and_serves_the_same_turn_boundary(name):
    """With thinking switched off, the prompt of the trained example ends with exactly the tokens the server's
    prompt ends with (the template's empty think block is prompt in both), and no think block is trained."""
    from finetune.data.render import prompt_text, render_messages, template_kwargs

    tok = family_tokenizer(name)
    conv = [CONVERSATION[1], {"role": "assistant", "content": "It is sunny. REPLY-TWO",
                              "reasoning_content": "THINK-TWO"}]
    ids, labels = render_messages(tok, conv, reasoning="answer_without")
    (a, b), = spans(labels)
    assert "<think>" not in tok.decode(ids[a:b], skip_special_tokens=False)
    assert "THINK-TWO" not in tok.decode(ids, skip_special_tokens=False)
    served = prompt_text(tok, conv, reasoning="answer_without")
    assert tok(served, add_special_tokens=False)["input_ids"] == ids[:a]
    assert served.rstrip().endswith("</think>")  # the switch is on: the prompt holds the closed, empty think block
    # serve renders with the same variables (finetune/gguf/worker.py passes template_kwargs to the GGUF's template)
    assert template_kwargs(tok.chat_template, "answer_without") == {"enable_thinking": False}
    # and with reasoning left to the template, the served prompt opens no empty block
    assert not prompt_text(tok, conv, reasoning="auto").rstrip().endswith("</think>")


def test_answer_without_needs_a_thinking_switch():
    from finetune.data.render import RenderError, render_messages

    with pytest.raises(RenderError, match="no thinking switch"):
        render_messages(family_tokenizer("llama3.1"), CONVERSATION[1:2] + [{"role": "assistant", "content": "x"}],
                        reasoning="answer_without")


# ---------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, template_family, content, reasoning, calls", [
    ("<think>\nhm\n</think>\n\nParis.<|im_end|>", "qwen3", "Paris.", "hm", []),
    ("hm\n</think>\n\nParis.", "qwen3.5", "Paris.", "hm", []),  # the prompt opened <think>
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', "qwen2.5", "", None,
     [{"name": "get_weather", "arguments": {"city": "Oslo"}}]),
    ("<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>1962-06-06<|return|>",
     "gpt-oss", "1962-06-06", "think", []),
    ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>',
     "gpt-oss", "", None, [{"name": "get_weather", "arguments": {"city": "Oslo"}}]),
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]', "mistral3.2", "", None,
     [{"name": "get_weather", "arguments": {"city": "Oslo"}}]),
    ("Paris is the capital.", "llama3.1", "Paris is the capital.", None, []),
])
def test_parse_replies_the_models_write(text, template_family, content, reasoning, calls):
    from finetune.data.toolcalls import parse_reply

    template = (_llama_cpp_models() / "templates" / FAMILIES[template_family]["template"]).read_text()
    reply = parse_reply(text, template, end_tokens=("<|im_end|>",))
    assert (reply.content, reply.reasoning, reply.tool_calls) == (content, reasoning, calls)


def test_a_call_with_broken_arguments_is_reported_not_returned():
    from finetune.data.toolcalls import parse_reply

    template = (_llama_cpp_models() / "templates" / FAMILIES["qwen2.5"]["template"]).read_text()
    reply = parse_reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', template)
    assert reply.tool_calls == [] and reply.unparsed is not None


def test_masks_never_train_tool_results_in_multi_call_turns():
    from finetune.data.render import render_messages

    tok = family_tokenizer("qwen3")
    second = {"id": "call00002", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": {"city": "Rome"}}}
    conv = CONVERSATION[:2] + [{"role": "assistant", "content": "", "tool_calls": [CALL, second]},
                               {"role": "tool", "tool_call_id": "call00001", "content": "sunny TOOL-A"},
                               {"role": "tool", "tool_call_id": "call00002", "content": "rain TOOL-B"},
                               {"role": "assistant", "content": "Paris sunny, Rome rain. REPLY"}]
    ids, labels = render_messages(tok, conv, tools=TOOLS)
    expected = tok.apply_chat_template(conv, tools=TOOLS, tokenize=True)
    assert ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    trained = trained_texts(tok, ids, labels)
    assert len(trained) == 2 and "Rome" in trained[0] and "Paris" in trained[0]
    masked = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE])
    assert "TOOL-A" in masked and "TOOL-B" in masked and all("TOOL-" not in t for t in trained)
