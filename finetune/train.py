"""``finetune train RECIPE``: the prepared, tokenized splits -> a LoRA/rsLoRA/DoRA/QLoRA adapter or a full model.

Readable top to bottom: ``run`` loads the data and the model, plans every optimizer step up front, then runs the
loop (forward, backward, clip, step; validate, checkpoint, log). The maths is transformers/peft/torch (model,
adapters, optimizers, ``get_scheduler``) and accelerate (device placement, data-parallel gradient sync); the loop
is ours, on purpose:

- speed: padding-free packed batches (one row, positions restarting per example, per-example causal attention)
  and logits computed only where a label is trained (``logits_to_keep``): with assistant-only loss most
  positions need no 49k-wide vocabulary projection. The Trainer computes every logit of every padded position.
- exact resumption: the step schedule is a pure function of (seed, epoch), so a resumed run continues at
  ``schedule[step]`` with the optimizer, scheduler and RNG states restored, and a data-parallel run with N
  processes groups the same micro-batches as one process accumulating N: the two give the same updates.
- one loss normalisation everywhere: the loss of a step is (sum of token losses) / (trained tokens in the whole
  step, all micro-batches and processes). Accumulation and data parallelism change nothing about the update.

Outputs (runs/<name>/train/): adapter/ or model/, checkpoints/checkpoint-<step>/, tb/, log.jsonl, summary.json,
manifest.json (written last: the stage is finished exactly when it exists). They are built in
runs/<name>/.train.partial/ and replace train/ only when the run succeeds: a failed or interrupted run leaves the
previous adapter as it was, and its checkpoints stay in .train.partial/ to resume from.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from finetune import runs
from finetune.errors import UserError
from finetune.training import batching, preference
from finetune.training import checkpoint as ckpt

ADAPTER_METHODS = ("lora", "dora", "qlora")
BEST_FULL_DIR = "best-model"  # full fine-tuning: the best validation step's weights, until the run ends
# Settings that can change between an interrupted run and its resumption without changing what it computes.
RESUMABLE_CHANGES = {"max_minutes", "eval_every", "save_every", "keep_checkpoints", "early_stopping_patience",
                     "threads", "log_every"}


def run(recipe, *, resume: bool = False, on_eval: Callable[[int, float], bool] | None = None,
        out_dir: str | Path | None = None, recipe_path: str = "RECIPE") -> dict[str, Any]:
    """Train; returns the summary. ``on_eval(step, val_loss)`` returning True stops training (tune's pruning).

    An interrupted run (checkpoints but no manifest) is resumed automatically when its settings match;
    ``resume=True`` insists on resuming (also a finished run that stopped early) and says why it cannot.
    Everything that can be checked (settings vs this machine, fresh prepared data, the model) is checked
    before anything is written.
    """
    import torch
    from accelerate import Accelerator

    t = recipe.train
    out = Path(out_dir) if out_dir is not None else recipe.run_dir("train")
    # Without CUDA, train on the CPU (accelerate only sets up multi-process gloo training when told cpu=True).
    # Precision is finetune's (model.dtype, autocast below), not an accelerate config's mixed_precision.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    _check_distributed(accelerator)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(t.threads or max(1, _cores() // local_procs))
    device_type = accelerator.device.type
    check_settings(recipe, device_type)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the summary's peak memory is this run's

    # ---- data: tokenized by prepare; nothing is tokenized here
    from finetune import pipeline

    prepare = pipeline.require_fresh(recipe, "prepare", recipe_path)
    tokenized = _tokenized_paths(recipe, prepare)
    objective = t.objective
    if objective == "sft":
        train_rows = _load_rows(tokenized["train"], "train")
        val_rows = _load_rows(tokenized["validation"], "validation") if tokenized.get("validation") else []
        if not any(any(x != -100 for x in labels[1:]) for _, labels in train_rows):
            raise UserError(f"{tokenized['train']}: no example has a trained token (every label is -100). "
                            "Check data.train_on and that conversations end with an assistant turn, then rerun "
                            "prepare.")
        lengths = [len(ids) for ids, _ in train_rows]
    else:
        train_rows = preference.load_rows(tokenized["train"], "train", objective)
        val_rows = (preference.load_rows(tokenized["validation"], "validation", objective)
                    if tokenized.get("validation") else [])
        lengths = [r.length for r in train_rows]
    pref_settings = preference.Settings(objective, t.preference.beta, t.preference.desirable_weight,
                                        t.preference.undesirable_weight)
    micro_per_step = t.grad_accum * world
    # ---- the model must resolve before anything is written (its architecture decides packing)
    from finetune import models

    resolved = models.resolve(recipe.model.id, recipe.model.revision, base_dir=recipe.base_dir,
                              trust_remote_code=recipe.model.trust_remote_code, gated=recipe.model.gated)
    packing, packing_off = _packing(recipe, resolved.path, main)
    steps = batching.schedule(lengths, batch_size=t.batch_size,
                              batch_tokens=t.batch_tokens if packing else None,
                              micro_batches_per_step=micro_per_step, seed=recipe.seed, epochs=t.epochs,
                              max_steps=t.max_steps)
    data_fp = {split: runs.file_fingerprint(Path(p)) for split, p in tokenized.items()}
    fingerprint = _resume_fingerprint(recipe, data_fp, micro_per_step)
    if main and not val_rows:
        split = recipe.data.split
        why = ("data.split.validation is 0" if split.validation == 0
               else "no source has role: validation" if all(s.role != "all" for s in recipe.data.sources)
               else "too few rows or groups to carve one; see prepare's notes")
        print(f"train: the validation split is empty ({why}): training runs without validation loss, so early "
              "stopping and best-step selection are off; the final step's weights are saved.", file=sys.stderr)

    tokenizer = models.load_tokenizer(resolved, trust_remote_code=recipe.model.trust_remote_code,
                                      chat_template=recipe.chat_template_path())

    # ---- where to start: a fresh run, or the last complete checkpoint of an interrupted (or stopped) one.
    # Everything is written to the work folder, which replaces `out` only when the run succeeds.
    stage = runs.StageRun(recipe, "train", inputs={
        "prepare_manifest": runs.fingerprint_json(prepare.get("outputs", {})), "tokenized": data_fp,
        "base_model": {"id": recipe.model.id, "path": str(resolved.path), "revision": resolved.revision},
    }, upstream={"prepare": prepare}, aside=True, keep_partial=True, folder=out)
    work = stage.work
    start_ckpt, copy_from = _checkpoint_to_resume(out, work, fingerprint, resume)
    accelerator.wait_for_everyone()
    if main:
        runs.make_dir(out.parent)
        if copy_from is not None or start_ckpt is None:
            shutil.rmtree(work, ignore_errors=True)
        if copy_from is not None:
            runs.link_tree(copy_from, work)  # continue a finished run without touching it until this one ends
        stage.__enter__()
    accelerator.wait_for_everyone()

    # ---- model
    from transformers import set_seed

    set_seed(recipe.seed)  # adapter initialisation (and dropout) follow the recipe's seed
    model, attn, autocast_dtype, kernels = _build_model(recipe, resolved, device_type, accelerator.local_process_index,
                                                        packing=packing)
    gc_on = _gradient_checkpointing(recipe, model, device_type)
    if gc_on:
        _enable_gradient_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)

    from transformers import get_scheduler

    optimizer = _optimizer(t.optimizer, model, t.lr, t.weight_decay, device_type)
    warmup = math.ceil(t.warmup_ratio * len(steps))
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max(1, len(steps)))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    reference = val_reference = None
    if objective in preference.NEEDS_REFERENCE:
        reference = preference.Reference(raw_model, adapters=t.method in ADAPTER_METHODS, packing=packing,
                                         pad_id=tokenizer.pad_token_id, device=accelerator.device,
                                         autocast=lambda: _autocast(autocast_dtype, accelerator))
        if t.method == "full":  # no second copy of the weights: the base's log-probabilities, before any update
            if main:
                print(f"train: reference log-probabilities of {len(train_rows) + len(val_rows)} {objective} rows "
                      "(full fine-tuning: computed once, before the first update)", file=sys.stderr)
            reference.precompute(train_rows, objective, t.batch_size)
            val_reference = preference.Reference(raw_model, adapters=False, packing=packing,
                                                 pad_id=tokenizer.pad_token_id, device=accelerator.device,
                                                 autocast=lambda: _autocast(autocast_dtype, accelerator))
            if val_rows:
                val_reference.precompute(val_rows, objective, t.batch_size)
        else:
            val_reference = reference
    pref = {"settings": pref_settings, "reference": reference, "val_reference": val_reference}

    st = _fresh_state(fingerprint, micro_per_step)
    best_weights: dict[str, Any] | None = None
    if start_ckpt is not None:
        st, best_weights = _load_checkpoint(start_ckpt, raw_model, optimizer, scheduler, rank)
        if main:
            print(f"train: resuming from {start_ckpt} (step {st['step']} of {len(steps)})")

    # ---- bookkeeping (main process writes every file)
    if main:
        log_path = work / "log.jsonl"
        runs.atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in st["history"]))
        writer = _tensorboard(work / "tb", purge_step=st["step"] if start_ckpt else None)
    stop = _StopSignal()

    def record(entry: dict[str, Any]) -> None:
        st["history"].append(entry)
        if main:
            with open(work / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
            for key in ("loss", "val_loss", "lr", "tokens_per_s"):
                if entry.get(key) is not None:
                    writer.add_scalar(f"train/{key}" if key != "val_loss" else "eval/loss", entry[key], entry["step"])

    def save_checkpoint() -> None:
        _save_checkpoint(work / "checkpoints", st, raw_model, optimizer, scheduler, best_weights, accelerator,
                         t.keep_checkpoints)

    def validate(epoch: float) -> float:
        nonlocal best_weights
        extra: dict[str, Any] = {}
        if objective == "sft":
            val = _validation_loss(raw_model, val_rows, t, tokenizer, accelerator, autocast_dtype, packing)
        else:
            val, extra = _validation_preference(raw_model, val_rows, t, pref, tokenizer, accelerator, autocast_dtype,
                                                packing)
            st["last_val_reward"] = extra
        st["last_val_loss"] = val
        record({"step": st["step"], "epoch": round(epoch, 4), "loss": None, "val_loss": val,
                "lr": scheduler.get_last_lr()[0], "tokens": st["tokens"], "tokens_per_s": None,
                "time": round(st["elapsed"], 2), **extra})
        progress.note(f"step {st['step']}: validation loss {val:.4f}" + (
            f", reward accuracy {extra['reward_accuracy']:.3f}, margin {extra['reward_margin']:.4f}" if extra else ""))
        if st["best_val_loss"] is None or val < st["best_val_loss"]:
            st["best_val_loss"], st["best_step"], st["bad_evals"] = val, st["step"], 0
            if t.method in ADAPTER_METHODS:
                best_weights = _trainable_state(raw_model)
            elif main:  # a full model is too big to keep in memory: the best one so far goes to disk
                _save_model_dir(raw_model, tokenizer, work / BEST_FULL_DIR, attn, step=st["step"])
        else:
            st["bad_evals"] += 1
        return val

    # ---- the loop
    progress = _Progress(len(steps), st["step"], enabled=main)
    window = {"loss": 0.0, "targets": 0, "tokens": 0, "seconds": 0.0}
    session_start, elapsed_before = time.time(), st["elapsed"]
    stop_reason = "completed"
    model.train()
    try:
        while st["step"] < len(steps):
            step = steps[st["step"]]
            t0 = time.time()
            loss_sum, targets, tokens, gc_on = _train_step(model, optimizer, scheduler, step, train_rows, recipe,
                                                           tokenizer, accelerator, autocast_dtype, gc_on, packing,
                                                           pref)
            st["step"] += 1
            st["tokens"] += tokens
            dt = time.time() - t0
            st["train_seconds"] += dt
            st["elapsed"] = elapsed_before + time.time() - session_start
            window["loss"] += loss_sum
            window["targets"] += targets
            window["tokens"] += tokens
            window["seconds"] += dt
            st["last_loss"] = loss_sum / max(targets, 1)
            progress.update(st["step"], st["last_loss"], tokens / max(dt, 1e-9))

            last = st["step"] == len(steps)
            if st["step"] % t.log_every == 0 or last:
                st["window_loss"] = window["loss"] / max(window["targets"], 1)
                record({"step": st["step"], "epoch": round(step.epoch_progress, 4), "loss": st["window_loss"],
                        "val_loss": None, "lr": scheduler.get_last_lr()[0], "tokens": st["tokens"],
                        "tokens_per_s": round(window["tokens"] / max(window["seconds"], 1e-9), 2),
                        "time": round(st["elapsed"], 2)})
                window = {"loss": 0.0, "targets": 0, "tokens": 0, "seconds": 0.0}

            want_stop = False
            if val_rows and (st["step"] % t.eval_every == 0 or last):
                val = validate(step.epoch_progress)
                if t.early_stopping_patience is not None and st["bad_evals"] >= t.early_stopping_patience:
                    want_stop, stop_reason = True, "early_stopping"
                if on_eval is not None and main and on_eval(st["step"], val):
                    want_stop, stop_reason = True, "on_eval"
            if t.max_minutes is not None and st["elapsed"] >= t.max_minutes * 60 and not last:
                want_stop, stop_reason = True, "max_minutes"
            if stop.requested:
                want_stop, stop_reason = True, "interrupted"
            want_stop = _any_process(want_stop, accelerator)
            if want_stop and stop_reason == "completed":
                stop_reason = "stopped by another process"
            if (st["step"] % t.save_every == 0 and not last) or want_stop:
                save_checkpoint()  # a stopped run can be continued with --resume
            if want_stop:
                break
    finally:
        progress.close()
        stop.restore()
    if stop_reason == "interrupted":
        if main:
            writer.close()
            print(f"train: interrupted at step {st['step']}; checkpoint saved. Continue with "
                  "`finetune train RECIPE --resume`.", file=sys.stderr)
        raise KeyboardInterrupt
    if st["step"] > 0:
        epoch = steps[st["step"] - 1].epoch_progress
        if window["targets"]:  # stopped between log lines: log the steps since the last one
            st["window_loss"] = window["loss"] / window["targets"]
            record({"step": st["step"], "epoch": round(epoch, 4), "loss": st["window_loss"], "val_loss": None,
                    "lr": scheduler.get_last_lr()[0], "tokens": st["tokens"],
                    "tokens_per_s": round(window["tokens"] / max(window["seconds"], 1e-9), 2),
                    "time": round(st["elapsed"], 2)})
        if val_rows and not any(e["step"] == st["step"] and e["val_loss"] is not None for e in st["history"]):
            validate(epoch)  # stopped between evaluations: still end with one

    # ---- outputs: the weights of the best validation step (adapters: kept in memory; full: saved to disk)
    weights_step = st["step"]
    best_full = None
    if best_weights is not None and st["best_step"] != st["step"]:
        _load_trainable(raw_model, best_weights)
        weights_step = st["best_step"]
    elif t.method == "full" and st["best_step"] not in (None, st["step"]):
        marker = work / BEST_FULL_DIR / "finetune_step.json"
        if marker.exists() and json.loads(marker.read_text()).get("step") == st["best_step"]:
            best_full, weights_step = work / BEST_FULL_DIR, st["best_step"]
    summary = {
        "steps": st["step"], "planned_steps": len(steps), "tokens_seen": st["tokens"],
        "seconds": round(st["elapsed"], 2), "train_seconds": round(st["train_seconds"], 2),
        "tokens_per_s": round(st["tokens"] / max(st["train_seconds"], 1e-9), 2),
        "peak_memory_mb": _peak_memory_mb(device_type),
        "best_step": st["best_step"], "best_val_loss": st["best_val_loss"],
        "final_train_loss": st.get("window_loss", st.get("last_loss")), "final_val_loss": st["last_val_loss"],
        "stopped_early": stop_reason not in ("completed",), "stop_reason": stop_reason, "weights_step": weights_step,
        "method": t.method, "trainable_params": n_trainable, "device": str(accelerator.device), "processes": world,
        "attn_implementation": attn, "kernels": kernels, "packing": packing, "packing_off_reason": packing_off,
        "autocast_dtype": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else None, "gradient_checkpointing": bool(gc_on),
        "base_dtype": "nf4" if t.method == "qlora" else _dtype_name(p for p in raw_model.parameters()
                                                                      if not p.requires_grad),
        "trainable_dtype": _dtype_name(p for p in raw_model.parameters() if p.requires_grad),
        "validation_rows": len(val_rows), "objective": objective,
        "validation_reward": st.get("last_val_reward"),
        "validation": "on" if val_rows else "off: the validation split is empty (no validation loss, early stopping "
                                             "or best-step selection; the final step's weights are saved)",
    }
    if main:
        final_name = "model" if t.method == "full" else "adapter"
        final_dir = work / final_name
        if best_full is not None:
            shutil.rmtree(final_dir, ignore_errors=True)
            best_full.rename(final_dir)
            (final_dir / "finetune_step.json").unlink(missing_ok=True)
        else:
            _save_model_dir(raw_model, tokenizer, final_dir, attn)
        shutil.rmtree(work / BEST_FULL_DIR, ignore_errors=True)
        runs.atomic_write_json(work / "summary.json", summary)
        writer.close()
        stage.outputs = {
            "adapter": str(out / final_name) if t.method != "full" else None,
            "model": str(out / final_name) if t.method == "full" else None,
            "method": t.method, "base_model": str(resolved.path), "log": str(out / "log.jsonl"),
            "summary": str(out / "summary.json"), "tensorboard": str(out / "tb"),
        }
        stage.extra["summary"] = summary
        stage.__exit__(None, None, None)
    accelerator.wait_for_everyone()
    return summary


def check_settings(recipe, device_type: str) -> None:
    """Settings this machine cannot run, refused before any data is read or any output touched."""
    from finetune import models

    t = recipe.train
    if t.method == "qlora" and device_type != "cuda":
        raise UserError("train.method: qlora needs a CUDA GPU (bitsandbytes 4-bit); none was found. "
                        "Use train.method=lora on this machine (it fits: the CPU has system memory).")
    if t.optimizer == "adamw_8bit" and device_type != "cuda":
        raise UserError("train.optimizer: adamw_8bit needs a CUDA GPU (bitsandbytes); use train.optimizer=adamw.")
    if t.kernels == "liger" and (device_type != "cuda" or not _installed("liger_kernel")):
        raise UserError("train.kernels: liger needs a CUDA GPU and `pip install liger-kernel`; use train.kernels=none.")
    models.check_attention(recipe.model.attn_implementation, device_type)


def _check_distributed(accelerator) -> None:
    """Data parallelism (DDP: every process holds the model) is what this loop does; sharded set-ups are refused."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise UserError(f"accelerate config: distributed_type {kind.value} is not supported by `finetune train`, "
                        "which trains data-parallel (DDP: each GPU holds the whole model). Use "
                        "recipes/accelerate/multi-gpu.yaml (or multi-node.yaml), and if the model does not fit one "
                        "GPU, train.method=qlora or train.gradient_checkpointing=on (`finetune plan RECIPE` says what "
                        "fits).")


