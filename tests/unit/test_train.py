"""The train stage on a tiny random Llama: numerics (packed == padded, golden losses), outputs, stopping, methods."""

from __future__ import annotations

import json
import math

import pytest
from train_fixtures import example_pairs, load_model, prepared, synthetic_rows, train_losses, val_losses

from finetune import train
from finetune.errors import UserError
from finetune.run import artifacts
from finetune.training import attention, batching, steps

# Loss of the first four steps on the tiny seeded model (fp32, batch 4, lr 1e-2, constant schedule, seed 42).
# A change here means the training numerics changed: find out why before updating the numbers.
GOLDEN_FIRST_LOSSES = [10.78651, 10.6673, 10.40796, 10.31783]


@pytest.mark.parametrize("attn", ["packed-sdpa", "sdpa", "eager"])
def test_packed_batch_gives_the_same_logits_as_padded(tiny_model_dir, attn):
    import torch

    attn = attention.register() if attn == "packed-sdpa" else attn
    examples = example_pairs(4, seed=3)
    padded = batching.collate_padded(examples, pad_id=0)
    packed = batching.collate_packed(examples)
    with torch.no_grad():
        reference = load_model(tiny_model_dir, "sdpa")(input_ids=padded["input_ids"],
                                                  attention_mask=padded["attention_mask"]).logits
        batch = {k: v for k, v in packed.items() if k != "labels"}
        logits = load_model(tiny_model_dir, attn)(**batch, use_cache=False).logits[0]
    bounds = packed["cu_seq_lens_q"].tolist()
    assert len(bounds) == len(examples) + 1
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        torch.testing.assert_close(logits[a:b], reference[i, : b - a], atol=1e-4, rtol=1e-4)


def test_packed_loss_equals_padded_loss_and_keeps_only_trained_logits(tiny_model_dir):
    import torch

    examples = example_pairs(6, seed=5)
    with torch.no_grad():
        padded = steps.forward_loss_sum(load_model(tiny_model_dir, "sdpa"), batching.collate_padded(examples, pad_id=0))
        packed = steps.forward_loss_sum(load_model(tiny_model_dir, attention.register()),
                                        batching.collate_packed(examples))
    assert batching.count_targets(examples) > 0
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-4)


