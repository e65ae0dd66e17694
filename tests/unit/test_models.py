"""Model resolution: embedded default offline, local folders, clear errors."""

from __future__ import annotations

import time

import pytest

from finetune import models
from finetune.errors import UserError


def test_embedded_default_answers_offline_and_second_load_is_cached(embedded_model):
    import torch

    # the fixture already converted it once; resolving again must be a cache hit
    t0 = time.perf_counter()
    again = models.resolve(models.EMBEDDED_MODEL)
    resolve_s = time.perf_counter() - t0
    assert again.path == embedded_model.path
    assert resolve_s < 1.0, f"cached resolve took {resolve_s:.2f}s"
    assert (again.path / "model.safetensors").exists()
    tok = models.load_tokenizer(again.path)
    model = models.load_model(again, "float32")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_local_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="safetensors only"):
        models.resolve(str(tmp_path))


def test_uncached_hub_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        models.resolve("nobody-here/not-a-model-xyz")


def test_nonsense_model_id(tmp_path):
    with pytest.raises(UserError, match="is not a folder, a .gguf file, a Hub id"):
        models.resolve("not a model")
