"""A model that cannot go all the way is refused before training (validate, plan, doctor, train ask
finetune.refusals): here, Gemma 4 layouts of shared key/value layers that llama.cpp would run differently."""

from __future__ import annotations

import json

import yaml
from test_doctor import _folder

from finetune import refusals

S, F = refusals.SLIDING, refusals.FULL


def _gemma4(types: list[str], shared: int) -> dict:
    return {"model_type": "gemma4_text", "layer_types": types, "num_kv_shared_layers": shared}


def test_the_published_layout_is_accepted():
    e2b = ([S] * 4 + [F]) * 7  # Gemma 4 E2B: 35 layers, the last 20 sharing
    assert refusals.shared_kv_problem(_gemma4(e2b, 20)) is None
    assert refusals.shared_kv_problem(_gemma4([S, S, F, S, F], 2)) is None  # the matrix's gemma4-e2b twin
    assert refusals.shared_kv_problem(_gemma4([S, F, S, F], 0)) is None  # nothing shared
    assert refusals.shared_kv_problem({"model_type": "gemma3n_text", "layer_types": [F, S], "num_kv_shared_layers": 1}) is None


def test_a_layout_llama_cpp_runs_differently_is_refused():
    problem = refusals.shared_kv_problem(_gemma4([S, F, S, S, F], 2))  # unshared layers end full, sliding
    assert problem and "num_kv_shared_layers" in problem and "sliding_attention', 'full_attention'" in problem
    # an image-text checkpoint nests it in text_config
    nested = {"model_type": "gemma4", "text_config": _gemma4([F, S, S], 1), "vision_config": {}}
    assert refusals.shared_kv_problem(nested)
    found = refusals.problems(nested, method="lora", adapter_gguf=False)
    assert len(found) == 1 and found[0].startswith("model.id: its last 1 layers share keys and values")


def test_validate_plan_and_doctor_refuse_it(cli, tmp_path, tokenizer_dir):
    from transformers import Gemma4TextConfig

    folder = _folder(tmp_path, tokenizer_dir, Gemma4TextConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, hidden_size_per_layer_input=0, layer_types=[F, S, S],
        num_kv_shared_layers=1, architectures=["Gemma4ForCausalLM"]))
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                                  {"role": "assistant", "content": "Hello"}]}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "model": {"id": str(folder)},
                                      "data": {"sources": [{"path": "chats.jsonl"}]}}))
    for command in ("validate", "plan"):
        code, out, err = cli(command, str(recipe))
        assert code == 2, (command, out, err)
        assert "num_kv_shared_layers" in out + err and "Traceback" not in out + err, (command, out, err)
    code, out, _ = cli("doctor", str(folder))
    assert code == 2 and "REFUSED" in out and "shared key/value layers" in out