# ------------------------------------------------------------------------------------------- one step
def _train_step(model, optimizer, scheduler, step: batching.Step, rows, recipe, tokenizer, accelerator,
                autocast_dtype, gc_on: bool, packing: bool, pref: dict[str, Any] | None = None
                ) -> tuple[float, int, int, bool]:
    """Forward/backward every micro-batch of this process, then one optimizer step. Returns the step's global
    (sum of token losses, trained tokens, input tokens) and whether gradient checkpointing is now on; for a
    preference objective (sum of per-pair or per-example losses, pairs or examples, input tokens)."""
    import torch

    t = recipe.train
    world, rank = accelerator.num_processes, accelerator.process_index
    objective = t.objective
    micro = [[rows[i] for i in mb] for mb in step.micro_batches]
    mine_idx = list(step.micro_batches)[rank::world]
    if objective == "sft":
        targets = sum(batching.count_targets(mb) for mb in micro)  # every process knows the whole step's plan
        tokens = sum(len(ids) for mb in micro for ids, _ in mb)
        # Loss of a step = sum of token losses / trained tokens of the whole step; DDP averages gradients over
        # processes, so each process scales by world.
        scale = world / max(targets, 1)
    else:
        # Loss of a step = mean over the step's pairs (KTO: examples); ORPO's NLL over the chosen trained tokens
        targets = sum(preference.units(mb) for mb in micro)
        chosen_targets = sum(preference.chosen_targets(mb) for mb in micro)
        tokens = sum(r.length for mb in micro for r in mb)
        scale = float(world)
    mine = micro[rank::world]
    # Every process must run as many backward passes as the others: one without data of its own in this step
    # repeats a micro-batch with weight 0 (only in the last, incomplete step of an epoch).
    per_process = math.ceil(len(micro) / world)
    work = [(mb, 1.0) for mb in mine] + [(micro[0], 0.0)] * (per_process - len(mine))
    work_idx = mine_idx + [step.micro_batches[0]] * (per_process - len(mine))
    for attempt in (1, 2):
        try:
            local_sum = 0.0
            for i, (mb, weight) in enumerate(work):
                sync = i == len(work) - 1
                with (nullcontext() if sync else accelerator.no_sync(model)), _autocast(autocast_dtype, accelerator):
                    if objective == "sft":
                        loss = loss_sum = forward_loss_sum(model, _collate(mb, packing, tokenizer,
                                                                           accelerator.device))
                    else:
                        res = _preference_batch(model, accelerator.unwrap_model(model), mb, work_idx[i], rows,
                                                pref["settings"], pref["reference"], packing, tokenizer,
                                                accelerator, step_units=targets, step_chosen_targets=chosen_targets)
                        loss, loss_sum = res.loss, torch.tensor(res.loss_sum)
                accelerator.backward(loss * (scale * weight))
                local_sum += float(loss_sum.detach()) * weight
            break
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if attempt == 1 and t.gradient_checkpointing == "auto" and not gc_on:
                print("train: out of GPU memory; switching gradient checkpointing on and retrying", file=sys.stderr)
                _enable_gradient_checkpointing(accelerator.unwrap_model(model))
                gc_on = True
                continue
            raise UserError(_oom_message(recipe, gc_on)) from None
    accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    total = local_sum
    if world > 1:
        total = float(accelerator.reduce(torch.tensor([local_sum], device=accelerator.device), "sum").item())
    return total, targets, tokens, gc_on


