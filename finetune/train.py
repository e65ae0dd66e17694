"""``finetune train RECIPE``: the prepared, tokenized splits -> a LoRA/rsLoRA/DoRA/QLoRA adapter or a full model.

Readable top to bottom: ``run`` loads the data and the model, plans every optimizer step up front, then runs the
loop (``_loop``: step, log, validate, checkpoint, stop) and writes the outputs. The maths is transformers/peft/
torch (model, adapters, optimizers, ``get_scheduler``) and accelerate (device placement, data-parallel gradient
sync, FSDP2 sharding under recipes/accelerate/fsdp2.yaml: training/sharded.py); the loop is ours, on purpose:

- speed: padding-free packed batches (one row, positions restarting per example, per-example causal attention)
  and logits computed only where a label is trained (``logits_to_keep``): with assistant-only loss most
  positions need no 49k-wide vocabulary projection. The Trainer computes every logit of every padded position.
- exact resumption: the step schedule is a pure function of (seed, epoch), so a resumed run continues at
  ``schedule[step]`` with the optimizer, scheduler and RNG states restored, and a data-parallel run with N
  processes groups the same micro-batches as one process accumulating N: the two give the same updates.
- one loss normalisation everywhere (training/steps.py): accumulation and data parallelism change nothing
  about the update.

Its rooms: training/model_setup.py (the model, adapters, kernels, gradient checkpointing, optimizer),
training/sharded.py (FSDP2: the launcher's config, what it refuses, weights gathered whole for saving),
training/steps.py (one step, the losses, validation), training/checkpoint.py (the run's state, checkpoints,
resuming, saving the adapter or model), training/console.py (progress bar, log, Ctrl-C).

Outputs (runs/<name>/train/): adapter/ or model/, checkpoints/checkpoint-<step>/, tb/, log.jsonl, summary.json,
manifest.json (written last: the stage is finished exactly when it exists). They are built in
runs/<name>/.train.partial/ and replace train/ only when the run succeeds: a failed or interrupted run leaves the
previous adapter as it was, and its checkpoints stay in .train.partial/ to resume from. A run that completes its
planned steps then drops the optimizer state from its checkpoints (nothing is left to continue); a run stopped
early (max_minutes, early stopping) keeps it for --resume.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import card, hardware, refusals
from finetune.errors import UserError
from finetune.run import artifacts, runs
from finetune.training import batching, console, grpo, model_setup, outputs, preference, rows, sharded, steps
from finetune.training import checkpoint as ckpt
from finetune.training.model_setup import ADAPTER_METHODS


def run(recipe, upstream: artifacts.Upstream | None = None, *, resume: bool = False,
        on_eval: Callable[[int, float], bool] | None = None, out_dir: str | Path | None = None,
        recipe_path: str = "RECIPE") -> dict[str, Any]:
    """Train on ``upstream.prepared`` (default: this recipe's prepared data, which must be fresh); returns the
    summary. ``on_eval(step, val_loss)`` returning True stops training (tune's pruning).

    An interrupted run (checkpoints but no manifest) is resumed automatically when its settings match;
    ``resume=True`` insists on resuming (also a finished run that stopped early) and says why it cannot.
    Everything that can be checked (settings vs this machine, fresh prepared data, the model) is checked
    before anything is written.
    """
    t = recipe.train
    out = Path(out_dir) if out_dir is not None else recipe.run_dir("train")
    accelerator = _accelerator(recipe)
    main, device_type = accelerator.is_main_process, accelerator.device.type

    # ---- data: tokenized by prepare; nothing is tokenized here
    upstream = upstream if upstream is not None else artifacts.for_stage(recipe, "train", recipe_path)
    tokenized = _tokenized_paths(upstream.prepared)
    train_rows, val_rows, lengths = rows.load_splits(tokenized, t.objective)
    micro_per_step = t.grad_accum * accelerator.num_processes
    # ---- the model must resolve before anything is written (its architecture decides packing)
    resolved, packing, packing_off = _resolve_model(recipe, main=main)
    plan = batching.schedule(lengths, batch_size=t.batch_size, batch_tokens=t.batch_tokens if packing else None,
                             micro_batches_per_step=micro_per_step, seed=recipe.seed, epochs=t.epochs,
                             max_steps=t.max_steps)
    refusals.say_training_notes(recipe, device_type, plan, micro_per_step, main=main)
    data_fp = {split: runs.file_fingerprint(Path(p)) for split, p in tokenized.items()}
    fingerprint = ckpt.resume_fingerprint(recipe, data_fp, micro_per_step)
    if main and not val_rows:
        _say_no_validation(recipe)
    from finetune import models

    tokenizer = models.load_tokenizer(resolved.path, trust_remote_code=recipe.model.trust_remote_code,
                                      chat_template=recipe.chat_template_path())

    # ---- where to start: a fresh run, or the last complete checkpoint of an interrupted (or stopped) one.
    # Everything is written to the work folder, which replaces `out` only when the run succeeds.
    stage = runs.StageRun(recipe, "train", inputs={
        "prepare_manifest": upstream.prepared.manifest_id, "tokenized": data_fp,
        "base_model": {"id": recipe.model.id, "path": str(resolved.path), "revision": resolved.revision},
    }, upstream=upstream.ids(), aside=True, keep_partial=True, folder=out)
    start_ckpt = _prepare_work_folder(out, stage.work, fingerprint, resume, accelerator, grad_accum=t.grad_accum,
                                      fingerprint_for=lambda m: ckpt.resume_fingerprint(recipe, data_fp, m))
    with stage if main else nullcontext():  # a failure keeps the work folder (its checkpoints) for resuming
        accelerator.wait_for_everyone()
        tr = _setup(recipe, resolved, tokenizer, accelerator, packing, train_rows, val_rows, len(plan),
                    work=stage.work)
        tr.state = ckpt.TrainState(fingerprint, micro_per_step, processes=accelerator.num_processes)
        if start_ckpt is not None:
            tr.state, tr.best_weights = ckpt.load_training(start_ckpt, tr.raw_model, tr.optimizer, tr.scheduler,
                                                           accelerator.process_index, sharded_model=tr.sharded)
            tr.state.processes = accelerator.num_processes
            if main:
                print(f"train: resuming from {start_ckpt} (step {tr.state.step} of {len(plan)})")
        with console.RunLog(stage.work, tr.state.history, purge_step=tr.state.step if start_ckpt else None,
                            enabled=main) as tr.log:
            stop_reason = _train(tr, plan, train_rows, val_rows, on_eval)
            weights_step, best_full = outputs.best_weights(tr)
            summary = outputs.summary(tr, plan, stop_reason, packing_off, val_rows, weights_step)
            whole = outputs.gathered(tr) if best_full is None else None  # FSDP2: every process takes part
            if main:
                outputs.write_outputs(tr, summary, best_full, whole)
                card.write_training_card(stage.work / outputs.final_name(t.method), recipe, summary, Path(resolved.path))
        if main:
            stage.record(outputs.trained_record(out, t.method, Path(resolved.path)))
            stage.extra["summary"] = summary
    if main and summary["stop_reason"] == "completed":
        # in place now: a completed run has nothing left to continue, so its checkpoints keep no optimizer state
        # (a run stopped early keeps it for --resume; one killed before this line keeps it, which is harmless)
        ckpt.drop_optimizer_state(out / "checkpoints")
    accelerator.wait_for_everyone()
    return summary


def _accelerator(recipe):
    """The run's accelerate Accelerator, with what this machine and launch cannot run refused first. Without CUDA it
    trains on the CPU (accelerate sets up multi-process gloo training only when told cpu=True); precision is
    finetune's (model.dtype, autocast), not an accelerate config's mixed_precision."""
    import torch
    from accelerate import Accelerator

    try:
        accelerator = Accelerator(cpu=hardware.device() == "cpu", mixed_precision="no")
        sharded.refuse_unsupported(accelerator)
        sharded.enable_on_cpu(accelerator)  # FSDP2 asked by the launcher, on the CPU (training/sharded.py)
    except ValueError as exc:  # accelerate's own checks of an FSDP config (plugin settings that contradict)
        raise UserError(f"accelerate config: {exc}") from None
    torch.set_num_threads(hardware.threads(recipe.train.threads, sharing=int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    device_type = accelerator.device.type
    refusals.check_settings(recipe, device_type)
    sharded.check(recipe, accelerator, device_type)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the summary's peak memory is this run's
    return accelerator


def _resolve_model(recipe, *, main: bool) -> tuple[Any, bool, str | None]:
    """The base model (resolved: converted or downloaded once), refused now if a later stage could not take it
    (an image-text checkpoint whose text model cannot be read, an adapter GGUF llama.cpp cannot write), and
    whether batches are packed (its architecture decides: (packing, why it is off))."""
    from finetune import models, refusals

    resolved = models.resolve_model(recipe.model, recipe.base_dir)
    config = models.read_config(resolved.path)
    # refused now, not at export after the training
    refusals.check(config, method=recipe.train.method, adapter_gguf=recipe.export.adapter_gguf)
    packing, packing_off = model_setup.packing(resolved.path, recipe.train.packing, main=main,
                                               trust_remote_code=recipe.model.trust_remote_code)
    return resolved, packing, packing_off


def _prepare_work_folder(out: Path, work: Path, fingerprint: str, resume: bool, accelerator, *, grad_accum: int,
                         fingerprint_for) -> Path | None:
    """The checkpoint to start from (None: a fresh run), with the work folder made ready for it: emptied for a
    fresh run, or filled with links to a finished run that --resume continues."""
    start_ckpt, copy_from = ckpt.to_resume(out, work, fingerprint, resume, processes=accelerator.num_processes,
                                           grad_accum=grad_accum, fingerprint_for=fingerprint_for)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        runs.make_dir(out.parent)
        if copy_from is not None or start_ckpt is None:
            shutil.rmtree(work, ignore_errors=True)
        if copy_from is not None:
            runs.link_tree(copy_from, work)  # continue a finished run without touching it until this one ends
    return start_ckpt


# -------------------------------------------------------------------------------------------- set-up
@dataclass
class _Training:
    """The objects one run's loop works on (built by ``_setup``; ``run`` adds the state, the log and progress)."""

    recipe: Any
    accelerator: Any
    model: Any                  # wrapped for data parallelism: training forward and backward passes go through it
    raw_model: Any              # the same model unwrapped: validation, reference passes, saving (FSDP2: the same
                                # sharded module; every process runs each of its forward passes)
    optimizer: Any
    scheduler: Any
    ctx: steps.StepContext
    tokenizer: Any
    built: model_setup.Model    # attention implementation, autocast dtype, kernels
    gc_on: bool                 # gradient checkpointing (an out-of-memory step can switch it on)
    n_trainable: int
    work: Path
    sharded: bool = False       # FSDP2: weights, gradients and optimizer state sharded over the processes
    wrapped: list[str] | None = None  # FSDP2: the layer classes that got an FSDP group each
    state: ckpt.TrainState | None = None
    best_weights: dict[str, Any] | None = None  # adapters: the best validation step's, kept in memory
    log: console.RunLog | None = None
    progress: console.Progress | None = None
    grpo: grpo.Runtime | None = None  # GRPO: rollouts, rewards, reference (training/grpo.py)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _setup(recipe, resolved, tokenizer, accelerator, packing: bool, train_rows, val_rows, n_steps: int, *,
           work: Path) -> _Training:
    """The model, its optimizer and schedule, and (DPO, KTO) the reference, seeded by the recipe."""
    from transformers import get_scheduler, set_seed

    t = recipe.train
    device_type = accelerator.device.type
    shard = sharded.active(accelerator)
    set_seed(recipe.seed)  # adapter initialisation (and dropout) follow the recipe's seed
    new_tokens = model_setup.new_token_ids(recipe, resolved, tokenizer)
    if new_tokens and accelerator.is_main_process:
        print(f"train: model.chat_template {recipe.model.chat_template} added {len(new_tokens)} turn tokens the model "
              f"lacked ({', '.join(tokenizer.convert_ids_to_tokens(new_tokens))}); their embedding rows are trained",
              file=sys.stderr)
    built = model_setup.build(recipe, resolved, device_type, accelerator.local_process_index, packing=packing,
                              sharded=shard, new_tokens=new_tokens)
    if shard:  # activation checkpointing is the FSDP2 config's (applied by accelerate's prepare, layer by layer)
        gc_on = bool(accelerator.state.fsdp_plugin.activation_checkpointing)
    else:
        gc_on = model_setup.wants_gradient_checkpointing(recipe, built.model, device_type)
        if gc_on:
            model_setup.enable_gradient_checkpointing(built.model)
    n_trainable = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    # parameters offloaded by FSDP2 are stepped on the CPU: no fused CUDA optimizer kernels
    optimizer = model_setup.optimizer(t.optimizer, built.model, t.lr, t.weight_decay,
                                      "cpu" if sharded.offloads(accelerator) else device_type)
    warmup = math.ceil(t.warmup_ratio * n_steps)
    updates = n_steps * (t.grpo.iterations if t.objective == "grpo" else 1)  # GRPO: iterations per batch
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max(1, updates))
    wrapped = sharded.prepare_wrapping(accelerator, built.model) if shard else None
    model, optimizer = accelerator.prepare(built.model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    ctx = steps.StepContext(accelerator, tokenizer.pad_token_id, built.autocast_dtype, packing, t.objective,
                            preference.Settings(t.objective, t.preference.beta, t.preference.desirable_weight,
                                                t.preference.undesirable_weight, t.preference.gamma), sharded=shard)
    if t.objective in preference.NEEDS_REFERENCE:
        ctx = steps.with_reference(ctx, raw_model, adapters=t.method in ADAPTER_METHODS, batch_size=t.batch_size,
                                   train_rows=train_rows, val_rows=val_rows)
    if shard and accelerator.is_main_process:
        print(f"train: FSDP2 over {accelerator.num_processes} processes, one group per {', '.join(wrapped)}"
              + (", activation checkpointing" if gc_on else "")
              + (", parameters offloaded to the CPU" if sharded.offloads(accelerator) else ""), file=sys.stderr)
    rt = grpo.runtime(t, recipe.base_dir, tokenizer, raw_model, adapters=t.method in ADAPTER_METHODS,
                      device=accelerator.device, packing=packing, seed=recipe.seed, autocast=ctx.autocast,
                      sharded=shard) if t.objective == "grpo" else None
    return _Training(recipe, accelerator, model, raw_model, optimizer, scheduler, ctx, tokenizer, built, gc_on,
                     n_trainable, work, sharded=shard, wrapped=wrapped, grpo=rt)


# -------------------------------------------------------------------------------------------- the loop
@dataclass
class _Window:
    """The steps since the last log line."""

    loss: float = 0.0
    targets: int = 0
    tokens: int = 0
    seconds: float = 0.0


def _train(tr: _Training, plan: list[batching.Step], train_rows, val_rows,
           on_eval: Callable[[int, float], bool] | None) -> str:
    """Run the plan from the state's step; returns why it ended (Ctrl-C raises KeyboardInterrupt after saving)."""
    with console.Progress(len(plan), tr.state.step, enabled=tr.main) as tr.progress, \
            console.StopSignal() as stop:
        stop_reason, window = _loop(tr, plan, train_rows, val_rows, on_eval, stop)
    st = tr.state
    if stop_reason == "interrupted":
        if tr.main:
            print(f"train: interrupted at step {st.step}; checkpoint saved. Continue with "
                  "`finetune train RECIPE --resume`.", file=sys.stderr)
        raise KeyboardInterrupt
    if st.step > 0:
        epoch = plan[st.step - 1].epoch_progress
        if window.targets:  # stopped between log lines: log the steps since the last one
            _log_window(tr, window, epoch)
        if val_rows and not any(e["step"] == st.step and e["val_loss"] is not None for e in st.history):
            _validate(tr, val_rows, epoch)  # stopped between evaluations: still end with one
    return stop_reason


def _loop(tr: _Training, plan: list[batching.Step], train_rows, val_rows, on_eval, stop: console.StopSignal
          ) -> tuple[str, _Window]:
    """Step, log, validate, checkpoint until the plan ends or something stops it: (why, the unlogged steps)."""
    t, st = tr.recipe.train, tr.state
    window = _Window()
    session_start, elapsed_before = time.time(), st.elapsed
    tr.model.train()
    while st.step < len(plan):
        step = plan[st.step]
        t0 = time.time()
        loss_sum, targets, tokens = _train_step(tr, step, train_rows)
        st.step += 1
        st.tokens += tokens
        dt = time.time() - t0
        st.train_seconds += dt
        st.elapsed = elapsed_before + time.time() - session_start
        window.loss += loss_sum
        window.targets += targets
        window.tokens += tokens
        window.seconds += dt
        st.last_loss = loss_sum / max(targets, 1)
        tr.progress.update(st.step, st.last_loss, tokens / max(dt, 1e-9))

        last = st.step == len(plan)
        if st.step % t.log_every == 0 or last:
            _log_window(tr, window, step.epoch_progress)
            window = _Window()
        validated = bool(val_rows) and (st.step % t.eval_every == 0 or last)
        val = _validate(tr, val_rows, step.epoch_progress) if validated else None
        reason = _stop_reason(tr, last, validated, val, on_eval, stop)
        if (st.step % t.save_every == 0 and not last) or reason is not None:
            _save_checkpoint(tr)  # a stopped run can be continued with --resume
        if reason is not None:
            return reason, window
    return "completed", window


def _train_step(tr: _Training, step: batching.Step, rows) -> tuple[float, int, int]:
    """One optimizer step: (sum of losses over every process, trained tokens, input tokens). Out of GPU memory
    with gradient_checkpointing auto and off, it is switched on and the step retried; else the knobs are named."""
    import torch

    t = tr.recipe.train
    if tr.grpo is not None:  # rollouts, rewards and its own optimizer steps (train.grpo.iterations)
        return grpo.train_step(tr.model, tr.raw_model, tr.accelerator, tr.state.step, step.micro_batches, rows,
                               tr.grpo, lambda: steps.optimizer_step(tr.model, tr.optimizer, tr.scheduler,
                                                                     tr.accelerator, t.max_grad_norm))
    for attempt in (1, 2):
        try:
            local_sum, targets, tokens = steps.accumulate(tr.model, step, rows, tr.ctx)
            break
        except torch.OutOfMemoryError:
            tr.optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if tr.sharded:  # the processes are in step with each other: no retry on one alone
                raise UserError("CUDA out of memory during FSDP2 training: set fsdp_config.fsdp_activation_"
                                "checkpointing: true (or fsdp_offload_params: true) in the accelerate config, add "
                                "processes, or halve train.batch_size and double train.grad_accum; `finetune plan "
                                "RECIPE --gpus N` estimates each.") from None
            if attempt == 1 and t.gradient_checkpointing == "auto" and not tr.gc_on:
                print("train: out of GPU memory; switching gradient checkpointing on and retrying", file=sys.stderr)
                model_setup.enable_gradient_checkpointing(tr.raw_model)
                tr.gc_on = True
                continue
            raise UserError(model_setup.oom_message(tr.recipe, tr.gc_on)) from None
    steps.optimizer_step(tr.model, tr.optimizer, tr.scheduler, tr.accelerator, t.max_grad_norm)
    return steps.global_sum(local_sum, tr.accelerator), targets, tokens


def _stop_reason(tr: _Training, last: bool, validated: bool, val: float | None, on_eval,
                 stop: console.StopSignal) -> str | None:
    """Why the loop stops after this step, or None; every process agrees (one that stops, stops them all)."""
    t, st = tr.recipe.train, tr.state
    want_stop, reason = False, None
    if validated:
        if t.early_stopping_patience is not None and st.bad_evals >= t.early_stopping_patience:
            want_stop, reason = True, "early_stopping"
        if on_eval is not None and tr.main and on_eval(st.step, val):
            want_stop, reason = True, "on_eval"
    if t.max_minutes is not None and st.elapsed >= t.max_minutes * 60 and not last:
        want_stop, reason = True, "max_minutes"
    if stop.requested:
        want_stop, reason = True, "interrupted"
    if not steps.any_process(want_stop, tr.accelerator):
        return None
    return reason or "stopped by another process"


def _record(tr: _Training, entry: dict[str, Any]) -> None:
    tr.state.history.append(entry)
    tr.log.write(entry)


def _log_window(tr: _Training, window: _Window, epoch: float) -> None:
    st = tr.state
    st.window_loss = window.loss / max(window.targets, 1)
    _record(tr, {"step": st.step, "epoch": round(epoch, 4), "loss": st.window_loss, "val_loss": None,
                 "lr": tr.scheduler.get_last_lr()[0], "tokens": st.tokens,
                 "tokens_per_s": round(window.tokens / max(window.seconds, 1e-9), 2), "time": round(st.elapsed, 2),
                 **(tr.grpo.drain() if tr.grpo is not None else {})})


def _validate(tr: _Training, val_rows, epoch: float) -> float | None:
    """Validation loss (preference objectives: with reward accuracy and margin), logged; keeps the best step's
    weights (adapters: in memory; full fine-tuning: on disk)."""
    t, st = tr.recipe.train, tr.state
    extra: dict[str, Any] = {}
    if tr.grpo is not None:  # minus the held-out reward: lower is better, as for a loss
        extra = grpo.held_out_reward(tr.raw_model, val_rows, tr.grpo, t.grpo.eval_examples, t.batch_size,
                                     tr.accelerator)
        val, st.last_val_reward = -extra["val_reward"], extra
    elif tr.ctx.objective == "sft":
        val = steps.validation_loss(tr.raw_model, val_rows, tr.ctx, t.batch_size, t.batch_tokens)
    else:
        val, extra = steps.validation_preference(tr.raw_model, val_rows, tr.ctx, t.batch_size, t.batch_tokens)
        st.last_val_reward = extra
    st.last_val_loss = val
    _record(tr, {"step": st.step, "epoch": round(epoch, 4), "loss": None, "val_loss": val,
                 "lr": tr.scheduler.get_last_lr()[0], "tokens": st.tokens, "tokens_per_s": None,
                 "time": round(st.elapsed, 2), **extra})
    tr.progress.note(f"step {st.step}: validation loss {val:.4f}" + (
        f", reward accuracy {extra['reward_accuracy']:.3f}, margin {extra['reward_margin']:.4f}"
        if "reward_margin" in extra else f", held-out reward {extra['val_reward']:.4f}" if extra else ""))
    if st.best_val_loss is None or val < st.best_val_loss:
        st.best_val_loss, st.best_step, st.bad_evals = val, st.step, 0
        if t.method in ADAPTER_METHODS:
            tr.best_weights = ckpt.trainable_state(tr.raw_model)
        else:  # a full model is too big to keep in memory: the best one so far goes to disk
            whole = outputs.gathered(tr)
            if tr.main:
                ckpt.save_model_dir(tr.raw_model, tr.tokenizer, tr.work / outputs.BEST_FULL_DIR, tr.built.attn, step=st.step,
                                    state_dict=whole)
    else:
        st.bad_evals += 1
    return val


def _save_checkpoint(tr: _Training) -> None:
    ckpt.save_training(tr.work / "checkpoints", tr.state, tr.raw_model, tr.optimizer, tr.scheduler, tr.best_weights,
                       tr.accelerator, tr.recipe.train.keep_checkpoints, sharded_model=tr.sharded)


# -------------------------------------------------------------------------------------------- data
def _tokenized_paths(prepared: artifacts.Prepared) -> dict[str, Path]:
    """The tokenized train and validation splits prepare wrote (an empty validation split has no folder)."""
    paths = {split: p for split, p in prepared.tokenized.items() if split in ("train", "validation") and p.exists()}
    if "train" not in paths:
        raise UserError(f"{prepared.tokenized.get('train')}: the tokenized training split is missing; "
                        "run `finetune prepare RECIPE` again.")
    return paths


def _say_no_validation(recipe) -> None:
    split = recipe.data.split
    why = ("data.split.validation is 0" if split.validation == 0
           else "no source has role: validation" if all(s.role != "all" for s in recipe.data.sources)
           else "too few rows or groups to carve one; see prepare's notes")
    print(f"train: the validation split is empty ({why}): training runs without validation loss, so early "
          "stopping and best-step selection are off; the final step's weights are saved.", file=sys.stderr)
