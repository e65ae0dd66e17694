"""Packed training follows what each architecture's attention needs: sliding windows (Mistral, Gemma 2/3, gpt-oss),
soft-capped scores (Gemma 2), attention sinks (gpt-oss); layers that are not attention (Qwen3.5's gated-delta
linear attention, LFM2's convolutions, Granite 4's mamba) turn packing off.

Each model is the real transformers class with a tiny random config; sequences are longer than the sliding
window, so a window that was ignored shows up. The reference is transformers' own eager attention on each
example alone.
"""

from __future__ import annotations

import pytest

from finetune.training import attention, batching

WINDOW = 8
VOCAB = 300


def _config(kind: str):
    from transformers import Gemma2Config, Gemma3TextConfig, GptOssConfig, MistralConfig

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=WINDOW)
    if kind == "gemma2":  # sliding + global layers, soft-capped attention scores
        return Gemma2Config(**common, sliding_window=WINDOW, attn_logit_softcapping=50.0, query_pre_attn_scalar=16,
                            layer_types=["sliding_attention", "full_attention"])
    if kind == "gemma3":
        return Gemma3TextConfig(**common, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "full_attention"])
    if kind == "gpt-oss":  # attention sinks, sliding layers, mixture of experts
        return GptOssConfig(**{**common, "intermediate_size": 32}, sliding_window=WINDOW, num_local_experts=4,
                            num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
    raise AssertionError(kind)


def _model(config, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    if hasattr(model.model.layers[0].self_attn, "sinks"):
        with torch.no_grad():  # sinks large enough to matter (random init is ~0.02)
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    model.config.use_cache = False
    return model.eval()


def _examples(lengths: list[int]) -> list[tuple[list[int], list[int]]]:
    import random

    rng = random.Random(7)
    return [([rng.randint(3, VOCAB - 1) for _ in range(n)],) * 2 for n in lengths]


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gemma3", "gpt-oss"])
def test_packed_attention_matches_eager_beyond_the_window(kind):
    import torch

    config = _config(kind)
    examples = _examples([3 * WINDOW + 5, WINDOW - 2, 2 * WINDOW + 1])
    packed = batching.collate_packed(examples)
    reference_model = _model(config, "eager")
    packed_model = _model(config, attention.register())
    packed_model.load_state_dict(reference_model.state_dict())
    with torch.no_grad():
        logits = packed_model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits[0]
        bounds = packed["cu_seq_lens_q"].tolist()
        for (ids, _), a, b in zip(examples, bounds[:-1], bounds[1:], strict=True):
            alone = reference_model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(logits[a:b], alone, atol=2e-4, rtol=1e-4)


def test_the_window_and_sinks_change_the_answer():
    """The check above can fail: the same packed rows with the window and sinks ignored differ from eager."""
    import torch

    config = _config("gpt-oss")
    examples = _examples([3 * WINDOW + 5])
    packed = batching.collate_packed(examples)
    model = _model(config, "eager")
    with torch.no_grad():
        reference = model(input_ids=packed["input_ids"]).logits[0]
        plain = _model(config, "eager")
        plain.load_state_dict(model.state_dict())
        for layer in plain.model.layers:
            layer.self_attn.sliding_window = None
            layer.self_attn.sinks.fill_(-1e4)  # a sink that never takes probability: plain causal attention
        ignored = plain(input_ids=packed["input_ids"]).logits[0]
    assert (ignored - reference).abs().max() > 1e-2


def _hybrid_config(kind: str):
    from transformers import GraniteMoeHybridConfig, Lfm2Config, Qwen3_5TextConfig

    if kind == "qwen3.5":
        return Qwen3_5TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                 linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
    if kind == "lfm2":
        return Lfm2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"])
    if kind == "granite-4":
        return GraniteMoeHybridConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=32,
                                      mamba_d_state=16, num_local_experts=0)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["qwen3.5", "lfm2", "granite-4"])
def test_layers_that_are_not_attention_turn_packing_off(kind):
    config = _hybrid_config(kind)
    reason = attention.packing_obstacle(config)
    assert reason is not None and "pack" in reason