def _preference_batch(model, raw_model, rows_mb, indices, all_rows, settings, reference, packing: bool, tokenizer,
                      accelerator, *, step_units: int, step_chosen_targets: int) -> preference.BatchResult:
    """One micro-batch of a preference objective: policy forward (with gradients, through the DDP wrapper),
    reference and KTO's mismatched pairs without gradients (on the unwrapped model)."""
    pad_id, device = tokenizer.pad_token_id, accelerator.device

    def forward(seqs):
        return preference.sequence_logps(model, seqs, packing=packing, pad_id=pad_id, device=device)

    def no_grad_forward(seqs):
        return preference.sequence_logps(raw_model, seqs, packing=packing, pad_id=pad_id, device=device)

    return preference.batch_loss(forward, reference, rows_mb, indices, all_rows, settings, step_units=step_units,
                                 step_chosen_targets=step_chosen_targets, no_grad_forward=no_grad_forward)


def _validation_preference(model, rows, t, pref, tokenizer, accelerator, autocast_dtype, packing: bool
                           ) -> tuple[float | None, dict[str, Any]]:
    """The objective's mean loss over the validation rows, with reward accuracy and mean margin (chosen minus
    rejected implicit reward; KTO: mean reward, accuracy = rewards on the side of 0 their label asks for)."""
    import torch

    if not rows:
        return None, {}
    batches = batching.eval_batches([r.length for r in rows], batch_size=t.batch_size,
                                    batch_tokens=t.batch_tokens if packing else None)
    world, rank = accelerator.num_processes, accelerator.process_index
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, units, correct, margin
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in batches[rank::world]:
            with _autocast(autocast_dtype, accelerator):
                res = _preference_batch(model, model, [rows[i] for i in b], b, rows, pref["settings"],
                                        pref["val_reference"], packing, tokenizer, accelerator,
                                        step_units=len(b), step_chosen_targets=1)
            sums = [sums[0] + res.loss_sum, sums[1] + res.units, sums[2] + res.correct, sums[3] + res.margin_sum]
    if was_training:
        model.train()
    if world > 1:
        sums = accelerator.reduce(torch.tensor(sums, device=accelerator.device), "sum").tolist()
    n = max(sums[1], 1)
    return sums[0] / n, {"reward_accuracy": round(sums[2] / n, 4), "reward_margin": round(sums[3] / n, 4)}


