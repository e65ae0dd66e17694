"""The llama.cpp worker of chat and serve (finetune.gguf.worker, on the embedded GGUF) reads replies as eval does:
special tokens kept in chat replies, reasoning streamed apart from the answer, stop strings, and the terminal chat's
worker taking the recipe's reasoning setting. The in-process reading of replies: tests/unit/test_answer_only.py."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def generator():
    from finetune.gguf.worker import Generator
    from finetune.models import embedded_gguf_path

    return Generator(str(embedded_gguf_path()), n_ctx=512, threads=2)


def test_chat_replies_keep_special_tokens(generator):
    """llama.cpp's completion loop drops control tokens from the text; chat replies keep them (gpt-oss's channels
    and Mistral's [TOOL_CALLS] are control tokens). Forced here with logit_bias on the embedded model's
    <|im_start|>, which is not an end-of-generation token."""
    start = generator.llm.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert len(start) == 1
    events = []
    generator.generate({"id": "k", "mode": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                        "temperature": 0, "logit_bias": {str(start[0]): 100.0}}, events.append, lambda: False)
    done = events[-1][2]
    assert done["text"] == "<|im_start|><|im_start|>" and done["completion_tokens"] == 2
    events = []
    generator.generate({"id": "c", "mode": "completion", "prompt": "Hi", "max_tokens": 2, "temperature": 0,
                        "logit_bias": {str(start[0]): 100.0}}, events.append, lambda: False)
    assert events[-1][2]["text"] == ""  # raw completions keep llama.cpp's plain text


def test_worker_streams_reasoning_apart_and_stops_on_stop_strings():
    """A generation prompt that opens a think block (as Qwen3.5's does): every streamed piece is reasoning, the
    final message has it as reasoning_content, and nothing of it leaks into content deltas."""
    from finetune.gguf.worker import Generator
    from finetune.models import embedded_gguf_path

    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    generator = Generator(str(embedded_gguf_path()), n_ctx=512, threads=2, chat_template=template)
    events = []
    generator.generate({"id": "r", "mode": "chat", "messages": [{"role": "user", "content": "What is 2+2?"}],
                        "max_tokens": 12, "temperature": 0}, events.append, lambda: False)
    kinds = [e[0] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "reasoning" in kinds and "delta" not in kinds, kinds
    done = events[-1][2]
    streamed = "".join(e[2] for e in events if e[0] == "reasoning")
    assert done["message"]["reasoning_content"] == streamed.strip() and done["message"]["content"] == ""
    # a stop string ends the reply before it, on the same text
    words = done["text"].split()
    events = []
    generator.generate({"id": "s", "mode": "chat", "messages": [{"role": "user", "content": "What is 2+2?"}],
                        "max_tokens": 12, "temperature": 0, "stop": [words[1]]}, events.append, lambda: False)
    assert events[-1][2]["finish_reason"] == "stop"
    assert events[-1][2]["text"] == done["text"][:done["text"].index(words[1])]


def test_terminal_chat_worker_takes_the_recipes_reasoning_setting(tmp_path):
    """`finetune chat RECIPE` renders as training did: its worker gets data.reasoning (here drop, not the default)."""
    from finetune import recipe as recipe_mod
    from finetune.chat import LocalBackend
    from finetune.models import embedded_gguf_path
    from finetune.serve_target import Target

    r = recipe_mod.validate_dict({"name": "chatreasoning", "runs_dir": str(tmp_path), "data": {"reasoning": "drop"}},
                                 base_dir=tmp_path)
    backend = LocalBackend(Target(embedded_gguf_path(), "m", r.serve, tmp_path / "store", r, None))
    try:
        assert backend.worker.options["reasoning"] == "drop"
        reply = "".join(backend.stream([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=4))
        assert isinstance(reply, str) and backend.finish_reason in ("stop", "length")
    finally:
        backend.close()
