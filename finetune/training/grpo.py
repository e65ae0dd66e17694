"""GRPO (group relative policy optimization): learn from rewards of sampled completions, not from written answers.

One step of ``train.objective: grpo`` (``train_step``), for the prompts the schedule gives it:

1. rollouts (training/rollout.py): ``generations`` completions of every prompt, sampled from the training model
   (adapter on, KV cache, stopping at the end-of-turn ids of ``models.stop_ids``);
2. rewards (training/rewards.py), summed with their weights; the advantage of a completion is its reward minus
   its group's mean, divided by the group's (or batch's) std unless ``scale_rewards: none``;
3. the clipped surrogate loss on the completion tokens, with an optional KL penalty towards the reference (the
   base: adapter off; full fine-tuning: a frozen copy made before training), normalised as ``train.grpo.loss``
   says, for ``iterations`` optimizer steps on the same rollouts (the log-probabilities before the first of them
   are the "old" ones of the ratio).

The formulas are TRL's ``GRPOTrainer._compute_loss`` (tests/unit/test_train_grpo.py checks each normalisation
against TRL on the same prompts, completions, rewards and old log-probabilities, packed and padded): per token
``-min(r * A, clip(r, 1 - eps, 1 + eps_high) * A) + beta * r * (exp(ref - p) - (ref - p) - 1)`` with ``r = exp(p -
old)`` and ``p`` the log-probability under logits divided by the sampling temperature (the KL estimate is TRL's k3
with its importance-sampling correction ``r``, ``use_bias_correction_kl``). Normalisations over the
whole step (accumulation and data parallelism change nothing): grpo: mean of each completion's token mean; bnpo:
token mean per micro-batch, averaged over the micro-batches; dr_grpo: token sum / (completions x max_new_tokens);
dapo: token sum / the step's completion tokens.

Processes: each process samples and trains on its share of the step's micro-batches (every ``world``-th, as an SFT
step), and every step-wide figure is summed over the processes: the normalisations above, the batch's reward std
(``scale_rewards: batch``) and the logged metrics (the mean and std of the rewards over every completion of the
step). A process with fewer micro-batches than another runs a zero-weighted one, so all run as many backward
passes. N processes (accumulation A) take the same steps as one process accumulating N x A.

Randomness: each completion is sampled from its own stream, seeded by (recipe seed, step, its prompt's row, its
number; training/rollout.py), so the process that samples it and a resumption change nothing: N processes and a
resumed run draw the completions of one uninterrupted process.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from finetune.data.render import IGNORE_INDEX
from finetune.training import rewards as rewards_mod
from finetune.training import rollout

LOSSES = ("grpo", "dr_grpo", "bnpo", "dapo")


@dataclass(frozen=True)
class Settings:
    generations: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    iterations: int = 1
    loss: str = "dapo"
    scale_rewards: str = "group"

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


# ------------------------------------------------------------------------------------------ advantages
def nanstd(x, dim=None):
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN for fewer than two values)."""
    import torch

    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std.squeeze() if dim is None else std.squeeze(dim)


def weighted(per_func, weights):
    """(completions,) weighted sums of (completions, rewards) values; NaN where no reward scored a completion."""
    import torch

    w = torch.as_tensor(weights, dtype=per_func.dtype)
    total = (per_func * w.unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(per_func).all(dim=1)] = float("nan")  # nothing scored it: no learning signal
    return total


def advantages(per_func, weights, generations: int, scale: str, batch_std: float | None = None):
    """(completions,) advantages from (completions, rewards) values (NaN: no opinion), grouped by prompt (each
    prompt's ``generations`` completions are consecutive): (the advantages, the weighted reward of each).
    ``scale: batch`` divides by ``batch_std`` when given (the whole step's, over every process), else by the std of
    these completions."""
    import torch

    total = weighted(per_func, weights)
    grouped = total.view(-1, generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(generations)
    if scale == "batch" and batch_std is not None:
        std = torch.full_like(total, batch_std)
    elif scale == "batch":
        std = nanstd(total).expand_as(total) if total.numel() > 1 else torch.zeros_like(total)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(generations)
    adv = total - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), total