def forward_loss_sum(model, batch: dict[str, Any]):
    """Sum of next-token cross-entropy over the trained positions of a batch (packed or padded).

    Packed batches ask the model for logits only at positions whose next token is trained
    (``logits_to_keep`` with indices), which skips most of the vocabulary projection.
    """
    import torch
    import torch.nn.functional as F

    batch = dict(batch)
    labels = batch.pop("labels")
    if "position_ids" in batch:  # packed: a single row
        targets = labels[0, 1:]
        keep = (targets != -100).nonzero().flatten()
        if keep.numel() == 0:
            # still run the whole graph (data-parallel processes expect gradients for every parameter)
            out = model(**batch, logits_to_keep=torch.zeros(1, dtype=torch.long, device=labels.device),
                        use_cache=False)
            return out.logits.float().sum() * 0.0
        out = model(**batch, logits_to_keep=keep, use_cache=False)
        return F.cross_entropy(out.logits[0].float(), targets[keep], reduction="sum")
    out = model(**batch, use_cache=False)
    logits = out.logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


def _collate(examples, packing: bool, tokenizer, device) -> dict[str, Any]:
    batch = batching.collate_packed(examples) if packing else batching.collate_padded(examples, tokenizer.pad_token_id)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def _autocast(dtype, accelerator):
    import torch

    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=accelerator.device.type, dtype=dtype)


