"""finetune.gguf without running llama.cpp: the guards that refuse before it runs (converter architectures, free
space, importance-matrix types), the llama.cpp source it reads, Ollama templates. The runtime and the converter
for real: tests/integration/test_gguf_runtime.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.errors import UserError


def test_quantize_refuses_types_that_need_an_importance_matrix(gguf, tmp_path):
    from finetune.gguf import runtime

    with pytest.raises(UserError, match="importance matrix"):
        runtime.quantize(gguf, tmp_path / "x.gguf", "IQ2_XXS")
    assert not (tmp_path / "x.gguf").exists()


def test_recipe_rejects_imatrix_types_without_one_and_misspelt_types():
    from finetune import recipe

    with pytest.raises(recipe.RecipeError, match="importance matrix"):
        recipe.validate_dict({"name": "x", "export": {"quantizations": ["IQ2_XXS"], "imatrix": False}})
    assert recipe.validate_dict({"name": "x", "export": {"quantizations": ["IQ2_XXS"]}}).export.imatrix
    with pytest.raises(recipe.RecipeError, match="did you mean 'Q4_K_M'"):
        recipe.validate_dict({"name": "x", "export": {"quantizations": ["Q4KM"]}})


def test_converter_knows_common_architectures_and_rejects_unknown_ones(tmp_path):
    from finetune.gguf import convert

    known = convert.supported_architectures()
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Gemma2ForCausalLM"} <= known
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMX"]}))
    with pytest.raises(UserError, match="'LlamaForCausalLMX' is not supported by llama.cpp's converter"):
        convert.check_architecture(tmp_path)


def test_free_space_check_says_how_much_is_needed(tmp_path):
    from finetune.gguf import convert

    convert.check_free_space(tmp_path, 1 << 20, "a small export")
    with pytest.raises(UserError, match=r"not enough disk space .* GiB needed"):
        convert.check_free_space(tmp_path / "not" / "yet", 1 << 60, "a huge export")


def _template(name: str) -> str:
    from finetune.gguf import sdist

    tree = sdist.llama_cpp_dir(download=False)
    if tree is None or not (tree / "models" / "templates" / name).exists():
        pytest.skip(f"llama.cpp source tree (templates/{name}) is not cached")
    return (tree / "models" / "templates" / name).read_text()


@pytest.mark.parametrize(("name", "family", "stop"), [
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3", "<|eot_id|>"),
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "chatml", "<|im_end|>"),
    ("google-gemma-2-2b-it.jinja", "gemma", "<end_of_turn>"),
    ("microsoft-Phi-3.5-mini-instruct.jinja", "phi3", "<|end|>"),
    ("google-gemma-4-31B-it.jinja", "gemma4", "<turn|>"),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral", "</s>"),
    ("Mistral-Small-3.2-24B-Instruct-2506.jinja", "mistral3", "</s>"),
    ("mistralai-Ministral-3-14B-Reasoning-2512.jinja", "mistral3", "</s>"),
    ("ibm-granite-granite-4.0.jinja", "granite", "<|end_of_text|>"),
    ("openai-gpt-oss-120b.jinja", "harmony", "<|return|>"),
    ("LFM2.5-Instruct.jinja", "chatml", "<|im_end|>"),
    ("HuggingFaceTB-SmolLM3-3B.jinja", "chatml", "<|im_end|>"),
    ("Qwen3.5-4B.jinja", "chatml", "<|im_end|>"),
])
def test_ollama_translation_of_real_templates(name, family, stop):
    from finetune.gguf import ollama

    jinja = _template(name)
    tr = ollama.translate_template(jinja)
    assert tr.family == family and tr.warning is None
    text, warning = ollama.modelfile("m-Q8_0.gguf", jinja_template=jinja, stop_tokens=[stop], num_ctx=4096)
    assert warning is None and text.count('"""') == 2 and f'PARAMETER stop "{stop}"' in text
    assert "FROM ./m-Q8_0.gguf" in text and "PARAMETER num_ctx 4096" in text


