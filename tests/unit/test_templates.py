"""Chat templates of the shipped recipes' model families: rendering and assistant-only masking.

Real tokenizers and real templates, no weights: the vocab-only GGUFs and ``models/templates/*.jinja`` of the
llama.cpp source that finetune already keeps (``finetune.gguf.sdist.llama_cpp_dir()``); nothing is copied into
this repository. Each tokenizer is first checked against llama.cpp's own tokenization test vectors
(``.gguf.inp``/``.gguf.out``), so "real" means "tokenizes like llama.cpp does".

Families and what stands in where llama.cpp has no exact file:
  llama3   ggml-vocab-llama-bpe (the Llama 3 vocab) + Llama 3.1 and 3.2 templates
  chatml   ggml-vocab-qwen2 + Qwen2.5 template; Qwen3 template (its <think> markers are plain text in this vocab)
  phi3     ggml-vocab-phi-3 + Phi-3.5-mini template
  mistral  ggml-vocab-llama-spm (the 32k SentencePiece vocab Mistral 7B v0.3 extends) with its [INST]/[/INST]
           control tokens added, + the Mistral Nemo template (same [INST] format as v0.3; the v0.3 template
           itself is not in llama.cpp's templates)
  gemma    ggml-vocab-llama-spm with <start_of_turn>/<end_of_turn> added + the real Gemma 2 template (the only
           Gemma vocab in llama.cpp is Gemma 4's, whose turn tokens differ and which transformers cannot load)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

IGNORE = -100

FAMILIES = {
    "llama3.1": dict(gguf="ggml-vocab-llama-bpe.gguf", template="meta-llama-Llama-3.1-8B-Instruct.jinja",
                     eot="<|eot_id|>", system=True),
    "llama3.2": dict(gguf="ggml-vocab-llama-bpe.gguf", template="meta-llama-Llama-3.2-3B-Instruct.jinja",
                     eot="<|eot_id|>", system=True),
    "qwen2.5": dict(gguf="ggml-vocab-qwen2.gguf", template="Qwen-Qwen2.5-7B-Instruct.jinja", eot="<|im_end|>",
                    system=True),
    "qwen3": dict(gguf="ggml-vocab-qwen2.gguf", template="Qwen-Qwen3-0.6B.jinja", eot="<|im_end|>", system=True,
                  reply_prefix="<think>\n\n</think>"),
    # Qwen3.5: its own pre-tokenizer and template (ChatML turns; the generation prompt opens the thinking block).
    # Tested as its recipes train it: thinking switched off (data.reasoning answer_without), the prompt closing an
    # empty block.
    "qwen3.5": dict(gguf="ggml-vocab-qwen35.gguf", template="Qwen3.5-4B.jinja", eot="<|im_end|>", system=True,
                    reasoning="answer_without"),
    "phi3.5": dict(gguf="ggml-vocab-phi-3.gguf", template="microsoft-Phi-3.5-mini-instruct.jinja", eot="<|end|>",
                   system=True),
    "mistral": dict(gguf="ggml-vocab-llama-spm.gguf", template="mistralai-Mistral-Nemo-Instruct-2407.jinja",
                    eot="</s>", system=True, add_special=["[INST]", "[/INST]"], drops_system=True),
    "gemma2": dict(gguf="ggml-vocab-llama-spm.gguf", template="google-gemma-2-2b-it.jinja", eot="<end_of_turn>",
                   system=False, add_special=["<start_of_turn>", "<end_of_turn>"]),
    # Gemma 4: its own vocabulary, which transformers' GGUF loader cannot read: the tokenizer of the twin factory
    # (scripts/twins.py reads it into the tokenizer.json a Gemma 4 checkpoint ships) with the 31B-it template, which
    # the small instruct models share
    "gemma4": dict(twin="gemma4", template="google-gemma-4-31B-it.jinja", eot="<turn|>", system=True),
    # SmolLM3: Llama 3's vocabulary with ChatML's turn tokens added, its own template (reasoning switch, default
    # system block)
    "smollm3": dict(gguf="ggml-vocab-llama-bpe.gguf", template="HuggingFaceTB-SmolLM3-3B.jinja", eot="<|im_end|>",
                    system=True, add_special=["<|im_start|>", "<|im_end|>"]),
}

# Which family each shipped recipe's model belongs to (by Hub id prefix); a new recipe must be covered here.
RECIPE_FAMILY_PREFIXES = {
    "meta-llama/Llama-3": "llama3.1", "Qwen/Qwen2.5": "qwen2.5", "Qwen/Qwen3.5": "qwen3.5", "Qwen/Qwen3-": "qwen3",
    "microsoft/Phi-3": "phi3.5",
    "mistralai/Mistral-7B": "mistral", "google/gemma-2": "gemma2", "HuggingFaceTB/SmolLM2": "qwen2.5",  # ChatML
    "smollm2-135m-instruct": "qwen2.5",  # ChatML (the embedded model; its own tokenizer is tested by prepare's tests)
    "HuggingFaceTB/SmolLM3": "smollm3", "google/gemma-4": "gemma4",
}

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant. SYSTEM-MARK"},
    {"role": "user", "content": "What is 2 + 2? USER-ONE"},
    {"role": "assistant", "content": "It is 4. REPLY-ONE"},
    {"role": "user", "content": "And 3 + 3, spelled out? USER-TWO"},
    {"role": "assistant", "content": "Six, which is 3 + 3. REPLY-TWO"},
]


def _llama_cpp_models() -> Path:
    from finetune.gguf import sdist

    try:
        root = sdist.llama_cpp_dir(download=False)
    except Exception as exc:  # llama-cpp-python not installed at all
        pytest.skip(f"llama.cpp source not available ({exc}); `make install` keeps it")
    if root is None or not (root / "models" / "templates").is_dir():
        pytest.skip("llama.cpp source cache (vocab GGUFs, templates) is absent: run `make install` "
                    "(scripts/install_llama_cpp.py keeps the llama-cpp-python sdist it is read from)")
    return root / "models"


_TOKENIZERS: dict[str, object] = {}
# Vocabularies whose tokenizer does not NFC-normalize its input, though transformers' GGUF conversion gives every
# Qwen-style vocabulary Qwen2's NFC normalizer: Qwen3.5's (llama.cpp's test vectors keep decomposed "é" as "e" plus
# the combining accent, and all of them match once the normalizer is dropped).
UNNORMALIZED_VOCABS = {"ggml-vocab-qwen35.gguf"}


def load_tokenizer(gguf: str):
    """A transformers tokenizer converted from a llama.cpp vocab GGUF; converted once (20-40 s) into the cache."""
    if gguf in _TOKENIZERS:
        return _TOKENIZERS[gguf]
    from transformers import AutoTokenizer

    from finetune import models
    from finetune.gguf import sdist
    from finetune.run.runs import atomic_dir

    models_dir = _llama_cpp_models()
    if not (models_dir / gguf).exists():
        pytest.skip(f"{gguf} is not in {models_dir}")
    cached = models.cache_root() / "test-tokenizers" / sdist.installed_version() / Path(gguf).stem
    if not (cached / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(models_dir), gguf_file=gguf)
        with atomic_dir(cached) as tmp:
            tok.save_pretrained(tmp)
    tok = AutoTokenizer.from_pretrained(str(cached))
    _restore_sentencepiece_dummy_prefix(tok)
    if gguf in UNNORMALIZED_VOCABS:
        tok.backend_tokenizer.normalizer = None
    _TOKENIZERS[gguf] = tok
    return tok


def _restore_sentencepiece_dummy_prefix(tok) -> None:
    """transformers converts a SentencePiece GGUF with Metaspace(prepend_scheme='first'), which drops the dummy
    prefix before text that starts with a space (' Hello' -> '▁Hello'). SentencePiece, llama.cpp and the models'
    own tokenizer.json (Llama 2, Mistral v0.3: a Prepend('▁') + Replace(' ', '▁') normalizer) give '▁▁Hello' and
    also prefix the text after each special token. Restore that; the llama.cpp test vectors check the result."""
    import json

    from tokenizers import normalizers

    backend = tok.backend_tokenizer
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None


_FAMILY_TOKENIZERS: dict[str, object] = {}


def family_tokenizer(name: str):
    """The family's tokenizer with its real chat template (built once per test session; tests do not modify it)."""
    if name not in _FAMILY_TOKENIZERS:
        _FAMILY_TOKENIZERS[name] = _build_family_tokenizer(name)
    return _FAMILY_TOKENIZERS[name]