def _validation_loss(model, rows, t, tokenizer, accelerator, autocast_dtype, packing: bool) -> float | None:
    """Mean token loss over the validation split (each process scores a share; sums are reduced)."""
    import torch

    if not rows:
        return None
    batches = batching.eval_batches([len(ids) for ids, _ in rows], batch_size=t.batch_size,
                                    batch_tokens=t.batch_tokens if packing else None)
    world, rank = accelerator.num_processes, accelerator.process_index
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in batches[rank::world]:
            examples = [rows[i] for i in b]
            with _autocast(autocast_dtype, accelerator):
                total += float(forward_loss_sum(model, _collate(examples, packing, tokenizer, accelerator.device)))
            count += batching.count_targets(examples)
    if was_training:
        model.train()
    if world > 1:
        sums = accelerator.reduce(torch.tensor([total, float(count)], device=accelerator.device), "sum")
        total, count = float(sums[0]), int(sums[1])
    return total / count if count else None


# ------------------------------------------------------------------------------------------- model
def _packing(recipe, model_dir: Path, main: bool) -> tuple[bool, str | None]:
    """Whether batches are packed: the recipe's train.packing, unless the architecture in ``model_dir`` cannot keep
    packed examples apart (then padded batches, said once). Returns (packing, why it is off)."""
    if not recipe.train.packing:
        return False, None
    from transformers import AutoConfig

    from finetune.training import attention

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=recipe.model.trust_remote_code)
    why = attention.packing_obstacle(config)
    if why is None:
        return True, None
    if main:
        print(f"train: packing off for this model: {why}; training on padded batches (same results, more padding)")
    return False, why


