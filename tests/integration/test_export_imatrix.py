"""The importance matrix for real, on a tiny random Llama 256 wide converted to an F16 GGUF: collected from the
model's own activations, written in llama.cpp's imatrix GGUF format, and guiding llama.cpp's quantizer.

The model is 256 wide because llama.cpp's k- and i-quants work on 256-wide blocks; narrower rows fall back to other
types and would hide what the importance matrix does. The quantization table's pick: tests/unit/test_export_quant.py.
"""

from __future__ import annotations

import pytest

from finetune.errors import UserError
from finetune.gguf import imatrix, runtime


@pytest.fixture(scope="module")
def wide_model(tokenizer_dir, tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune.gguf import convert

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("wide-model")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    f16 = convert.convert_model(out, out / "m-F16.gguf", "F16")
    ids = tok("The quick brown fox jumps over the lazy dog. " * 80)["input_ids"]
    return out, f16, [ids[:300], ids[300:600]]


def test_importance_is_the_mean_squared_input_of_each_linear_layer(wide_model, tmp_path):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, f16, sequences = wide_model
    importance = imatrix.collect(model_dir, sequences, chunk=256, max_tokens=512)
    assert (importance.tokens, importance.chunks) == (512, 2)
    # the same sums, by hand, for one layer: the input of layer 1's down projection (in the dtype collect runs in)
    from finetune import hardware

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=hardware.torch_dtype("auto", "cpu"))
    seen = []
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0][0]))
    stream = [t for s in sequences for t in s][:512]
    with torch.no_grad():
        for start in (0, 256):
            model(input_ids=torch.tensor([stream[start:start + 256]]))
    want = (torch.cat(seen).float() ** 2).sum(0).numpy()
    got = np.asarray(importance.sums["model.layers.1.mlp.down_proj"])
    np.testing.assert_allclose(got, want, rtol=1e-4)

    out = tmp_path / "imatrix.gguf"
    info = imatrix.write(importance, gguf_model=f16, out_file=out, datasets=["test"])
    assert info["entries"] == 2 * 7 + 1  # q k v o gate up down per layer, and the output head
    loaded = imatrix.load(out)
    np.testing.assert_allclose(loaded["blk.1.ffn_down.weight"], got / 512, rtol=1e-5)
    assert len(loaded["output.weight"]) == 256


def test_quantization_uses_the_importance_matrix(wide_model, tmp_path):
    model_dir, f16, sequences = wide_model
    matrix = tmp_path / "imatrix.gguf"
    imatrix.write(imatrix.collect(model_dir, sequences, chunk=256, max_tokens=512), gguf_model=f16, out_file=matrix,
                  datasets=["test"])
    plain, guided = tmp_path / "plain.gguf", tmp_path / "guided.gguf"
    runtime.quantize(f16, plain, "Q4_K_M")
    runtime.quantize(f16, guided, "Q4_K_M", imatrix=matrix)
    assert plain.stat().st_size == guided.stat().st_size
    assert plain.read_bytes() != guided.read_bytes()  # same types, other rounding choices
    with pytest.raises(UserError, match="importance matrix"):
        runtime.quantize(f16, tmp_path / "iq2.gguf", "IQ2_XXS")
    runtime.quantize(f16, tmp_path / "iq2.gguf", "IQ2_XXS", imatrix=matrix)
    assert (tmp_path / "iq2.gguf").stat().st_size < plain.stat().st_size


def test_imatrix_file_that_is_not_one_is_refused(wide_model):
    _, f16, _ = wide_model
    with pytest.raises(UserError, match="not an importance-matrix GGUF"):
        imatrix.load(f16)