def test_peft_honours_cast_input_dtype_enabled(tiny_model_dir):
    """train turns peft's per-adapter fp32 input cast off for bf16 mixed precision on CPU (cast_input_dtype_enabled):
    this fails if peft renames or ignores that switch."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_model_dir, "sdpa").to(torch.bfloat16),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # peft keeps adapters in fp32 over bf16
    x = torch.ones(2, 3, 64, dtype=torch.bfloat16)
    assert layer._cast_input_dtype(x, torch.float32).dtype == torch.float32
    layer.cast_input_dtype_enabled = False
    assert layer._cast_input_dtype(x, torch.float32).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and layer.lora_B["default"].weight.grad.dtype == torch.float32


def test_varlen_attention_refuses_padded_batches(tiny_model_dir):
    import torch

    model = load_model(tiny_model_dir, attention.register())
    with pytest.raises(RuntimeError, match="packed"):
        model(input_ids=torch.ones(2, 5, dtype=torch.long))


def test_golden_first_losses(tmp_path, tiny_model_dir):
    recipe = prepared(tmp_path, tiny_model_dir, model={"dtype": "float32"}, max_steps=4, batch_size=4, lr=1e-2,
                      scheduler="constant", log_every=1, eval_every=100, save_every=100)
    train.run(recipe)
    losses = [loss for _, loss in train_losses(recipe.run_dir("train") / "log.jsonl")]
    assert losses == pytest.approx(GOLDEN_FIRST_LOSSES, abs=1e-3)


def test_outputs_follow_the_contract_and_loss_falls(tmp_path, tiny_model_dir):
    recipe = prepared(tmp_path, tiny_model_dir, epochs=3, batch_size=8, lr=1e-2, log_every=2, eval_every=6,
                      save_every=4, keep_checkpoints=2)
    summary = train.run(recipe)
    out = recipe.run_dir("train")
    assert json.loads((out / "summary.json").read_text()) == summary
    for key in ("steps", "tokens_seen", "seconds", "tokens_per_s", "peak_memory_mb", "best_step", "best_val_loss",
                "final_train_loss", "final_val_loss", "stopped_early"):
        assert key in summary
    assert summary["steps"] == 18 and summary["stop_reason"] == "completed" and summary["stopped_early"] is False
    assert summary["tokens_seen"] == 3 * sum(synthetic_rows(48, 0)["length"])
    assert summary["peak_memory_mb"] > 100
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"]["adapter"] == "train/adapter"  # relative to the run folder
    trained = artifacts.load(recipe, artifacts.Trained)
    assert trained.adapter == out / "adapter" and trained.model is None
    assert trained.method == "lora" and trained.log == out / "log.jsonl"
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "adapter" / "tokenizer.json").exists()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["checkpoint-12", "checkpoint-16"]
    assert any((out / "tb").iterdir())
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert set(lines[0]) == {"step", "epoch", "loss", "val_loss", "lr", "tokens", "tokens_per_s", "time"}
    losses = [loss for _, loss in train_losses(out / "log.jsonl")]
    vals = [v for _, v in val_losses(out / "log.jsonl")]
    assert len(vals) == 3 and summary["final_val_loss"] == vals[-1] and summary["best_val_loss"] == min(vals)
    assert losses[-1] < losses[0] - 0.5 and vals[0] > vals[1] > vals[2]
    # bf16 base (this CPU has bf16) with fp32 adapter weights: updates stay exact
    assert summary["trainable_dtype"] == "float32"
    # the saved adapter loads with plain peft on the base model and reproduces the best validation loss
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    from datasets import load_from_disk

    val = load_from_disk(str(recipe.run_dir("prepare") / "tokenized" / "validation"))
    examples = list(zip(val["input_ids"], val["labels"], strict=True))
    with torch.no_grad():
        loss = float(steps.forward_loss_sum(model, batching.collate_padded(examples, 0))) / batching.count_targets(examples)
    assert loss == pytest.approx(summary["best_val_loss"], rel=0.02)  # bf16 training base vs fp32 reload


def test_early_stopping_when_validation_stops_improving(tmp_path, tiny_model_dir):
    # a learning rate so small that weights never change: validation loss is flat, never "improves"
    recipe = prepared(tmp_path, tiny_model_dir, model={"dtype": "float32"}, max_steps=20, lr=1e-30,
                      scheduler="constant", eval_every=1, early_stopping_patience=2, save_every=100)
    summary = train.run(recipe)
    assert summary["steps"] == 3 and summary["stop_reason"] == "early_stopping" and summary["stopped_early"]
    assert summary["best_step"] == 1 and summary["weights_step"] == 1
    assert (recipe.run_dir("train") / "manifest.json").exists()


def test_on_eval_callback_stops_training(tmp_path, tiny_model_dir):
    seen = []

    def on_eval(step: int, val_loss: float) -> bool:
        seen.append((step, val_loss))
        return step >= 4

    recipe = prepared(tmp_path, tiny_model_dir, max_steps=20, eval_every=2, save_every=100)
    out = tmp_path / "trial"
    summary = train.run(recipe, on_eval=on_eval, out_dir=out)
    assert [s for s, _ in seen] == [2, 4] and all(math.isfinite(v) for _, v in seen)
    assert summary["steps"] == 4 and summary["stop_reason"] == "on_eval"
    assert (out / "adapter").is_dir() and (out / "manifest.json").exists()
    assert not recipe.run_dir("train").exists()


def test_full_fine_tuning_keeps_the_best_validation_weights(tmp_path, tiny_model_dir):
    """A learning rate that overshoots: validation loss gets worse after its best step, and the saved model is the
    best step's (not the last one's), reproducing its validation loss."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    recipe = prepared(tmp_path, tiny_model_dir, method="full", max_steps=8, lr=0.05, scheduler="constant",
                      eval_every=1, save_every=100, model={"dtype": "float32"})
    summary = train.run(recipe)
    out = recipe.run_dir("train")
    assert summary["best_step"] < summary["steps"] and summary["final_val_loss"] > summary["best_val_loss"]
    assert summary["weights_step"] == summary["best_step"]
    assert not (out / "best-model").exists() and not (out / "model" / "finetune_step.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32, attn_implementation="sdpa")
    val = load_from_disk(str(recipe.run_dir("prepare") / "tokenized" / "validation"))
    examples = list(zip(val["input_ids"], val["labels"], strict=True))
    with torch.no_grad():
        loss = float(steps.forward_loss_sum(model.eval(), batching.collate_padded(examples, pad_id=0)))
    assert loss / batching.count_targets(examples) == pytest.approx(summary["best_val_loss"], rel=1e-3)


def test_full_fine_tuning_saves_a_plain_model(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = prepared(tmp_path, tiny_model_dir, method="full", max_steps=3, lr=1e-3, save_every=100, eval_every=3)
    summary = train.run(recipe)
    out = recipe.run_dir("train")
    trained = artifacts.load(recipe, artifacts.Trained)
    assert trained.model == out / "model" and trained.adapter is None
    assert summary["trainable_dtype"] == "float32"  # fp32 master weights for full fine-tuning
    assert attention.NAME not in (out / "model" / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    changed = [n for n, p in model.state_dict().items() if n in before and not torch.equal(p, before[n])]
    assert len(changed) > 10


@pytest.mark.parametrize("method,rslora", [("dora", False), ("lora", True)])
def test_dora_and_rslora_build_and_train(tmp_path, tiny_model_dir, method, rslora):
    recipe = prepared(tmp_path, tiny_model_dir, method=method, lora={"r": 4, "alpha": 8, "rslora": rslora,
                      "target_modules": ["q_proj", "v_proj"]}, max_steps=2, save_every=100, eval_every=100)
    summary = train.run(recipe)
    cfg = json.loads((recipe.run_dir("train") / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is (method == "dora") and cfg["use_rslora"] is rslora
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert summary["steps"] == 2 and math.isfinite(summary["final_train_loss"])


@pytest.mark.parametrize("setting,message", [({"method": "qlora"}, "train.method: qlora needs a CUDA GPU"),
                                             ({"kernels": "liger"}, "train.kernels: liger needs a CUDA GPU")])
def test_cuda_only_settings_without_cuda_are_a_clear_error(tmp_path, tiny_model_dir, setting, message):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: these run (tests/unit/test_train_cuda.py)")
    recipe = prepared(tmp_path, tiny_model_dir, max_steps=2, **setting)
    with pytest.raises(UserError, match=message):
        train.run(recipe)


def test_unknown_target_module_is_a_user_error(tmp_path, tiny_model_dir):
    recipe = prepared(tmp_path, tiny_model_dir, lora={"target_modules": ["no_such_proj"]}, max_steps=1)
    with pytest.raises(UserError, match="target_modules"):
        train.run(recipe)


def test_train_needs_prepare_first(tmp_path, tiny_model_dir):
    from finetune import recipe as recipe_mod

    recipe = recipe_mod.validate_dict({"name": "x", "runs_dir": str(tmp_path), "model": {"id": str(tiny_model_dir)}})
    with pytest.raises(UserError, match="finetune prepare"):
        train.run(recipe)


def test_resume_refuses_changed_settings(tmp_path, tiny_model_dir):
    recipe = prepared(tmp_path, tiny_model_dir, max_steps=6, save_every=2, eval_every=100)
    train.run(recipe, on_eval=None)
    from finetune import recipe as recipe_mod

    changed = recipe_mod.with_overrides(recipe, {"train.lr": 1e-3})
    (changed.run_dir("train") / "manifest.json").unlink()  # as if interrupted
    with pytest.raises(UserError, match="other settings"):
        train.run(changed, resume=True)
    # without --resume an interrupted run with other settings starts over
    assert train.run(changed)["steps"] == 6


def test_schedule_is_deterministic_and_groups_like_data_parallel():
    lengths = [5 + (i * 7) % 40 for i in range(50)]
    one = batching.schedule(lengths, batch_size=4, batch_tokens=None, micro_batches_per_step=2, seed=1, epochs=2,
                            max_steps=None)
    again = batching.schedule(lengths, batch_size=4, batch_tokens=None, micro_batches_per_step=2, seed=1, epochs=2,
                              max_steps=None)
    assert one == again and len(one) == 2 * math.ceil(13 / 2)
    seen = [i for step in one[: len(one) // 2] for mb in step.micro_batches for i in mb]
    assert sorted(seen) == list(range(50))  # every example exactly once per epoch
    assert one[0].micro_batches != one[len(one) // 2].micro_batches  # reshuffled each epoch
    half = batching.schedule(lengths, batch_size=4, batch_tokens=None, micro_batches_per_step=2, seed=1, epochs=0.5,
                             max_steps=None)
    assert len(half) == 4 and half == one[:4]
    capped = batching.schedule(lengths, batch_size=4, batch_tokens=None, micro_batches_per_step=2, seed=1, epochs=1,
                               max_steps=20)
    assert len(capped) == 20  # max_steps wins over epochs
    by_tokens = batching.plan_epoch(lengths, batch_size=4, batch_tokens=100, seed=1, epoch=0)
    assert all(sum(lengths[i] for i in b) <= 100 or len(b) == 1 for b in by_tokens)


def test_length_grouping_reduces_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(400)]
    grouped = batching.plan_epoch(lengths, batch_size=8, batch_tokens=None, seed=0, epoch=0)
    order = list(range(400))
    rng.shuffle(order)
    plain = [order[i:i + 8] for i in range(0, 400, 8)]

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 5


def test_max_minutes_stops_logs_validates_and_can_be_continued(tmp_path, tiny_model_dir):
    from finetune import recipe as recipe_mod

    recipe = prepared(tmp_path, tiny_model_dir, max_steps=6, max_minutes=1e-6, log_every=5, eval_every=5)
    summary = train.run(recipe)
    out = recipe.run_dir("train")
    assert summary["steps"] == 1 and summary["stop_reason"] == "max_minutes" and summary["stopped_early"]
    assert train_losses(out / "log.jsonl")[0][0] == 1 and val_losses(out / "log.jsonl")[0][0] == 1
    assert summary["final_val_loss"] is not None and (out / "checkpoints" / "checkpoint-1").is_dir()
    # a longer time budget is not another run: --resume continues the stopped one
    longer = recipe_mod.with_overrides(recipe, {"train.max_minutes": None})
    assert train.run(longer, resume=True)["steps"] == 6