def _build_family_tokenizer(name: str):
    import copy

    from tokenizers import AddedToken

    spec = FAMILIES[name]
    if spec.get("twin"):
        from transformers import AutoTokenizer

        from scripts import twins

        return AutoTokenizer.from_pretrained(twins.build(spec["twin"], log=lambda _: None))
    tok = copy.deepcopy(load_tokenizer(spec["gguf"]))
    if spec.get("add_special"):
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in spec["add_special"]], special_tokens=True)
    tok.chat_template = (_llama_cpp_models() / "templates" / spec["template"]).read_text(encoding="utf-8")
    return tok


def chat_template_ids(tok, messages, **kwargs) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kwargs)
    if hasattr(out, "keys"):  # transformers may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def spans(labels: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of trained (not -100) positions."""
    runs, start = [], None
    for k, lab in enumerate(labels + [IGNORE]):
        if lab != IGNORE and start is None:
            start = k
        elif lab == IGNORE and start is not None:
            runs.append((start, k))
            start = None
    return runs


def messages_for(name: str) -> list[dict]:
    return CONVERSATION if FAMILIES[name]["system"] else CONVERSATION[1:]


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("gguf", sorted({f["gguf"] for f in FAMILIES.values() if "gguf" in f}))
def test_tokenizer_matches_llama_cpp_test_vectors(gguf):
    """The converted tokenizer tokenizes llama.cpp's own test strings exactly as llama.cpp does."""
    models_dir = _llama_cpp_models()
    inp, out = models_dir / f"{gguf}.inp", models_dir / f"{gguf}.out"
    if not inp.exists() or not out.exists():
        pytest.skip(f"no llama.cpp test vectors for {gguf}")
    tok = load_tokenizer(gguf)
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = out.read_text(encoding="utf-8").split("\n")
    assert len(texts) >= 20
    mismatches = []
    for text, want in zip(texts, expected, strict=False):
        got = tok(text, add_special_tokens=False)["input_ids"]
        if got != [int(x) for x in want.split()]:
            mismatches.append((text, want, got))
    # Known edge cases differ between llama.cpp and the converted tokenizer (whitespace-only strings for
    # SentencePiece, a decomposed-Unicode Vietnamese word for Llama 3): allow two, never on plain ASCII text.
    ascii_mismatches = [m for m in mismatches if m[0].isascii() and m[0].strip()]
    assert not ascii_mismatches, f"{gguf}: ASCII text tokenizes differently from llama.cpp: {ascii_mismatches[:2]}"
    assert len(mismatches) <= 2, f"{gguf}: {len(mismatches)} of {len(texts)} test strings differ: {mismatches[:3]}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_render_equals_template_and_masks_prompt(name):
    from finetune.data.render import render_messages, template_kwargs

    tok = family_tokenizer(name)
    eot = FAMILIES[name]["eot"]
    messages = messages_for(name)
    reasoning = FAMILIES[name].get("reasoning", "auto")
    ids, labels = render_messages(tok, messages, train_on="assistant", reasoning=reasoning)

    # 1. exactly the ids the tokenizer's own chat template produces
    assert ids == chat_template_ids(tok, messages, **template_kwargs(tok.chat_template, reasoning))
    assert len(labels) == len(ids)
    assert all(lab in (IGNORE, i) for lab, i in zip(labels, ids, strict=True))
    # no doubled BOS (a template that writes bos_token plus a tokenizer that adds one)
    if tok.bos_token_id is not None and len(ids) > 1:
        assert not (ids[0] == tok.bos_token_id and ids[1] == tok.bos_token_id), "double BOS"

    # 2. one trained span per assistant turn: its content and its end-of-turn token, nothing of the prompt
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = spans(labels)
    assert len(runs) == len(replies), (name, [tok.decode(ids[a:b]) for a, b in runs])
    eot_id = tok.convert_tokens_to_ids(eot)
    for (a, b), reply in zip(runs, replies, strict=True):
        text = tok.decode(ids[a:b], skip_special_tokens=False)
        assert reply in text, (name, text)
        assert ids[b - 1] == eot_id, f"{name}: trained span ends with {tok.decode(ids[b - 1:b])!r}, not {eot!r}"
        for marker in ("SYSTEM-MARK", "USER-ONE", "USER-TWO"):
            assert marker not in text, (name, text)
        # the span starts at the reply: no role header (e.g. 'assistant', '<|assistant|>', 'model') inside it.
        # Qwen3's template writes an empty think block into the final assistant turn; it is trained as part of
        # the reply (the model learns to answer without thinking, as in the data).
        start = text.strip().removeprefix(FAMILIES[name].get("reply_prefix", "")).strip()
        assert start.startswith(reply.split()[0]), (name, text)

    # 3. every prompt token is masked and the prompt text is all there
    masked = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE], skip_special_tokens=False)
    for m in messages:
        if m["role"] == "user" or (m["role"] == "system" and not FAMILIES[name].get("drops_system")):
            assert m["content"].split()[-1] in masked, (name, m["content"])
    # end-of-turn tokens after user/system turns (where the template has them) stay masked
    trained_eots = sum(1 for i, lab in zip(ids, labels, strict=True) if i == eot_id and lab != IGNORE)
    assert trained_eots == len(replies)


