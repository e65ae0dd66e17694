"""merge.merge (the checkpoint export converts) on what real Hub checkpoints ship: sampling generation configs and
SentencePiece tokenizers.

Both broke every instruct model at export, after training: transformers refused to save a generation config with
temperature/top_p but no do_sample, and the merged folder lost tokenizer.model / added tokens, so llama.cpp's
converter stopped or built another vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune import merge

SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20}


def _with_generation_config(src: Path, dst: Path, settings: dict) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"), **settings}
    (dst / "generation_config.json").write_text(json.dumps(gen))
    return dst


@pytest.mark.parametrize("adapter", [False, True])
def test_merge_keeps_a_sampling_generation_config(tiny_model_dir, tmp_path, adapter):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GenerationConfig

    base = _with_generation_config(tiny_model_dir, tmp_path / "base", SAMPLING)
    adapter_dir = None
    if adapter:
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules="all-linear"))
        adapter_dir = tmp_path / "adapter"
        model.save_pretrained(adapter_dir)
        shutil.copy(base / "tokenizer_config.json", adapter_dir)
        shutil.copy(base / "tokenizer.json", adapter_dir)
        for name in ("chat_template.jinja",):
            if (base / name).exists():
                shutil.copy(base / name, adapter_dir)
    out = tmp_path / "merged"
    info = merge.merge(base_dir=base, adapter_dir=adapter_dir, model_dir=None if adapter else base, out_dir=out)
    saved = GenerationConfig.from_pretrained(out)
    assert saved.do_sample is True
    assert (saved.temperature, saved.top_p, saved.top_k) == (0.6, 0.9, 20)
    assert saved.eos_token_id == info["eos_ids"]


def test_merge_drops_only_the_sampling_values_of_an_inconsistent_config(tiny_model_dir, tmp_path):
    """A base whose generation config has sampling values with sampling off still exports (greedy, as it ran)."""
    from transformers import GenerationConfig

    base = _with_generation_config(tiny_model_dir, tmp_path / "base",
                                   {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1})
    merge.merge(base_dir=base, adapter_dir=None, model_dir=base, out_dir=tmp_path / "merged")
    saved = GenerationConfig.from_pretrained(tmp_path / "merged")
    assert saved.repetition_penalty == 1.1
    assert not saved.do_sample


def _sentencepiece_model(folder: Path) -> Path:
    """A real SentencePiece model trained on a few sentences (what Llama 2, Mistral, Phi-3 and Gemma ship)."""
    import sentencepiece as spm

    text = folder / "corpus.txt"
    text.write_text("\n".join(f"The quick brown fox {i} jumps over the lazy dog. Hello world, how are you?"
                              for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    return folder / "sp.model"


def test_merge_keeps_every_tokenizer_file_the_converter_reads(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    work = tmp_path / "work"
    work.mkdir()
    sp = _sentencepiece_model(work)
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(sp, base / "tokenizer.model")
    tok = LlamaTokenizer(vocab_file=str(base / "tokenizer.model"))
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(base)
    shutil.copy(sp, base / "tokenizer.model")  # as on the Hub: the SentencePiece model beside tokenizer.json
    (base / "added_tokens.json").write_text(json.dumps({t: tok.convert_tokens_to_ids(t)
                                                       for t in ["<|user|>", "<|assistant|>", "<|end|>"]}))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(base)

    out = tmp_path / "merged"
    info = merge.merge(base_dir=base, adapter_dir=None, model_dir=base, out_dir=out)
    assert info["end_of_turn"] == "<|end|>"
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    assert json.loads((out / "added_tokens.json").read_text()) == json.loads((base / "added_tokens.json").read_text())
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    contents = {v["content"]: v["special"] for v in decoder.values()}
    assert contents["<|end|>"] is True and contents["<|assistant|>"] is True