# ------------------------------------------------------------------------------------------ the loss
def per_token_loss(logps, old_logps, ref_logps, adv, settings: Settings):
    """TRL's per-token GRPO loss on (completions, tokens) tensors: (loss, clipped bool tensor, KL or None)."""
    import torch

    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - settings.epsilon, 1 + settings.eps_high)
    a = adv.to(device=logps.device, dtype=logps.dtype).unsqueeze(1)  # the rewards are scored on the CPU
    loss = -torch.min(coef_1 * a, coef_2 * a)
    clipped = ((coef_1 < 1 - settings.epsilon) & (a < 0)) | ((coef_1 > 1 + settings.eps_high) & (a > 0))
    kl = None
    if settings.beta != 0.0:
        kl = (torch.exp(ref_logps - logps) - (ref_logps - logps) - 1) * coef_1  # k3, importance-corrected (TRL)
        loss = loss + settings.beta * kl
    return loss, clipped, kl


def reduce_loss(loss, mask, settings: Settings, *, step_completions: int, step_tokens: int, step_micro_batches: int):
    """One micro-batch's share of the step loss, under the step-wide normalisation of ``settings.loss``."""
    masked = loss * mask
    if settings.loss == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / step_completions
    if settings.loss == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / step_micro_batches
    if settings.loss == "dr_grpo":
        return masked.sum() / (step_completions * settings.max_new_tokens)
    return masked.sum() / max(step_tokens, 1)  # dapo