def test_ollama_untranslatable_template_is_a_clear_warning():
    from finetune.gguf import ollama

    text, warning = ollama.modelfile("m.gguf", jinja_template="{% for m in messages %}{{ m.content }}{% endfor %}",
                                     stop_tokens=["</s>"], num_ctx=2048)
    assert warning and "not a format finetune can translate" in warning
    assert 'TEMPLATE """' not in text and "# WARNING" in text


def _render_go_chatml(template: str, system: str | None, messages: list[dict]) -> str:
    """Enough of Go's text/template for the ChatML TEMPLATE we write (if .System / range .Messages)."""
    head, rest = template.split("{{- range .Messages }}")
    body, tail = rest.split("{{ end }}", 1)
    sys_block = head.removeprefix("{{- if .System }}").removesuffix("{{ end }}")
    out = sys_block.replace("{{ .System }}", system) if system else ""
    for m in messages:
        out += body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
    return out + tail


def test_ollama_chatml_template_renders_like_the_hf_template(embedded_model):
    from transformers import AutoTokenizer

    from finetune.gguf import ollama, parity

    tok = AutoTokenizer.from_pretrained(embedded_model.path)
    tr = ollama.translate_template(tok.chat_template)
    system = parity.default_system_prompt(tok)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert _render_go_chatml(tr.template, system, msgs) == want
    with_system = [{"role": "system", "content": "Be brief."}, *msgs]
    want = tok.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert _render_go_chatml(tr.template, "Be brief.", msgs) == want


def test_a_template_that_refuses_system_messages_has_no_default_system_prompt(embedded_model):
    """Gemma 2's template raises "System role not supported"; export asks for the default system prompt of every
    model it writes a Modelfile for, and failed there, after every parity check had passed."""
    from transformers import AutoTokenizer

    from finetune.gguf import parity

    tok = AutoTokenizer.from_pretrained(embedded_model.path)
    assert parity.default_system_prompt(tok) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    tok.chat_template = _template("google-gemma-2-2b-it.jinja")
    assert parity.default_system_prompt(tok) is None


def test_a_llama_cpp_crash_names_its_likely_cause():
    """A crash at one of llama.cpp's own checks (the model's structure) is not sent to reinstall the build; a crash
    without one is; a crash over an adapter names the adapter."""
    import signal

    from finetune.gguf import runtime

    path = Path("m-F16.gguf")
    assertion = "llama-kv-cache.cpp:268: GGML_ASSERT(map_layer_ids.find(il_reuse) != map_layer_ids.end()) failed"
    message = runtime._crash_message("many", path, -signal.SIGABRT, f"load\n{assertion}\n", {})
    assert "SIGABRT" in message and "own checks" in message and "reinstall" not in message
    assert message.endswith(f"Last log line: {assertion}")
    assert "reinstall llama-cpp-python" in runtime._crash_message("many", path, -signal.SIGSEGV, "load\n", {})
    lora = runtime._crash_message("many", path, -signal.SIGSEGV, "", {"lora_path": "/x/a-adapter-F16.gguf"})
    assert "a-adapter-F16.gguf" in lora and "export.adapter_gguf: false" in lora


def test_the_gguf_magic_is_read_once_per_file_and_again_when_it_changes(tmp_path):
    """Every llama.cpp call checks its GGUF; an unchanged file is not read again, a replaced one is."""
    import os

    from finetune.gguf import runtime

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(12))
    runtime.check_gguf(path)
    runtime.check_gguf(path)
    assert sum(key[0] == str(path.resolve()) for key in runtime._CHECKED) == 1
    path.write_text("<html>404 Not Found</html>\n")
    os.utime(path, ns=(1, 1))
    with pytest.raises(UserError, match=r"m.gguf is not a GGUF \(it starts with '<html>404 No'"):
        runtime.check_gguf(path, what="serve.quant Q4_K_M")