def _build_model(recipe, resolved, device_type: str, local_index: int, *, packing: bool):
    """Load the base model in the training dtype and wrap it for the method.

    Returns (model, attention implementation, autocast dtype, fused kernels applied: "liger" or None)."""
    import torch

    from finetune import models
    from finetune.training import attention

    t = recipe.train
    attn = recipe.model.attn_implementation
    if attn == "auto":
        if not packing:
            attn = "auto"  # transformers' own default for the architecture (sdpa, or eager where it has none)
        elif device_type == "cuda" and _installed("flash_attn"):
            attn = "flash_attention_2"
        else:
            attn = attention.register()  # per-example causal SDPA over packed rows
    dtype = recipe.model.dtype
    autocast_dtype = None
    if t.method == "full" and dtype == "auto":
        # Full fine-tuning keeps fp32 master weights (pure bf16 weights lose small updates); on a GPU the
        # maths runs in bf16 under autocast.
        dtype = "float32"
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            autocast_dtype = torch.bfloat16
    device = f"cuda:{local_index}" if device_type == "cuda" else "cpu"
    quant = None
    if t.method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=models.torch_dtype(dtype, "cuda"))
    model = models.load_model(resolved, dtype, device=device, trust_remote_code=recipe.model.trust_remote_code,
                              attn_implementation=attn, quantization_config=quant)
    attn = getattr(model.config, "_attn_implementation", attn)
    # NOTES.md: with use_cache=True a cache is built even in training and the packed mask is skipped:
    # examples then attend to each other silently.
    model.config.use_cache = False
    kernels = None
    if t.kernels == "liger":
        if device_type != "cuda" or not _installed("liger_kernel"):
            raise UserError("train.kernels: liger needs a CUDA GPU and `pip install liger-kernel`; "
                            "use train.kernels=none.")
        kernels = _apply_liger(model)
    if t.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, attn, autocast_dtype, kernels
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if t.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing == "on",
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = t.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                        use_rslora=lora.rslora, use_dora=t.method == "dora", task_type="CAUSAL_LM")
    try:
        # peft keeps adapter weights in fp32 over a bf16/fp16 base (autocast_adapter_dtype): stable updates
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"train.lora.target_modules: {exc}. Use 'all-linear' or names of the model's linear "
                        "layers (e.g. [q_proj, v_proj]).") from None
    base_dtype = next((p.dtype for p in model.parameters() if not p.requires_grad), None)
    if device_type == "cpu" and t.method in ("lora", "dora") and base_dtype in (torch.bfloat16, torch.float16):
        # Mixed precision, as a GPU run with bf16=True does: the adapter maths runs in the base dtype under
        # autocast while adapter weights, gradients and optimizer state stay fp32. peft would otherwise cast every
        # activation to fp32 and back around each adapter (scripts/bench_train.py: ~20% faster on 2 CPU cores, same
        # loss curve). tests/unit/test_train.py checks peft still honours cast_input_dtype_enabled.
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
        autocast_dtype = base_dtype
    return model, attn, autocast_dtype, kernels


def _apply_liger(model) -> str:
    """Liger's fused RMSNorm/SwiGLU Triton kernels on this model instance only; returns "liger".

    Liger's apply functions also replace classes and functions in the transformers modeling module (every model
    built later in the process, on any device, would get them: a CPU model then fails inside Triton). Those
    module attributes are put back right after; the instance keeps its patched modules. Liger's RoPE is such a
    module-level function, so it is not used. tests/unit/test_train_cuda.py checks the module is left as it was.
    """
    import importlib

    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as exc:
        raise UserError(f"train.kernels: liger could not be imported ({exc}).") from None
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise UserError(f"train.kernels: Liger has no kernels for model type {model.config.model_type!r}; "
                        "use train.kernels=none.")
    module = importlib.import_module(type(model).__module__)
    before = dict(vars(module))
    try:
        _apply_liger_kernel_to_instance(model=model, rope=False)
    except Exception as exc:
        raise UserError(f"train.kernels: Liger failed on this model ({type(exc).__name__}: {exc}); "
                        "use train.kernels=none.") from None
    finally:
        for name in set(vars(module)) - set(before):
            delattr(module, name)
        for name, value in before.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
    return "liger"