def test_linear_attention_cannot_take_packed_rows():
    """Why Qwen3.5 trains on padded batches here: without flash-linear-attention its gated-delta layers cannot
    keep packed examples apart, and transformers refuses them (what a packed Qwen3.5 run hit before)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _hybrid_config("qwen3.5")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.register(), dtype=torch.float32)
    model.config.use_cache = False
    packed = batching.collate_packed(_examples([12, 10]))
    with torch.no_grad(), pytest.raises(ValueError, match="packed"):
        model.eval()(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False)


@pytest.mark.parametrize("kind", ["mistral", "gemma3", "gpt-oss"])
def test_attention_layers_keep_packing_on(kind):
    assert attention.packing_obstacle(_config(kind)) is None


def test_gpt_oss_adapter_saves_although_it_has_no_sdpa(tmp_path):
    """Saving after packed training names a standard attention in config.json: eager where SDPA is not supported."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from finetune.training import checkpoint

    model = get_peft_model(_model(_config("gpt-oss"), attention.register()),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir())
    checkpoint.save_model_dir(model, tokenizer, tmp_path / "adapter", attention.NAME)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert model.get_base_model().config._attn_implementation == attention.NAME  # restored for training
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4


def _tokenizer_dir():
    from finetune import models

    return models.resolve(models.EMBEDDED_MODEL).path


def test_what_lies_inside_the_experts():
    """One rule for "inside the experts", by name: doctor counts these parameters as routed, and LoRA on the experts
    targets the 3-D tensors among them. A shared expert (always active) is not routed; a dense model has none."""
    from finetune.training import model_setup

    inside = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj_bias",
              "model.layers.3.mlp.experts.7.w1.weight", "model.layers.0.mlp.experts"]
    outside = ["model.layers.0.mlp.router.weight", "model.layers.0.mlp.shared_experts.gate_proj.weight",
               "model.layers.0.mlp.shared_expert.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    assert [model_setup.in_experts(n) for n in inside + outside] == [True] * len(inside) + [False] * len(outside)
    assert model_setup.expert_parameters(_model(_config("gpt-oss"), "eager")) == ["mlp.experts.down_proj",
                                                                                  "mlp.experts.gate_up_proj"]
    assert model_setup.expert_parameters(_model(_config("mistral"), "eager")) == []


def test_lora_on_the_experts_trains_merges_and_is_planned(tmp_path, tiny_model_dir):
    """train.lora.experts: LoRA on gpt-oss's fused expert tensors (peft target_parameters) besides attention; the
    adapter trains them, export's merge writes them into the experts, and the planner counts the same trainable
    parameters as peft. Without export.adapter_gguf: false the recipe is refused (llama.cpp writes no such adapter);
    on a model without expert tensors the option is refused at training."""
    import json

    import torch
    from safetensors.torch import load_file
    from train_fixtures import prepared
    from transformers import AutoTokenizer

    from finetune import merge, plan, recipe, train
    from finetune.errors import UserError
    from finetune.training import model_setup

    tok = AutoTokenizer.from_pretrained(_tokenizer_dir())
    config = _config("gpt-oss")
    config.vocab_size = len(tok)
    model = _model(config, "eager")
    model_dir = tmp_path / "gpt-oss"
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    assert model_setup.expert_parameters(model) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]

    lora = {"r": 4, "alpha": 8, "experts": True}
    with pytest.raises(recipe.RecipeError, match=r"train.lora.experts: llama.cpp's LoRA converter writes no adapter "
                                                 r"for expert tensors; set export.adapter_gguf: false"):
        prepared(tmp_path / "refused", model_dir, lora=lora, max_steps=1)
    r = prepared(tmp_path / "run", model_dir, lora=lora, export={"adapter_gguf": False}, max_steps=2, batch_size=4,
                 lr=1e-2, eval_every=100, save_every=100, n_train=8, n_val=0)
    summary = train.run(r)
    adapter = r.run_dir("train") / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("experts" in k for k in weights) and any("q_proj" in k for k in weights)

    dims = plan.ModelDims.from_config(json.loads((model_dir / "config.json").read_text()))
    est = plan.estimate(dims, plan.Settings(method="lora", lora_r=4, lora_experts=True, device="cpu"))
    assert est.trainable_params == summary["trainable_params"] == sum(v.numel() for v in weights.values())

    merge.merge(base_dir=model_dir, adapter_dir=adapter, model_dir=None, out_dir=tmp_path / "merged")
    base, merged = load_file(str(model_dir / "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert not torch.equal(base[name], merged[name].to(base[name].dtype)), name

    dense = prepared(tmp_path / "dense", tiny_model_dir, lora=lora, export={"adapter_gguf": False}, max_steps=1)
    with pytest.raises(UserError, match="train.lora.experts: this model has no expert weight tensors"):
        train.run(dense)
