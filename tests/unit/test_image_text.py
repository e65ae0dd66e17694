"""Text-only fine-tuning of an image-text checkpoint (a tiny random Qwen3_5ForConditionalGeneration): the LoRA
adapters land on the language model only, and export's merged checkpoint is the whole image-text model again with
the vision tower and projector byte for byte the base's; families that cannot go all the way are refused up front."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune import image_text, merge, models
from finetune.errors import UserError


@pytest.fixture(scope="module")
def image_text_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """Qwen3.5's image-text class, scaled down (its linear-attention/full-attention layer pattern kept), with the
    embedded model's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, Qwen3_5Config, Qwen3_5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_theta": 1e7, "partial_rotary_factor": 0.25, "rope_type": "default",
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=64)
    config = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True)
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("image-text")
    Qwen3_5ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16, "merge_size": 2}))
    return out


def _trained_adapter(base: Path, out: Path):
    """The adapter train writes (its model loader, its LoRA wrapper, all-linear), with non-zero B matrices so the
    merge changes every adapted weight."""
    import torch

    from finetune.recipe import TrainConfig
    from finetune.training import model_setup

    resolved = models.ResolvedModel(base, str(base), "local", None)
    peft_model = model_setup._add_adapter(models.load_model(resolved, "float32"), TrainConfig(method="lora"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base / f).exists():
            shutil.copy(base / f, out)
    return peft_model


def test_lora_adapts_only_the_language_model(image_text_dir, tmp_path):
    peft_model = _trained_adapter(image_text_dir, tmp_path / "adapter")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert adapted, "no LoRA adapter was added"
    # The trained model is the language model alone: no vision weight is in memory, none can get an adapter.
    assert not any("visual" in n or "vision" in n for n, _ in peft_model.named_parameters())
    assert all(".layers." in n for n in adapted), sorted(adapted)[:5]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_merged_checkpoint_keeps_the_vision_tower_byte_for_byte(image_text_dir, tmp_path):
    import torch
    from safetensors import safe_open

    _trained_adapter(image_text_dir, tmp_path / "adapter")
    info = merge.merge(base_dir=image_text_dir, adapter_dir=tmp_path / "adapter", model_dir=None,
                        out_dir=tmp_path / "merged")
    assert info["vision_kept"]
    merged = tmp_path / "merged"
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert (merged / "preprocessor_config.json").read_text() == (image_text_dir / "preprocessor_config.json").read_text()
    with safe_open(str(image_text_dir / "model.safetensors"), "pt") as b, \
            safe_open(str(merged / "model.safetensors"), "pt") as m:
        assert set(b.keys()) == set(m.keys())
        vision = [k for k in b.keys() if k.startswith("model.visual.")]
        assert vision
        for k in vision:
            before, after = b.get_tensor(k), m.get_tensor(k)
            assert before.dtype == after.dtype and torch.equal(before.view(torch.uint8), after.view(torch.uint8)), k
        adapted = [k for k in b.keys() if k.startswith("model.language_model.layers.") and k.endswith("proj.weight")]
        assert adapted and all(not b.get_tensor(k).equal(m.get_tensor(k)) for k in adapted)


def test_a_family_without_a_text_model_class_is_refused():
    config = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
              "text_config": {"model_type": "ministral3"}, "vision_config": {"model_type": "pixtral"}}
    with pytest.raises(UserError, match="Mistral3ForConditionalGeneration.*Mistral-7B-Instruct-v0.3"):
        image_text.check_text_model(config)
    gemma = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
             "text_config": {"model_type": "gemma4_text"}, "vision_config": {"model_type": "gemma4_vision"}}
    with pytest.raises(UserError, match="vision tower included.*Gemma4ForCausalLM"):
        image_text.check_text_model(gemma)
    qwen = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
            "text_config": {"model_type": "qwen3_5_text"}, "vision_config": {"model_type": "qwen3_5_vision"}}
    image_text.check_text_model(qwen)  # supported: no error
    image_text.check_text_model({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