# ------------------------------------------------------------------------------------ log-probabilities
def token_logps(model, prompts, completions, *, packing: bool, pad_id: int, device, temperature: float):
    """Per-token log-probabilities of each completion after its prompt (logits / temperature, as TRL):
    ((completions, longest completion) tensor, its mask). Packed: one row, logits only at completion tokens."""
    import torch

    from finetune.training import batching

    seqs = [(list(p) + list(c), [IGNORE_INDEX] * len(p) + list(c)) for p, c in zip(prompts, completions, strict=True)]
    n, width = len(seqs), max(len(c) for c in completions)
    if packing:
        batch = batching.collate_packed(seqs)
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        targets = batch.pop("labels")[0, 1:]
        keep = (targets != IGNORE_INDEX).nonzero().flatten()
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits[0].float() / temperature
        flat = torch.log_softmax(logits, dim=-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
        rows = torch.tensor([k for k, c in enumerate(completions) for _ in c], device=flat.device)
        cols = torch.tensor([t for c in completions for t in range(len(c))], device=flat.device)
    else:
        batch = batching.collate_padded(seqs, pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")[:, 1:]
        logits = model(**batch, use_cache=False).logits[:, :-1].float() / temperature
        trained = labels != IGNORE_INDEX
        all_logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.masked_fill(~trained, 0).unsqueeze(-1))
        flat = all_logps.squeeze(-1)[trained]
        rows = torch.tensor([k for k, c in enumerate(completions) for _ in c], device=flat.device)
        cols = torch.tensor([t for c in completions for t in range(len(c))], device=flat.device)
    out = torch.zeros(n, width, device=flat.device, dtype=flat.dtype).index_put((rows, cols), flat)
    mask = torch.zeros(n, width, device=flat.device, dtype=flat.dtype).index_put(
        (rows, cols), torch.ones_like(flat))
    return out, mask


# ------------------------------------------------------------------------------------------ one step
@dataclass
class Runtime:
    """What every GRPO step of a run uses besides the model (built once by ``train.py``'s set-up)."""

    settings: Settings
    rewards: list[rewards_mod.Reward]
    tokenizer: Any
    stop_ids: list[int]
    pad_id: int
    device: Any
    packing: bool
    seed: int
    autocast: Any = nullcontext                      # a context factory
    reference: Any = None                             # full fine-tuning with beta > 0: a frozen copy of the base
    adapters: bool = True
    window: list[dict[str, float]] = field(default_factory=list)  # metrics of the steps since the last log line

    def drain(self) -> dict[str, float]:
        """Mean of each metric over the steps since the last call (for the log line)."""
        keys = dict.fromkeys(k for m in self.window for k in m)
        out = {k: round(sum(m[k] for m in self.window if k in m) / sum(k in m for m in self.window), 6) for k in keys}
        self.window = []
        return out


def runtime(train, base_dir, tokenizer, raw_model, *, adapters: bool, device, packing: bool, seed: int, autocast,
            sharded: bool = False) -> Runtime:
    """The run's GRPO runtime from the recipe's ``train`` section: settings, the rewards (a user function that
    cannot be imported is named now, before any step), the stop ids, and for full fine-tuning with beta > 0 a
    frozen copy of the base as the reference."""
    import copy

    from finetune.errors import UserError
    from finetune.eval_models import stop_ids_of

    if sharded:
        raise UserError("train.objective grpo: FSDP2 sharding is not supported (rollouts generate with the whole "
                        "model); train with one process per GPU (DDP) or one GPU.")
    g = train.grpo
    settings = Settings(g.generations, g.max_new_tokens, g.temperature, g.top_p, g.epsilon, g.epsilon_high, g.beta,
                        g.iterations, g.loss, g.scale_rewards)
    rewards = rewards_mod.build(train.rewards, base_dir, template=getattr(tokenizer, "chat_template", None) or "")
    stop_ids = stop_ids_of(raw_model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    reference = None
    if settings.beta != 0.0 and not adapters:
        reference = copy.deepcopy(raw_model).eval().requires_grad_(False)
    return Runtime(settings, rewards, tokenizer, stop_ids, pad_id, device, packing, seed, autocast, reference, adapters)


@dataclass
class Rollouts:
    prompts: list[list[int]]       # one per completion (each prompt repeated ``generations`` times)
    completions: list[list[int]]
    advantages: Any                # (completions,)
    old: Any = None                # (completions, tokens) log-probabilities before the first update, or None
    ref: Any = None                # reference log-probabilities, or None (beta 0)


def train_step(model, raw_model, accelerator, step_index: int, micro_batches: list[list[int]], rows, rt: Runtime,
               optimizer_step) -> tuple[float, int, int]:
    """Rollouts for this process's micro-batches, then ``iterations`` optimizer steps on them. Returns (sum of the
    completions' losses over every process, completions in the step, input tokens of the step) like an SFT step;
    the step's metrics (over every process) go to ``rt.window``."""
    s, world, rank = rt.settings, accelerator.num_processes, accelerator.process_index
    mine = list(micro_batches)[rank::world]
    t0 = time.time()
    batches, scores = [], []
    for mb in mine:
        seeds = [x for i in mb for x in rollout.completion_seeds(rt.seed, step_index, i, s.generations)]
        batch, per_func, completion_tokens = _rollout(raw_model, [rows[i] for i in mb], rt, seeds)
        batches.append(batch)
        scores.append((per_func, completion_tokens))
    gen_s = time.time() - t0
    t1 = time.time()
    # the step's figures over every process: completions, tokens, micro-batches and the rewards' moments
    columns = _columns(scores, rt)
    n_tok = sum(len(c) for b in batches for c in b.completions)
    in_tok = sum(len(p) + len(c) for b in batches for p, c in zip(b.prompts, b.completions, strict=True))
    step_comp, step_tok, step_mb, step_in_tok, *moments = _global_sums(
        [sum(len(b.completions) for b in batches), n_tok, len(batches), in_tok, *_moments(columns)], accelerator)
    stats = _from_moments(moments)
    batch_std = stats[1][0] if s.scale_rewards == "batch" else None
    for b, (per_func, _) in zip(batches, scores, strict=True):
        b.advantages, _ = advantages(per_func, [r.weight for r in rt.rewards], s.generations, s.scale_rewards,
                                     batch_std)
    # every process runs as many backward passes: one with fewer micro-batches adds a zero-weighted one
    work = [(b, 1.0) for b in batches]
    work += [(_placeholder(rows[micro_batches[0][0]], rt), 0.0)] * (math.ceil(len(micro_batches) / world) - len(mine))
    for b, _ in work:
        _no_grad_logps(raw_model, b, rt)
    loss_sum, clipped, kl_sum, counted = 0.0, 0.0, 0.0, 0.0
    for it in range(s.iterations):
        for k, (b, weight) in enumerate(work):
            # DDP: gradients are all-reduced once per optimizer step, after its last backward pass
            with nullcontext() if k == len(work) - 1 else accelerator.no_sync(model), rt.autocast():
                logps, mask = token_logps(model, b.prompts, b.completions, packing=rt.packing, pad_id=rt.pad_id,
                                          device=rt.device, temperature=s.temperature)
                old = logps.detach() if b.old is None else b.old
                loss, clip, kl = per_token_loss(logps, old, b.ref, b.advantages, s)
                share = reduce_loss(loss, mask, s, step_completions=int(step_comp), step_tokens=int(step_tok),
                                    step_micro_batches=int(step_mb))
            accelerator.backward(share * (world * weight))
            if it == s.iterations - 1 and weight:
                mask = mask.detach()
                per_seq = ((loss.detach() * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))
                loss_sum += float(per_seq.sum())
                clipped += float((clip * mask).sum())
                kl_sum += float((kl.detach() * mask).sum()) if kl is not None else 0.0
                counted += float(mask.sum())
        optimizer_step()
    loss_sum, clipped, kl_sum, counted = _global_sums([loss_sum, clipped, kl_sum, counted], accelerator)
    rt.window.append(_metrics(stats, rt, gen_s, time.time() - t1, clipped / max(counted, 1),
                              kl_sum / max(counted, 1) if s.beta else None))
    return loss_sum, int(step_comp), int(step_in_tok)


def _rollout(model, prompt_rows, rt: Runtime, seeds: list[int] | None):
    """Completions of ``prompt_rows``, scored: ``generations`` sampled ones each, completion ``j`` from the stream
    ``seeds[j]``, or one greedy one each when ``seeds`` is None. The advantages are the group's (the caller
    replaces them when the batch's std scales them)."""
    n = rt.settings.generations if seeds is not None else 1
    completions = rollout.generate(model, [r.ids for r in prompt_rows], n=n, settings=rt.settings,
                                   stop_ids=rt.stop_ids, pad_id=rt.pad_id, device=rt.device, seeds=seeds,
                                   autocast=rt.autocast)
    expanded = [r for r in prompt_rows for _ in range(n)]
    texts = [rt.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    prompts = [rt.tokenizer.decode(r.ids, skip_special_tokens=True) for r in expanded]
    refs = [r.reference(rt.tokenizer, rt.stop_ids) for r in expanded]
    per_func = rewards_mod.score(rt.rewards, prompts, texts, refs, completions, [r.name for r in expanded],
                                 columns=[r.columns for r in expanded])
    adv, _ = advantages(per_func, [r.weight for r in rt.rewards], n, rt.settings.scale_rewards)
    return Rollouts([list(r.ids) for r in expanded], completions, adv), per_func, [len(c) for c in completions]


def _placeholder(row: rollout.PromptRow, rt: Runtime) -> Rollouts:
    """A one-token completion of ``row`` with advantage 0: the zero-weighted backward pass of a process that has no
    micro-batch of its own left in this step (the last, incomplete step of an epoch)."""
    import torch

    return Rollouts([list(row.ids)], [[rt.stop_ids[0]]], torch.zeros(1))


def _no_grad_logps(model, b: Rollouts, rt: Runtime) -> None:
    """The old (iterations > 1) and reference (beta > 0) log-probabilities of a batch of rollouts."""
    import torch

    s = rt.settings
    kw = dict(packing=rt.packing, pad_id=rt.pad_id, device=rt.device, temperature=s.temperature)
    with torch.no_grad(), rt.autocast():
        if s.iterations > 1:
            b.old, _ = token_logps(model, b.prompts, b.completions, **kw)
        if s.beta != 0.0:
            if rt.reference is not None:
                b.ref, _ = token_logps(rt.reference, b.prompts, b.completions, **kw)
            else:
                with model.disable_adapter():
                    b.ref, _ = token_logps(model, b.prompts, b.completions, **kw)


def _columns(scores, rt: Runtime):
    """(completions, 3 + rewards) float64 values of this process's completions: the weighted reward, its length,
    whether it was cut at max_new_tokens (1/0), then each reward (NaN: no value)."""
    import torch

    if not scores:
        return torch.zeros(0, 3 + len(rt.rewards), dtype=torch.float64)
    per_func = torch.cat([p for p, _ in scores]).double()
    lengths = torch.tensor([float(n) for _, c in scores for n in c], dtype=torch.float64)
    total = weighted(per_func, [r.weight for r in rt.rewards])
    return torch.cat([total[:, None], lengths[:, None], (lengths >= rt.settings.max_new_tokens).double()[:, None],
                      per_func], dim=1)


def _moments(columns) -> list[float]:
    """Per column (NaNs left out): how many values, their sum and their sum of squares."""
    import torch

    present = ~torch.isnan(columns)
    x = torch.nan_to_num(columns)
    return [float(v) for t in (present.sum(0).double(), x.sum(0), (x * x).sum(0)) for v in t]


def _from_moments(moments: list[float]) -> tuple[list[float], list[float]]:
    """(means, stds with Bessel's correction) per column from ``_moments`` summed over the processes (NaN: no
    value; a std of fewer than two values is NaN)."""
    c = len(moments) // 3
    n, s, q = moments[:c], moments[c:2 * c], moments[2 * c:]
    means = [s[j] / n[j] if n[j] else float("nan") for j in range(c)]
    stds = [math.sqrt(max(q[j] - s[j] * s[j] / n[j], 0.0) / (n[j] - 1)) if n[j] > 1 else float("nan")
            for j in range(c)]
    return means, stds


def _metrics(stats, rt: Runtime, gen_s: float, loss_s: float, clip_fraction: float, kl: float | None):
    """The step's metrics over every process (the seconds are this process's)."""
    means, stds = stats
    out = {"reward": _nz(means[0]), "reward_std": _nz(stds[0]), "completion_length": _nz(means[1]),
           "clipped_at_max": _nz(means[2]), "clip_fraction": clip_fraction, "generation_s": round(gen_s, 3),
           "loss_s": round(loss_s, 3)}
    for j, r in enumerate(rt.rewards):
        out[f"reward/{r.label}"] = _nz(means[3 + j])
        out[f"reward/{r.label}/std"] = _nz(stds[3 + j])
    if kl is not None:
        out["kl"] = kl
    return out


def _nz(x) -> float:
    v = float(x)
    return 0.0 if math.isnan(v) else v


def _global_sums(values: list[float], accelerator) -> list[float]:
    """``values`` each summed over every process (one all-reduce, float64)."""
    if accelerator.num_processes == 1:
        return [float(v) for v in values]
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return [float(v) for v in accelerator.reduce(t, "sum").cpu()]


# ------------------------------------------------------------------------------------------ validation
def held_out_reward(model, rows, rt: Runtime, max_examples: int, batch_size: int, accelerator) -> dict[str, float]:
    """Greedy completions of the first ``max_examples`` validation prompts, scored: the weighted reward's mean
    (``val_reward``) and each reward's mean."""
    import torch

    chosen = rows[:max_examples]
    # the batches of one process, dealt out whole: each process answers batches one process would
    batches = [chosen[k:k + batch_size] for k in range(0, len(chosen), batch_size)]
    was_training = model.training
    per = []
    for batch in batches[accelerator.process_index::accelerator.num_processes]:
        _, per_func, _ = _rollout(model, batch, rt, None)
        per.append(per_func)
    if was_training:
        model.train()
    per_func = torch.cat(per) if per else torch.zeros(0, len(rt.rewards))
    w = torch.tensor([r.weight for r in rt.rewards])
    sums = torch.cat([torch.nan_to_num(per_func * w).sum().view(1), torch.nan_to_num(per_func).sum(0),
                      torch.tensor([float(len(per_func))])])
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    n = max(float(sums[-1]), 1.0)
    out = {"val_reward": round(float(sums[0]) / n, 6)}
    for j, r in enumerate(rt.rewards):
        out[f"val_reward/{r.label}"] = round(float(sums[1 + j]) / n, 6)
    return out
