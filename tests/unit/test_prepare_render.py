"""render_messages: ids equal the tokenizer's own apply_chat_template; the loss mask covers exactly the trained
assistant turns (content + end-of-turn token), for templates with and without {% generation %} markers."""

from __future__ import annotations

import pytest

from finetune.data.render import IGNORE_INDEX, render_batch, render_messages

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say yes."},
    {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "Now say no, please."},
    {"role": "assistant", "content": "no thanks"},
]


@pytest.fixture(scope="module")
def chatml(embedded_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model.path)


def trained_text(tok, ids, labels) -> str:
    """The trained tokens decoded, with a '|' between separate trained runs."""
    runs, current = [], []
    for i, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
                current = []
        else:
            assert label == i
            current.append(i)
    if current:
        runs.append(current)
    return "|".join(tok.decode(r) for r in runs)


def test_chatml_ids_match_apply_chat_template_and_mask_assistant_turns(chatml):
    ids, labels = render_messages(chatml, CONV)
    assert ids == chatml.apply_chat_template(CONV, tokenize=True)["input_ids"]
    # Both replies with their <|im_end|>; the user's "yes" inside "Say yes." and all headers stay masked.
    assert trained_text(chatml, ids, labels) == "yes<|im_end|>|no thanks<|im_end|>"
    assert "\n" not in trained_text(chatml, ids, labels)


def test_chatml_template_without_system_injects_default_and_still_masks(chatml):
    conv = CONV[1:3]
    ids, labels = render_messages(chatml, conv)
    assert ids == chatml.apply_chat_template(conv, tokenize=True)["input_ids"]
    assert "SmolLM" in chatml.decode(ids)  # the template's own default system prompt is there, and masked
    assert trained_text(chatml, ids, labels) == "yes<|im_end|>"


@pytest.mark.parametrize(
    ("train_on", "expected"),
    [
        ("assistant", "yes<|im_end|>|no thanks<|im_end|>"),
        ("last_assistant", "no thanks<|im_end|>"),
        ("completion", "no thanks<|im_end|>\n"),
    ],
)
def test_train_on_modes(chatml, train_on, expected):
    ids, labels = render_messages(chatml, CONV, train_on=train_on)
    assert ids == chatml.apply_chat_template(CONV, tokenize=True)["input_ids"]
    assert trained_text(chatml, ids, labels) == expected


def test_train_on_all_and_truncation(chatml):
    ids, labels = render_messages(chatml, CONV, train_on="all")
    assert labels == ids
    short_ids, short_labels = render_messages(chatml, CONV, max_tokens=10)
    assert short_ids == ids[:10] and len(short_labels) == 10
    with pytest.raises(ValueError, match="train_on"):
        render_messages(chatml, CONV, train_on="everything")


def test_batch_equals_single(chatml):
    convs = [CONV, CONV[1:3], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]]
    assert render_batch(chatml, convs) == [render_messages(chatml, c) for c in convs]


def test_mask_equals_generation_markers_when_a_template_has_them(chatml):
    """Where a template does mark replies with {% generation %}, our prefix-derived mask agrees with it."""
    marked = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
        "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    chatml.chat_template, original = marked, chatml.chat_template
    try:
        ref = chatml.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, labels = render_messages(chatml, CONV)
    finally:
        chatml.chat_template = original
    assert ids == ref["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in labels] == ref["assistant_masks"]


def test_template_that_moves_the_system_prompt(tmp_path):
    """Mistral Nemo's real template (no generation markers) puts the system prompt into the LAST user turn, so
    earlier prefixes are not prefixes of the full text: the reply must be located another way."""
    from finetune.gguf import sdist

    try:
        root = sdist.llama_cpp_dir(download=False)
    except Exception as exc:  # llama-cpp-python not installed
        pytest.skip(f"llama.cpp source not available: {exc}")
    if root is None or not (root / "models" / "ggml-vocab-llama-spm.gguf").exists():
        pytest.skip("llama.cpp sdist (vocab GGUFs, templates) not in the cache; run scripts/install_llama_cpp.py")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(root / "models"), gguf_file="ggml-vocab-llama-spm.gguf")
    tok.chat_template = (root / "models" / "templates" / "mistralai-Mistral-Nemo-Instruct-2407.jinja").read_text()
    assert "generation" not in tok.chat_template
    ids, labels = render_messages(tok, CONV)
    assert ids == tok.apply_chat_template(CONV, tokenize=True)["input_ids"]
    assert trained_text(tok, ids, labels) == "yes</s>|no thanks</s>"
    ids, labels = render_messages(tok, CONV, train_on="last_assistant")
    assert trained_text(tok, ids, labels) == "no thanks</s>"
