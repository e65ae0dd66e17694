"""One optimizer step and one validation pass: forward, loss, backward, across micro-batches and processes.

One loss normalisation everywhere: the loss of a step is (sum of token losses) / (trained tokens in the whole
step, all micro-batches and processes); for a preference objective, the mean over the step's pairs (KTO:
examples). Accumulation and data parallelism change nothing about the update.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from finetune.data.render import IGNORE_INDEX
from finetune.training import batching, loss, preference


@dataclass(frozen=True)
class StepContext:
    """What every forward pass of a run needs besides the model and the rows (fixed for the run)."""

    accelerator: Any
    pad_id: int | None
    autocast_dtype: Any                      # a torch dtype, or None: no autocast
    packing: bool
    objective: str                           # sft | dpo | kto | orpo | simpo
    preference: preference.Settings
    reference: preference.Reference | None = None       # log-probabilities of the reference model (DPO, KTO)
    val_reference: preference.Reference | None = None   # the same for the validation rows
    sharded: bool = False   # FSDP2: every forward pass gathers weights, so every process runs as many as the others

    def autocast(self):
        import torch

        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.accelerator.device.type, dtype=self.autocast_dtype)


def with_reference(ctx: StepContext, raw_model, *, adapters: bool, batch_size: int, train_rows, val_rows
                   ) -> StepContext:
    """DPO and KTO score against the model before training: adapters are switched off for the reference pass;
    full fine-tuning (no second copy of the weights) computes the base's log-probabilities once, up front."""
    def reference(adapters: bool) -> preference.Reference:
        return preference.Reference(raw_model, adapters=adapters, packing=ctx.packing, pad_id=ctx.pad_id,
                                    device=ctx.accelerator.device, autocast=ctx.autocast)

    ref = reference(adapters)
    if adapters:
        return dataclasses.replace(ctx, reference=ref, val_reference=ref)
    if ctx.accelerator.is_main_process:
        print(f"train: reference log-probabilities of {len(train_rows) + len(val_rows)} {ctx.objective} rows "
              "(full fine-tuning: computed once, before the first update)", file=sys.stderr)
    ref.precompute(train_rows, ctx.objective, batch_size)
    val_ref = reference(False)
    if val_rows:
        val_ref.precompute(val_rows, ctx.objective, batch_size)
    return dataclasses.replace(ctx, reference=ref, val_reference=val_ref)


# ------------------------------------------------------------------------------------------- one step
def accumulate(model, step: batching.Step, rows, ctx: StepContext) -> tuple[float, int, int]:
    """Forward/backward every micro-batch of this process in ``step`` (gradients accumulate; no optimizer step).
    Returns (this process's sum of token losses, the step's trained tokens, its input tokens); for a preference
    objective (sum of per-pair or per-example losses, pairs or examples, input tokens)."""
    import torch

    accelerator = ctx.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = [[rows[i] for i in mb] for mb in step.micro_batches]
    mine_idx = list(step.micro_batches)[rank::world]
    chosen_targets = 0
    if ctx.objective == "sft":
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
    local_sum = 0.0
    for i, (mb, weight) in enumerate(work):
        # DDP: gradients are all-reduced once, after the last micro-batch. FSDP2 reduce-scatters every micro-batch
        # instead: skipping it would keep every layer's whole gradient until the step, the memory FSDP2 saves.
        sync = i == len(work) - 1 or ctx.sharded
        with nullcontext() if sync else accelerator.no_sync(model), ctx.autocast():
            if ctx.objective == "sft":
                loss = loss_sum = forward_loss_sum(model, collate(mb, ctx.packing, ctx.pad_id, accelerator.device))
            else:
                res = preference_batch(model, accelerator.unwrap_model(model), mb, work_idx[i], rows, ctx,
                                       ctx.reference, step_units=targets, step_chosen_targets=chosen_targets)
                loss, loss_sum = res.loss, torch.tensor(res.loss_sum)
        accelerator.backward(loss * (scale * weight))
        local_sum += float(loss_sum.detach()) * weight
    return local_sum, targets, tokens


def optimizer_step(model, optimizer, scheduler, accelerator, max_grad_norm: float) -> None:
    """Clip the accumulated gradients, step the optimizer and the schedule, clear the gradients."""
    accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def global_sum(value: float, accelerator) -> float:
    """``value`` summed over every process."""
    if accelerator.num_processes == 1:
        return value
    import torch

    return float(accelerator.reduce(torch.tensor([value], device=accelerator.device), "sum").item())


def any_process(flag: bool, accelerator) -> bool:
    if accelerator.num_processes == 1:
        return flag
    import torch

    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


