"""Text-only fine-tuning of an image-text checkpoint (a tiny random Qwen3_5ForConditionalGeneration): the LoRA
adapters land on the language model only, and export's merged checkpoint is the whole image-text model again with
the vision tower and projector byte for byte the base's; families that cannot go all the way are refused up front."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune import image_text, merge, models, refusals
from finetune.errors import UserError


def _text(tok, **extra) -> dict:
    """A scaled-down language model config with the embedded model's tokenizer."""
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_hidden_layers=2, tie_word_embeddings=True,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)


def _qwen35(tok):
    """Qwen3.5 (its linear-attention/full-attention layer pattern kept): transformers maps the checkpoint to its
    text class itself."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = _text(tok, layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
                 linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                 rope_parameters={"rope_theta": 1e7, "partial_rotary_factor": 0.25, "rope_type": "default",
                                  "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    text["head_dim"] = 32
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=64)
    return Qwen3_5ForConditionalGeneration, Qwen3_5Config(text_config=text, vision_config=vision,
                                                          tie_word_embeddings=True)


def _gemma4(tok):
    """Gemma 4 (sliding and full attention, per-layer input embeddings as E2B/E4B have): its text class is built
    from text_config, the weights renamed out of model.language_model.*."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    text = _text(tok, layer_types=["sliding_attention", "full_attention"], sliding_window=32,
                 hidden_size_per_layer_input=16, vocab_size_per_layer_input=len(tok), final_logit_softcapping=30.0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, position_embedding_size=64)
    return Gemma4ForConditionalGeneration, Gemma4Config(text_config=text, vision_config=vision,
                                                        tie_word_embeddings=True)


def _mistral3(tok):
    """Mistral 3 (Ministral 3's language model, a Pixtral vision tower): saved in the Llava layout
    (language_model.model.*), read back renamed."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = {"model_type": "ministral3", **_text(tok, sliding_window=None)}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
                  image_size=224, patch_size=14)
    return Mistral3ForConditionalGeneration, Mistral3Config(text_config=text, vision_config=vision,
                                                            image_token_index=10, tie_word_embeddings=True)


FAMILIES = {"qwen3.5": _qwen35, "gemma4": _gemma4, "mistral3": _mistral3}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def image_text_dir(request, tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny random image-text checkpoint of the family's real class, with the embedded model's tokenizer and chat
    template and an image preprocessor file."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cls, config = FAMILIES[request.param](tok)
    config.architectures = [cls.__name__]
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp(f"image-text-{request.param}")
    cls(config).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16, "merge_size": 2}))
    return out


def _language_model_keys(keys) -> list[str]:
    """The checkpoint's language-model weights, in either layout."""
    return [k for k in keys if k.startswith(("model.language_model.", "language_model."))]


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
    assert all(n.startswith("base_model.model.model.") for n in adapted), sorted(adapted)[:5]  # the decoder's
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
    base_config = json.loads((image_text_dir / "config.json").read_text())
    assert json.loads((merged / "config.json").read_text())["architectures"] == base_config["architectures"]
    assert (merged / "preprocessor_config.json").read_text() == (image_text_dir / "preprocessor_config.json").read_text()
    with safe_open(str(image_text_dir / "model.safetensors"), "pt") as b, \
            safe_open(str(merged / "model.safetensors"), "pt") as m:
        assert set(b.keys()) == set(m.keys())
        vision = sorted(set(b.keys()) - set(_language_model_keys(b.keys())))
        assert vision
        for k in vision:
            before, after = b.get_tensor(k), m.get_tensor(k)
            assert before.dtype == after.dtype and torch.equal(before.view(torch.uint8), after.view(torch.uint8)), k
        adapted = [k for k in _language_model_keys(b.keys()) if ".layers." in k and k.endswith("proj.weight")]
        assert adapted and all(not b.get_tensor(k).equal(m.get_tensor(k)) for k in adapted)


def test_the_text_model_is_the_checkpoints_language_model(image_text_dir):
    """Loaded alone, the language model computes what the whole image-text model computes for text."""
    import torch
    import transformers

    arch = json.loads((image_text_dir / "config.json").read_text())["architectures"][0]
    whole = getattr(transformers, arch).from_pretrained(image_text_dir, dtype=torch.float32).eval()
    text = models.load_causal_lm(image_text_dir, dtype=torch.float32).eval()
    assert not any("vision" in n or "visual" in n for n, _ in text.named_parameters())
    ids = torch.tensor([[1, 200, 300, 400, 500, 600]])
    with torch.no_grad():
        assert torch.equal(text(input_ids=ids).logits, whole(input_ids=ids).logits)


def test_a_family_without_a_text_model_class_is_refused():
    llava = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
             "text_config": {"model_type": "no_such_text_model"}, "vision_config": {"model_type": "clip_vision_model"}}
    with pytest.raises(UserError, match="LlavaForConditionalGeneration.*no causal-LM class.*text-only checkpoint"):
        refusals.check(llava, method="lora", adapter_gguf=False)
    for arch, model_type, text_type in (("Qwen3_5ForConditionalGeneration", "qwen3_5", "qwen3_5_text"),
                                        ("Gemma4ForConditionalGeneration", "gemma4", "gemma4_text"),
                                        ("Mistral3ForConditionalGeneration", "mistral3", "ministral3"),
                                        ("Mistral3ForConditionalGeneration", "mistral3", "mistral")):
        config = {"architectures": [arch], "model_type": model_type, "text_config": {"model_type": text_type},
                  "vision_config": {}}
        refusals.check(config, method="lora", adapter_gguf=False)  # supported: no error
    refusals.check({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, method="lora", adapter_gguf=False)


def test_a_language_model_missing_from_the_checkpoint_is_an_error(image_text_dir, tmp_path):
    """A checkpoint whose language-model weights are not where the text class looks is refused, never trained from
    random initialisation."""
    from safetensors.torch import load_file, save_file

    spec = image_text.text_model(json.loads((image_text_dir / "config.json").read_text()))
    if not spec.from_text_config:
        pytest.skip("transformers' own class table maps this checkpoint to its text class")
    broken = tmp_path / "broken"
    shutil.copytree(image_text_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    save_file({k.replace("language_model", "text_decoder"): v for k, v in tensors.items()},
              str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="could not be read out of its image-text checkpoint"):
        models.load_causal_lm(broken)
