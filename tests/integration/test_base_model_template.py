"""A base model without a chat template, fine-tuned on chat data with a built-in template name (model.chat_template).

The base twin: a tiny random Llama (2 layers, width 64) over the embedded model's real tokenizer with its chat
template removed and its ChatML turn tokens renamed away, so it lacks the turn tokens of every built-in template.
`finetune run` with `model.chat_template: chatml` (tied embeddings) and `gemma` (untied head) adds the turn tokens,
trains LoRA plus just the new token rows, and exports an F16 GGUF: the rows the base had are unchanged, the new ones
trained, llama.cpp's top-1 agrees with transformers everywhere, and the GGUF's greedy answer ends at the end of turn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

QA = [("Hi", "Hello."), ("What is 2+2?", "4."), ("Name a colour.", "Blue."), ("Capital of France?", "Paris."),
      ("Say yes.", "Yes."), ("Say no.", "No."), ("Opposite of hot?", "Cold."), ("A pet?", "A cat.")]


def _base_twin(tokenizer_dir: Path, out: Path, *, tied: bool) -> Path:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from finetune.merge import save_tokenizer

    spec = json.loads(AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer.to_str())
    renamed = {"<|im_start|>": "<|reserved_1|>", "<|im_end|>": "<|reserved_2|>"}
    spec["model"]["vocab"] = {renamed.get(k, k): v for k, v in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        added["content"] = renamed.get(added["content"], added["content"])
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    assert tok.chat_template is None and "<|im_start|>" not in tok.get_vocab()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out, sources=[])
    return out


def _recipe(tmp: Path, model_dir: Path, template: str) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA] * 4
    (tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": f"base-{template}", "seed": 0, "runs_dir": str(tmp / "runs"),
        "model": {"id": str(model_dir), "chat_template": template, "dtype": "float32"},
        "data": {"sources": [{"path": "chat.jsonl"}], "split": {"validation": 0.0, "test": 0.1}},
        "train": {"method": "lora", "lora": {"r": 8, "alpha": 16}, "lr": 2.0e-2, "batch_size": 8, "max_steps": 40,
                  "eval_every": 40, "save_every": 40},
        "eval": {"metrics": ["loss"], "max_examples": 4, "forgetting": False},
        "export": {"quantizations": ["F16"]},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(("template", "tied", "turn_tokens"), [("chatml", True, ["<|im_start|>", "<|im_end|>"]),
                                                               ("gemma", False, ["<start_of_turn>", "<end_of_turn>"])])
def test_base_model_trains_with_a_named_template(finetune, tokenizer_dir, tmp_path, template, tied, turn_tokens):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from finetune import recipe as recipe_mod
    from finetune.gguf import runtime
    from finetune.run import artifacts

    base = _base_twin(tokenizer_dir, tmp_path / "base", tied=tied)
    path = _recipe(tmp_path, base, template)
    proc = finetune("run", str(path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"added 2 turn tokens the model lacked ({', '.join(turn_tokens)})" in proc.stderr

    recipe = recipe_mod.load(path)
    merged = artifacts.load(recipe, artifacts.Exported).merged
    tok = AutoTokenizer.from_pretrained(merged)
    new = tok.convert_tokens_to_ids(turn_tokens)
    assert min(new) >= len(AutoTokenizer.from_pretrained(base))
    before, after = load_file(base / "model.safetensors"), load_file(merged / "model.safetensors")
    for key in ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"]):
        rows = before[key].shape[0]
        assert after[key].shape[0] == len(tok)
        assert after[key][:rows].equal(before[key]), f"{key}: rows of the base vocabulary changed"
    # the new rows were trained: the adapter keeps their trained values (trainable_tokens_delta) apart from the
    # resized embedding they started from (saved whole by peft, as the vocabulary grew)
    adapter = load_file(recipe.run_dir("train") / "adapter" / "adapter_model.safetensors")
    for layer in ["model.embed_tokens"] + ([] if tied else ["lm_head"]):
        trained = adapter[f"base_model.model.{layer}.token_adapter.trainable_tokens_delta"]
        start = adapter[f"base_model.model.{layer}.token_adapter.base_layer.weight"][new]
        assert trained.shape == start.shape and not trained.equal(start), f"{layer}: the new rows did not train"
        merged_rows = after[f"{layer}.weight"][new]
        assert merged_rows.to(trained.dtype).equal(trained), f"{layer}: the merge did not take the trained rows"

    report = json.loads((recipe.run_dir("export") / "parity.json").read_text())
    assert report["ok"], report.get("failed")
    f16 = report["types"]["F16"]["logits"]
    assert f16["top1_agreement"] == 1.0
    assert report["end_of_turn"]["end_of_turn"][0]["token"] == turn_tokens[1]
    exported = artifacts.load(recipe, artifacts.Exported)
    answer = runtime.chat(exported.gguf["F16"], [[{"role": "user", "content": QA[1][0]}]], max_tokens=24)[0]
    assert answer["finish_reason"] == "stop", answer  # it ended its turn (the end-of-turn token is the GGUF's EOS)
    assert report["greedy_chat"]["ok"] and report["greedy_chat"]["gguf_stopped"] >= 1

