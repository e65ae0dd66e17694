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
    assert "experts and the router are fused" in findings["LoRA targets (all-linear)"]
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


def test_adapter_gguf_is_refused_before_training_where_llama_cpp_cannot_write_one(cli, tmp_path, tokenizer_dir):
    """llama.cpp's LoRA converter writes the whole base model as the "adapter" of Ministral 3 (its converter class
    delegates writing to an inner model), and llama.cpp crashes loading it: validate, plan and doctor refuse
    export.adapter_gguf for it, with the merged GGUF as the alternative; without the adapter GGUF it is fine."""
    import yaml
    from transformers import Ministral3Config

    folder = _folder(tmp_path, tokenizer_dir, Ministral3Config(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, architectures=["Ministral3ForCausalLM"]))
    code, out, _ = cli("doctor", str(folder), "--json")
    findings = {f["check"]: f["finding"] for f in json.loads(out)["findings"]}
    assert code == 0, out  # the model itself goes all the way: merged GGUFs
    assert findings["LoRA adapter GGUF"].startswith("no: llama.cpp's converter cannot write a LoRA adapter GGUF")
    assert "LoRA adapter GGUF" not in findings["outputs"]

    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                                  {"role": "assistant", "content": "Hello"}]}) + "\n")

    def recipe(name: str, **sections) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "model": {"id": str(folder)},
                                        "data": {"sources": [{"path": "chats.jsonl"}]}, **sections}))
        return str(path)

    asks = recipe("asks")  # export.adapter_gguf defaults to true
    for command in ("validate", "plan", "doctor"):
        code, out, err = cli(command, asks)
        assert code == 2, (command, out, err)
        assert "export.adapter_gguf" in out + err and "merged GGUF" in out + err, (command, out, err)
    code, out, err = cli("validate", recipe("off", export={"adapter_gguf": False}), recipe("full", train={"method": "full"}))
    assert code == 0, out + err
