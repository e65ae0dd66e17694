"""`finetune doctor`: what each stage will do with a model, from its config and tokenizer alone (no weights)."""

from __future__ import annotations

import json
import shutil

import pytest


def _folder(tmp_path, tokenizer_dir, config, *, template=True):
    """A model folder with a config and the embedded model's tokenizer files, and no weights."""
    out = tmp_path / config.model_type
    out.mkdir()
    config.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    if not template:
        (out / "chat_template.jinja").unlink(missing_ok=True)
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def test_the_embedded_model_is_supported_everywhere(cli):
    code, out, _ = cli("doctor", "smollm2-135m-instruct")
    assert code == 0, out
    assert "LlamaForCausalLM: yes" in out and "'<|im_end|>'" in out and "supported through every stage" in out


def test_linear_attention_and_mixture_of_experts_are_described(cli, tmp_path, tokenizer_dir):
    from transformers import GptOssConfig, Qwen3_5TextConfig

    qwen = _folder(tmp_path, tokenizer_dir, Qwen3_5TextConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, layer_types=["linear_attention", "full_attention"],
        mtp_num_hidden_layers=1, architectures=["Qwen3_5ForCausalLM"]))
    code, out, _ = cli("doctor", str(qwen), "--json")
    findings = {f["check"]: f["finding"] for f in json.loads(out)["findings"]}
    assert code == 0
    assert findings["packed batches"].startswith("off: its linear_attention layers")
    assert "--no-mtp" in findings["multi-token prediction"]

    oss = _folder(tmp_path, tokenizer_dir, GptOssConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        architectures=["GptOssForCausalLM"]))
    code, out, _ = cli("doctor", str(oss), "--json")
    findings = {f["check"]: f["finding"] for f in json.loads(out)["findings"]}
    assert "active per token (2 of 4 experts)" in findings["parameters"]
    assert "experts are fused" in findings["LoRA targets (all-linear)"]
    assert findings["packed batches"].startswith("on")


@pytest.mark.parametrize("problem", ["no-template", "no-converter"])
def test_a_model_that_cannot_go_all_the_way_is_refused(cli, tmp_path, tokenizer_dir, problem):
    from transformers import LlamaConfig, OPTConfig

    if problem == "no-template":
        folder = _folder(tmp_path, tokenizer_dir, LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=1, num_attention_heads=4, architectures=["LlamaForCausalLM"]),
                         template=False)
        words = "no chat template"
    else:
        folder = _folder(tmp_path, tokenizer_dir, OPTConfig(vocab_size=49152, hidden_size=64, ffn_dim=96,
                         num_hidden_layers=1, num_attention_heads=4, word_embed_proj_dim=64,
                         architectures=["OPTForCausalLM"]))
        words = "not an architecture llama.cpp's converter knows"
    code, out, _ = cli("doctor", str(folder))
    assert code == 2
    assert "REFUSED" in out and words in out