@pytest.mark.parametrize("name", ["llama3.1", "qwen2.5", "mistral", "gemma2", "phi3.5"])
def test_last_assistant_and_truncation(name):
    from finetune.data.render import render_messages

    tok = family_tokenizer(name)
    messages = messages_for(name)
    ids, labels = render_messages(tok, messages, train_on="last_assistant")
    runs = spans(labels)
    assert len(runs) == 1
    text = tok.decode(ids[runs[0][0]:runs[0][1]], skip_special_tokens=False)
    assert "REPLY-TWO" in text and "REPLY-ONE" not in text
    short_ids, short_labels = render_messages(tok, messages, train_on="assistant", max_tokens=20)
    full_ids, full_labels = render_messages(tok, messages, train_on="assistant")
    assert short_ids == full_ids[:20] and short_labels == full_labels[:20]


def test_gemma_template_refuses_a_system_turn():
    """Gemma 2 has no system role: its template raises, and render says so instead of training on garbage."""
    from finetune.data.render import RenderError, render_messages

    tok = family_tokenizer("gemma2")
    with pytest.raises(RenderError, match="System role not supported"):
        render_messages(tok, CONVERSATION)


def test_mistral_template_drops_the_system_prompt_of_a_finished_conversation():
    """Mistral's template writes the system prompt into the LAST message only if it is a user turn. A training
    conversation ends with the assistant, so the system prompt silently vanishes from training examples (while
    it is present at inference). Recipes for Mistral therefore set no data.system_prompt."""
    tok = family_tokenizer("mistral")
    assert "SYSTEM-MARK" not in tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert "SYSTEM-MARK" in tok.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)


def test_every_shipped_recipe_has_a_tested_template_family(repo_root):
    from finetune import recipe

    files = recipe.recipe_files(repo_root / "recipes")
    uncovered = []
    for f in files:
        model_id = recipe.load(f).model.id
        if not any(model_id.startswith(prefix) for prefix in RECIPE_FAMILY_PREFIXES):
            uncovered.append(f"{f.name}: {model_id}")
    assert not uncovered, f"add the template family of these models to tests/unit/test_templates.py: {uncovered}"


def test_gemma_and_mistral_recipes_set_no_system_prompt(repo_root):
    """Gemma refuses a system turn; Mistral drops it from training examples (both tested above)."""
    from finetune import recipe

    for f in recipe.recipe_files(repo_root / "recipes"):
        r = recipe.load(f)
        if r.model.id.startswith(("google/gemma", "mistralai/")):
            assert r.data.system_prompt is None, f.name


def test_family_list_is_json_serialisable():
    # FAMILIES doubles as documentation in reports; keep it plain data
    json.dumps(FAMILIES)