def _gradient_checkpointing(recipe, model, device_type: str) -> bool:
    """on/off as asked; auto: off on a CPU (system memory, ~25% slower otherwise), on a GPU only when the
    memory plan says training does not fit without it (an out-of-memory error later also switches it on)."""
    mode = recipe.train.gradient_checkpointing
    if mode != "auto":
        return mode == "on"
    if device_type != "cuda":
        return False
    try:
        import torch

        from finetune import plan

        free, _ = torch.cuda.mem_get_info()
        dims = plan.ModelDims.from_config(model.config.to_dict())
        settings = plan.settings_for(recipe, "cuda", gradient_checkpointing=False)
        return not plan.fits(plan.estimate(dims, settings), int(free * 0.9))
    except Exception as exc:  # the planner is advice; training still has the out-of-memory fallback
        print(f"train: memory plan unavailable ({type(exc).__name__}: {exc}); gradient checkpointing off",
              file=sys.stderr)
        return False


def _enable_gradient_checkpointing(model) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _optimizer(name: str, model, lr: float, weight_decay: float, device_type: str):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [g for g in ({"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                          {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}) if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=device_type == "cuda")
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)


def _oom_message(recipe, gc_on: bool) -> str:
    t = recipe.train
    gc = "on" if gc_on else "off"
    hints = [f"train.batch_size={max(1, t.batch_size // 2)} train.grad_accum={t.grad_accum * 2} "
             f"(now {t.batch_size} x {t.grad_accum}: same effective batch, half the memory)",
             f"data.clean.max_tokens={max(64, recipe.data.clean.max_tokens // 2)} (now {recipe.data.clean.max_tokens}; "
             "then rerun prepare)"]
    if gc == "off":
        hints.append("train.gradient_checkpointing=on (about 25% slower, much less activation memory)")
    if t.method != "qlora":
        hints.append("train.method=qlora (4-bit base weights)")
    if t.batch_tokens:
        hints.insert(0, f"train.batch_tokens={t.batch_tokens // 2} (now {t.batch_tokens})")
    return ("CUDA out of memory during training (gradient checkpointing " + gc + "). Turn one of these knobs, e.g. "
            "`finetune train RECIPE <key>=<value>`:\n  - " + "\n  - ".join(hints)
            + "\n`finetune plan RECIPE` estimates the memory each setting needs.")


# -------------------------------------------------------------------------------------- checkpoints
def _fresh_state(fingerprint: str, micro_per_step: int) -> dict[str, Any]:
    return {"step": 0, "tokens": 0, "elapsed": 0.0, "train_seconds": 0.0, "best_val_loss": None, "best_step": None,
            "bad_evals": 0, "last_val_loss": None, "last_loss": None, "history": [], "fingerprint": fingerprint,
            "micro_batches_per_step": micro_per_step}


def _resume_fingerprint(recipe, data_fp: dict[str, str], micro_per_step: int) -> str:
    train = recipe.train.model_dump(mode="json", exclude=RESUMABLE_CHANGES)
    return runs.fingerprint_json({"train": train, "model": recipe.model.model_dump(mode="json"), "seed": recipe.seed,
                                  "data": data_fp, "micro_batches_per_step": micro_per_step})


def _checkpoint_to_resume(out: Path, work: Path, fingerprint: str, resume: bool) -> tuple[Path | None, Path | None]:
    """(the checkpoint to continue from, as a path under ``work``; a finished folder to copy into ``work`` first).

    The work folder holds an interrupted run. ``out`` is continued only with --resume when it finished (a run
    stopped by max_minutes or early stopping), or when it never finished (written by an older finetune in place).
    """
    finished = (out / "manifest.json").exists()
    folders = [work] + ([out] if resume or not finished else [])
    for folder in folders:
        latest = ckpt.latest(folder / "checkpoints")
        if latest is None:
            continue
        if ckpt.read_state(latest).get("fingerprint") != fingerprint:
            if resume:
                raise UserError(f"--resume: {latest} was made with other settings (model, data, seed or train.* keys "
                                f"other than {sorted(RESUMABLE_CHANGES)}). Restore them, or train without --resume "
                                "to start over.")
            print(f"train: not resuming {latest}: the recipe or data changed since; starting over", file=sys.stderr)
            continue
        if folder == work:
            return latest, None
        return work / "checkpoints" / latest.name, out
    if resume:
        raise UserError(f"--resume: no complete checkpoint under {work / 'checkpoints'} or {out / 'checkpoints'}. "
                        "Run `finetune train RECIPE` without --resume.")
    return None, None


def _trainable_state(model) -> dict[str, Any]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, state: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def _save_checkpoint(root: Path, st, model, optimizer, scheduler, best_weights, accelerator, keep: int) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    rng = ckpt.rng_state()
    rng_all = [rng]
    if accelerator.num_processes > 1:
        rng_all = [None] * accelerator.num_processes
        dist.all_gather_object(rng_all, rng)
    if accelerator.is_main_process:
        def write(folder: Path) -> None:
            save_file(_trainable_state(model), str(folder / "trainable.safetensors"))
            if best_weights is not None:
                save_file(best_weights, str(folder / "best.safetensors"))
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(scheduler.state_dict(), folder / "scheduler.pt")
            torch.save(rng_all, folder / "rng.pt")

        ckpt.save(root, st["step"], write, st, keep)
    accelerator.wait_for_everyone()


def _load_checkpoint(path: Path, model, optimizer, scheduler, rank: int):
    import torch
    from safetensors.torch import load_file

    _load_trainable(model, load_file(str(path / "trainable.safetensors")))
    best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").exists() else None
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_all = torch.load(path / "rng.pt", weights_only=False)
    ckpt.set_rng_state(rng_all[rank % len(rng_all)])
    return ckpt.read_state(path), best


def _save_model_dir(model, tokenizer, final_dir: Path, attn: str, step: int | None = None) -> None:
    """Save the adapter or model (atomically); ``step`` marks a snapshot taken during training."""
    from finetune.training import attention

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    swap = attn == attention.NAME and hasattr(base, "set_attn_implementation")
    if swap:  # our packed-batch attention is registered only inside training; saved configs name a standard one
        try:
            base.set_attn_implementation("sdpa")
        except (ValueError, ImportError):  # an architecture without SDPA support (gpt-oss: attention sinks)
            base.set_attn_implementation("eager")
    try:
        with runs.atomic_dir(final_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if step is not None:
                (Path(tmp) / "finetune_step.json").write_text(json.dumps({"step": step}))
    finally:
        if swap:
            base.set_attn_implementation(attn)


# -------------------------------------------------------------------------------------------- helpers
def _tokenized_paths(recipe, prepare_manifest: dict[str, Any]) -> dict[str, Path]:
    listed = (prepare_manifest.get("outputs") or {}).get("tokenized") or {}
    paths: dict[str, Path] = {}
    for split in ("train", "validation"):
        p = Path(listed[split]) if listed.get(split) else recipe.run_dir("prepare") / "tokenized" / split
        if not p.is_absolute() and not p.exists():
            p = recipe.run_dir("prepare") / "tokenized" / split
        if p.exists():
            paths[split] = p
    if "train" not in paths:
        raise UserError(f"no tokenized training split under {recipe.run_dir('prepare') / 'tokenized'}; "
                        "run `finetune prepare RECIPE` again.")
    return paths


def _load_rows(path: Path, split: str) -> list[tuple[list[int], list[int]]]:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    missing = {"input_ids", "labels"} - set(ds.column_names)
    if missing:
        raise UserError(f"{path}: the tokenized {split} split lacks columns {sorted(missing)} "
                        f"(has {ds.column_names}); rerun `finetune prepare RECIPE`.")
    rows = [(list(i), list(lab)) for i, lab in zip(ds["input_ids"], ds["labels"], strict=True)]
    bad = next((n for n, (i, lab) in enumerate(rows) if len(i) != len(lab)), None)
    if bad is not None:
        raise UserError(f"{path}: row {bad} has {len(rows[bad][0])} input_ids but {len(rows[bad][1])} labels; "
                        "rerun `finetune prepare RECIPE`.")
    if preference.LABEL_COLUMN in ds.column_names:
        # rated rows (KTO's shape) under SFT: an undesirable reply must never be a target
        rows = [r for r, good in zip(rows, ds[preference.LABEL_COLUMN], strict=True) if good]
        if split == "train":
            print(f"train: objective sft on rated rows: training on the {len(rows)} desirable of {len(ds)} rows "
                  "(train.objective=kto uses both)", file=sys.stderr)
    rows = [r for r in rows if len(r[0]) > 1]  # a single token predicts nothing
    if split == "train" and not rows:
        raise UserError(f"{path}: the training split is empty; check data.sources and data.clean, rerun prepare.")
    return rows


def _any_process(flag: bool, accelerator) -> bool:
    if accelerator.num_processes == 1:
        return flag
    import torch

    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


def _peak_memory_mb(device_type: str) -> float:
    if device_type == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _dtype_name(params) -> str | None:
    p = next(iter(params), None)
    return None if p is None else str(p.dtype).removeprefix("torch.")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _tensorboard(folder: Path, purge_step: int | None):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder), purge_step=purge_step)


class _StopSignal:
    """Ctrl-C (or SIGTERM) asks the loop to stop after the current step and save a checkpoint; a second one
    interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        print("\ntrain: stopping after this step and saving a checkpoint (press Ctrl-C again to abort now)",
              file=sys.stderr)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


class _Progress:
    """A rich progress bar (loss, tokens/s, ETA) on a terminal; plain lines otherwise (logs, CI)."""

    def __init__(self, total: int, done: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self.bar = None
        self.last_line = 0.0
        if not enabled:
            return
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}  {task.fields[speed]} tok/s  ETA"),
                                TimeRemainingColumn(), console=Console(stderr=True))
            self.task = self.bar.add_task("train", total=total, completed=done, loss="-", speed="-")
            self.bar.start()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", speed=f"{tokens_per_s:.0f}")
        elif time.time() - self.last_line > 10 or step == self.total:
            self.last_line = time.time()
            print(f"train: step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:.0f} tok/s", file=sys.stderr)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(f"train: {text}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# -------------------------------------------------------------------------------------------- command