def preference_batch(model, raw_model, rows_mb, indices, all_rows, ctx: StepContext, reference, *, step_units: int,
                     step_chosen_targets: int) -> preference.BatchResult:
    """One micro-batch of a preference objective: policy forward (with gradients, through the DDP wrapper),
    reference and KTO's mismatched pairs without gradients (on the unwrapped model)."""
    pad_id, device = ctx.pad_id, ctx.accelerator.device

    def forward(seqs):
        return preference.sequence_logps(model, seqs, packing=ctx.packing, pad_id=pad_id, device=device)

    def no_grad_forward(seqs):
        return preference.sequence_logps(raw_model, seqs, packing=ctx.packing, pad_id=pad_id, device=device)

    return preference.batch_loss(forward, reference, rows_mb, indices, all_rows, ctx.preference,
                                 step_units=step_units, step_chosen_targets=step_chosen_targets,
                                 no_grad_forward=no_grad_forward)


def forward_loss_sum(model, batch: dict[str, Any], *, chunked: bool = True):
    """Sum of next-token cross-entropy over the trained positions of a batch (packed or padded).

    Packed batches ask the model for the final hidden states only at positions whose next token is trained
    (``logits_to_keep`` with indices); the vocabulary projection and the loss then run a chunk of tokens at a time
    (training/loss.py), never at tokens x vocabulary. ``chunked=False``: the full logits (scripts/bench_train.py's
    baseline).
    """
    import torch
    import torch.nn.functional as F

    batch = dict(batch)
    labels = batch.pop("labels")
    if "position_ids" in batch:  # packed: a single row
        targets = labels[0, 1:]
        keep = (targets != IGNORE_INDEX).nonzero().flatten()
        if keep.numel() == 0:  # still run the whole graph (data-parallel processes expect every gradient)
            keep = torch.zeros(1, dtype=torch.long, device=labels.device)
        return loss.nll_sum(model, batch, targets[keep][None], logits_to_keep=keep, chunked=chunked)
    # padded: the head sees every position; the last one has no next token
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return loss.nll_sum(model, batch, targets, chunked=chunked)


def collate(examples, packing: bool, pad_id: int | None, device) -> dict[str, Any]:
    batch = batching.collate_packed(examples) if packing else batching.collate_padded(examples, pad_id)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------- validation
def my_batches(batches: list, ctx: StepContext) -> list[tuple[Any, bool]]:
    """This process's share of the evaluation batches, (batch, counted). Under FSDP2 a process with one batch fewer
    than the others repeats its first one uncounted: the weights are gathered in every forward pass, by all."""
    accelerator = ctx.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = [(b, True) for b in batches[rank::world]]
    if ctx.sharded and batches:
        mine += [(batches[0], False)] * (math.ceil(len(batches) / world) - len(mine))
    return mine


def validation_loss(model, rows, ctx: StepContext, batch_size: int, batch_tokens: int | None) -> float | None:
    """Mean token loss over the validation split (each process scores a share; sums are reduced)."""
    import torch

    if not rows:
        return None
    accelerator = ctx.accelerator
    batches = batching.eval_batches([len(ids) for ids, _ in rows], batch_size=batch_size,
                                    batch_tokens=batch_tokens if ctx.packing else None)
    world = accelerator.num_processes
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b, counted in my_batches(batches, ctx):
            examples = [rows[i] for i in b]
            with ctx.autocast():
                loss_sum = float(forward_loss_sum(model, collate(examples, ctx.packing, ctx.pad_id,
                                                                  accelerator.device)))
            if counted:
                total += loss_sum
                count += batching.count_targets(examples)
    if was_training:
        model.train()
    if world > 1:
        sums = accelerator.reduce(torch.tensor([total, float(count)], device=accelerator.device), "sum")
        total, count = float(sums[0]), int(sums[1])
    return total / count if count else None


def validation_preference(model, rows, ctx: StepContext, batch_size: int, batch_tokens: int | None
                          ) -> tuple[float | None, dict[str, Any]]:
    """The objective's mean loss over the validation rows, with reward accuracy and mean margin (chosen minus
    rejected implicit reward; KTO: mean reward, accuracy = rewards on the side of 0 their label asks for)."""
    import torch

    if not rows:
        return None, {}
    accelerator = ctx.accelerator
    batches = batching.eval_batches([r.length for r in rows], batch_size=batch_size,
                                    batch_tokens=batch_tokens if ctx.packing else None)
    world = accelerator.num_processes
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, units, correct, margin
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b, counted in my_batches(batches, ctx):
            with ctx.autocast():
                res = preference_batch(model, model, [rows[i] for i in b], b, rows, ctx, ctx.val_reference,
                                       step_units=len(b), step_chosen_targets=1)
            if counted:
                sums = [sums[0] + res.loss_sum, sums[1] + res.units, sums[2] + res.correct,
                        sums[3] + res.margin_sum]
    if was_training:
        model.train()
    if world > 1:
        sums = accelerator.reduce(torch.tensor(sums, device=accelerator.device), "sum").tolist()
    n = max(sums[1], 1)
    return sums[0] / n, {"reward_accuracy": round(sums[2] / n, 4), "reward_margin": round(sums[3] / n, 4)}
