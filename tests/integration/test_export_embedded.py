"""export on the real embedded model (SmolLM2-135M-Instruct): the parity thresholds mean something here.

A tiny random model has near-uniform logits; this one is a real instruct model, so F16 top-1 agreement and
the quantized types' losses are the numbers a user sees. About a minute of conversion on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_embedded_model_exports_with_parity(embedded_model, tmp_path):
    from finetune import export
    from finetune.gguf import runtime

    result = export.export_model(name="smol", out_dir=tmp_path, base_dir=None, model_dir=Path(embedded_model.path),
                                 quantizations=["Q8_0", "Q4_K_M"], log=lambda *_: None)
    report = json.loads(Path(result["parity"]).read_text())
    assert report["ok"], report["failed"]
    assert report["tokenization"]["ok"] and report["chat_prompt"]["ok"]
    f16, q8, q4 = (report["types"][t]["logits"] for t in ("F16", "Q8_0", "Q4_K_M"))
    assert f16["top1_agreement"] >= 0.99 and f16["kl_mean"] < 1e-3
    # Quantization costs a small model a lot, and more the fewer the bits.
    assert f16["kl_mean"] < q8["kl_mean"] < q4["kl_mean"]
    assert q8["top1_agreement"] >= 0.80 and q4["top1_agreement"] >= 0.62
    assert report["greedy_chat"]["gguf_stopped"] >= 1
    answer = runtime.chat(result["gguf"]["F16"], [[{"role": "user", "content": "What is the capital of France?"}]],
                          max_tokens=32)[0]
    assert "Paris" in answer["text"] and answer["finish_reason"] == "stop"
