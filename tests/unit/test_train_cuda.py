"""The train stage on a CUDA GPU: the paths a CPU cannot run (QLoRA, 8-bit AdamW, bf16 autocast for full
fine-tuning, Liger kernels, the out-of-memory error). Skipped where there is no GPU, which includes CI.

On a GPU machine (see scripts/gpu_check.sh): ``pytest tests/unit/test_train_cuda.py tests/unit/test_train.py``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU here", allow_module_level=True)

from train_fixtures import example_pairs, load_model, prepared, train_losses, val_losses  # noqa: E402

from finetune import train  # noqa: E402
from finetune.errors import UserError  # noqa: E402
from finetune.training import attention, batching, model_setup, steps  # noqa: E402


def _cuda_model(model_dir, attn: str, dtype, liger: bool = False):
    model = load_model(model_dir, attn, dtype, device="cuda")
    if liger:
        assert model_setup.apply_liger(model) == "liger"  # the instance only (see the last test)
    return model


def _on_cuda(batch):
    return {k: v.to("cuda") if hasattr(v, "to") else v for k, v in batch.items()}


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_packed_batch_gives_the_same_logits_as_padded_on_cuda(tiny_model_dir, dtype, tol):
    dtype = getattr(torch, dtype)
    examples = example_pairs(6, seed=3)
    padded = _on_cuda(batching.collate_padded(examples, pad_id=0))
    packed = _on_cuda(batching.collate_packed(examples))
    with torch.no_grad():
        reference = _cuda_model(tiny_model_dir, "sdpa", dtype)(input_ids=padded["input_ids"],
                                                               attention_mask=padded["attention_mask"]).logits
        batch = {k: v for k, v in packed.items() if k != "labels"}
        logits = _cuda_model(tiny_model_dir, attention.register(), dtype)(**batch, use_cache=False).logits[0]
    bounds = packed["cu_seq_lens_q"].tolist()
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        torch.testing.assert_close(logits[a:b].float(), reference[i, : b - a].float(), atol=tol, rtol=tol)


def test_liger_kernels_keep_the_packed_loss(tiny_model_dir):
    """Liger's fused RMSNorm/SwiGLU/RoPE (applied by train on CUDA) give the loss of the plain model on packed rows."""
    pytest.importorskip("liger_kernel")
    examples = example_pairs(8, seed=5)
    batch = _on_cuda(batching.collate_packed(examples))
    with torch.no_grad():
        plain = steps.forward_loss_sum(_cuda_model(tiny_model_dir, attention.register(), torch.float32), batch)
        fused = steps.forward_loss_sum(_cuda_model(tiny_model_dir, attention.register(), torch.float32, liger=True),
                                       batch)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("method,optimizer", [("lora", "adamw"), ("lora", "adamw_8bit"), ("dora", "adamw"),
                                              ("qlora", "adamw"), ("qlora", "adamw_8bit"), ("full", "adamw")])
def test_each_method_trains_on_cuda(tmp_path, tiny_model_dir, method, optimizer):
    lr = 1e-3 if method == "full" else 1e-2
    recipe = prepared(tmp_path, tiny_model_dir, method=method, optimizer=optimizer, epochs=3, batch_size=8, lr=lr,
                      log_every=2, eval_every=6, save_every=100)
    summary = train.run(recipe)
    out = recipe.run_dir("train")
    assert summary["device"].startswith("cuda") and summary["stop_reason"] == "completed"
    losses = [loss for _, loss in train_losses(out / "log.jsonl")]
    assert losses[-1] < losses[0] - 0.5, losses
    vals = [v for _, v in val_losses(out / "log.jsonl")]
    assert len(vals) >= 2 and min(vals) < vals[0]
    assert summary["peak_memory_mb"] > 0
    if method == "qlora":
        assert summary["base_dtype"] == "nf4"
        assert summary["trainable_dtype"] == "float32"
    elif method == "full":
        assert summary["base_dtype"] is None and summary["trainable_dtype"] == "float32"  # fp32 master weights
        assert (out / "model" / "model.safetensors").exists()
    else:
        assert summary["base_dtype"] == "bfloat16" and summary["trainable_dtype"] == "float32"
    if method != "full":
        assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert summary["kernels"] is None  # Liger only when asked (train.kernels=liger)
    print(f"{method}/{optimizer}: losses {losses[0]:.3f} -> {losses[-1]:.3f}, val {vals[0]:.3f} -> {vals[-1]:.3f}, "
          f"{summary['tokens_per_s']} tok/s, peak {summary['peak_memory_mb']} MB, attn {summary['attn_implementation']}")


def test_qlora_starts_where_lora_starts(tmp_path, tiny_model_dir):
    """4-bit NF4 base weights change the first loss only by quantization error (same data, seed and adapter init)."""
    first = {}
    for method in ("lora", "qlora"):
        recipe = prepared(tmp_path / method, tiny_model_dir, method=method, max_steps=1, batch_size=8, log_every=1,
                          eval_every=100, save_every=100)
        train.run(recipe)
        first[method] = train_losses(recipe.run_dir("train") / "log.jsonl")[0][1]
    assert first["qlora"] == pytest.approx(first["lora"], rel=0.02), first


def test_cuda_out_of_memory_is_a_clear_error(tmp_path, tiny_model_dir):
    """A step that does not fit: gradient checkpointing is switched on and the step retried, then a UserError
    that names the knobs (no traceback, no hang)."""
    recipe = prepared(tmp_path, tiny_model_dir, n_train=256, batch_size=256, max_steps=1, eval_every=100,
                      save_every=100)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    # the tiny model's weights and state take a few MB; one step's 49k-wide logits over ~5k trained tokens
    # take about 3 GB: a 256 MB cap lets the model load and makes the step fail
    torch.cuda.set_per_process_memory_fraction(256 * 2**20 / total, 0)
    try:
        with pytest.raises(UserError) as err:
            train.run(recipe)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    message = str(err.value)
    assert "CUDA out of memory" in message and "gradient checkpointing on" in message
    assert "train.batch_size=128 train.grad_accum=2" in message and "finetune plan" in message


def test_liger_leaves_the_transformers_module_as_it_was(tmp_path, tiny_model_dir):
    """Liger patches the model instance only: a model built afterwards (say on the CPU) is plain transformers."""
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    before = dict(vars(modeling_llama))
    recipe = prepared(tmp_path, tiny_model_dir, kernels="liger", max_steps=2, eval_every=100, save_every=100)
    assert train.run(recipe)["kernels"] == "liger"
    assert {k: v for k, v in vars(modeling_llama).items() if before.get(k) is not v} == {}
    assert set(vars(modeling_llama)) == set(before)
