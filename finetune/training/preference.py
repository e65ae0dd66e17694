"""Preference objectives: DPO, KTO, ORPO and SimPO losses over prepared preference rows.

The losses are the published ones, in TRL's conventions (tests/unit/test_train_preference.py checks each against
TRL on the same batch and model to 1e-5):

- DPO (Rafailov et al. 2023, TRL ``loss_type="sigmoid"``): ``-logsigmoid(beta * ((pc - rc) - (pr - rr)))`` per pair,
  where p/r are the summed log-probabilities of the completion under the policy and the reference.
- KTO (Ethayarajh et al. 2024): desirable ``w_d * (1 - sigmoid(beta * (p - r - z)))``, undesirable
  ``w_u * (1 - sigmoid(beta * (z - (p - r))))``; ``z`` the batch's KL estimate, mean(policy - reference) over
  mismatched (prompt, completion) pairs, detached and clamped at 0. Mean over the examples.
- ORPO (Hong et al. 2024): NLL of the chosen completion (mean over its trained tokens) plus
  ``-beta * logsigmoid(log odds(chosen) - log odds(rejected))`` with per-token mean log-probabilities. The NLL
  covers the chosen completion's trained tokens (data.train_on), as SFT does; TRL's ORPO also trains on the prompt.
- SimPO (Meng et al. 2024, TRL's CPO ``loss_type="simpo"`` with ``cpo_alpha=0``): ``-logsigmoid(beta * (mc - mr) -
  gamma)`` per pair, m the mean log-probability per trained token of the completion under the policy; no reference.

A reference model is needed by DPO and KTO. With adapters it is the base with the adapter disabled (no second
copy of the weights); full fine-tuning computes the reference log-probabilities once, before the first update.

Rows come from prepare: ``input_ids``/``labels`` (the chosen or only completion, with its prompt),
``rejected_input_ids``/``rejected_labels`` for pairs, ``desirable`` (1/0) for KTO's unpaired rows and
``prompt_length`` (tokens of the shared prompt; KTO's mismatched pairs are cut there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data import tokenized
from finetune.data.render import IGNORE_INDEX
from finetune.errors import UserError

OBJECTIVES = ("sft", "dpo", "kto", "orpo", "simpo")
PAIRED = ("dpo", "orpo", "simpo")
NEEDS_REFERENCE = ("dpo", "kto")
# The tokenized preference columns prepare writes (beside input_ids / labels / length).
PAIR_COLUMNS = ("rejected_input_ids", "rejected_labels")
LABEL_COLUMN = "desirable"
PROMPT_COLUMN = "prompt_length"

Seq = tuple[list[int], list[int]]  # (input_ids, labels), labels -100 where not trained


@dataclass(frozen=True)
class Row:
    """One preference example: (chosen, rejected) for pairs, (completion,) with ``desirable`` for KTO."""

    sequences: tuple[Seq, ...]
    prompt_length: int
    desirable: bool | None = None

    @property
    def length(self) -> int:
        return sum(len(ids) for ids, _ in self.sequences)


@dataclass(frozen=True)
class Settings:
    objective: str
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    gamma: float = 0.5  # SimPO's target reward margin


def forward_passes(objective: str, method: str, *, generations: int = 1, reference: bool = False,
                   iterations: int = 1) -> dict[str, float]:
    """Forward passes per trained sequence, relative to SFT on the same tokens (the planner's arithmetic).

    ``sequences``: sequences per example (a pair is two; a GRPO prompt its ``generations`` completions);
    ``with_grad``: forward+backward passes per sequence (GRPO: ``iterations``); ``no_grad``: extra forward-only
    passes per sequence (reference; KTO's mismatched pairs under policy and reference; GRPO: the generation,
    counted as one forward over the sequence, the reference with ``reference`` (beta > 0), the old log-probabilities
    with iterations > 1). Full fine-tuning computes the DPO/KTO reference once before training: counted as one
    pass per epoch."""
    if objective == "grpo":
        return {"sequences": generations, "with_grad": iterations,
                "no_grad": 1 + int(reference) + int(iterations > 1)}
    if objective == "sft":
        return {"sequences": 1, "with_grad": 1, "no_grad": 0}
    if objective in ("orpo", "simpo"):
        return {"sequences": 2, "with_grad": 1, "no_grad": 0}
    if objective == "dpo":
        return {"sequences": 2, "with_grad": 1, "no_grad": 1}
    return {"sequences": 1, "with_grad": 1, "no_grad": 3}  # kto: reference + KL under policy and reference


# ------------------------------------------------------------------------------------------ the losses
def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair DPO losses and the implicit rewards beta * (policy - reference) of chosen and rejected."""
    import torch.nn.functional as F

    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_kl(policy_kl, ref_kl):
    """KTO's reference point z: the mean log-ratio over mismatched pairs, detached and clamped at 0."""
    return (policy_kl - ref_kl).mean().detach().clamp(min=0)


def kto_losses(policy, ref, desirable, kl, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0):
    """Per-example KTO losses (weighted) and implicit rewards. ``desirable``: a bool tensor."""
    import torch

    ratio = policy - ref
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, good, bad), beta * ratio.detach()


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_losses(chosen_mean_logps, rejected_mean_logps, beta: float):
    """Per-pair odds-ratio terms ``-beta * logsigmoid(log odds ratio)`` and the log odds ratios."""
    import torch.nn.functional as F

    c, r = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return -beta * F.logsigmoid(log_odds), log_odds


def simpo_losses(chosen_mean_logps, rejected_mean_logps, beta: float, gamma: float):
    """Per-pair SimPO losses and the rewards beta * mean log-probability of chosen and rejected."""
    import torch.nn.functional as F

    chosen, rejected = beta * chosen_mean_logps, beta * rejected_mean_logps
    return -F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach()


# ------------------------------------------------------------------------------ log-probs of sequences
def sequence_logps(model, sequences: Sequence[Seq], *, packing: bool, pad_id: int, device):
    """(sum of log-probabilities of the trained tokens, number of trained tokens) of each sequence.

    Packed: every sequence in one row (positions restart per sequence, per-sequence attention), the vocabulary
    projected only at positions whose next token is trained. Padded: right-padded rows with an attention mask. The
    projection runs a chunk of tokens at a time (training/loss.py)."""
    import torch
    import torch.nn.functional as F

    from finetune.training import batching, loss

    seqs = [(list(ids), list(labels)) for ids, labels in sequences]
    n = len(seqs)
    if packing:
        batch = batching.collate_packed(seqs)
        owner = torch.tensor([k for k, (ids, _) in enumerate(seqs) for _ in ids], device=device)[1:]
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        targets = batch.pop("labels")[0, 1:]
        keep = (targets != IGNORE_INDEX).nonzero().flatten()
        token_logps = loss.trained_logps(model, batch, targets[keep][None], logits_to_keep=keep)
        seq_of = owner[keep]
    else:
        batch = batching.collate_padded(seqs, pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        targets = F.pad(batch.pop("labels")[:, 1:], (0, 1), value=IGNORE_INDEX)  # the last position: no next token
        token_logps = loss.trained_logps(model, batch, targets)
        rows = torch.arange(n, device=device).unsqueeze(1).expand_as(targets)
        seq_of = rows[targets != IGNORE_INDEX]
    sums = torch.zeros(n, device=token_logps.device, dtype=token_logps.dtype).index_add(0, seq_of, token_logps)
    counts = torch.zeros(n, device=token_logps.device, dtype=token_logps.dtype).index_add(
        0, seq_of, torch.ones_like(token_logps))
    return sums, counts


def kl_sequence(row: Row, other: Row) -> Seq:
    """KTO's mismatched pair: this row's prompt with the other row's completion."""
    ids, labels = row.sequences[0]
    o_ids, o_labels = other.sequences[0]
    p, q = row.prompt_length, other.prompt_length
    return list(ids[:p]) + list(o_ids[q:]), [IGNORE_INDEX] * p + list(o_labels[q:])


def kl_partner(index: int, n_rows: int) -> int:
    """The row whose completion is paired with this row's prompt: the previous one in the split (fixed, so a
    reference computed once stays valid; TRL rotates within a batch the same way)."""
    return (index - 1) % n_rows


# ------------------------------------------------------------------------------------- one micro-batch
@dataclass
class BatchResult:
    loss: Any  # the micro-batch's share of the step loss (a tensor with grad)
    loss_sum: float  # sum of per-unit losses (pairs or examples), for logging
    units: int
    correct: int  # pairs with chosen reward > rejected reward (KTO: examples on the right side of 0)
    margin_sum: float
    chosen_reward_sum: float
    rejected_reward_sum: float


def units(rows: Sequence[Row]) -> int:
    return len(rows)


def chosen_targets(rows: Sequence[Row]) -> int:
    return sum(tokenized.count_targets(labels) for r in rows for _, labels in r.sequences[:1])


def batch_loss(forward: Callable[[Sequence[Seq]], tuple[Any, Any]],
               reference: Callable[[Sequence[int], Sequence[Seq], str], Any] | None,
               rows: Sequence[Row], indices: Sequence[int], all_rows: Sequence[Row], settings: Settings, *,
               step_units: int, step_chosen_targets: int, no_grad_forward: Callable | None = None) -> BatchResult:
    """The objective's loss on one micro-batch, normalised by the whole step (``step_units`` pairs or examples;
    ``step_chosen_targets`` trained tokens of the chosen completions, ORPO's NLL), so accumulation and data
    parallelism leave the update unchanged.

    ``forward(seqs)`` -> (sum logps, token counts) under the policy with gradients; ``reference(indices, seqs,
    kind)`` -> reference sum logps (kind: "main" or "kl"); ``no_grad_forward`` the policy without gradients."""
    import torch

    obj = settings.objective
    if obj in PAIRED:
        seqs = [r.sequences[0] for r in rows] + [r.sequences[1] for r in rows]
        sums, counts = forward(seqs)
        n = len(rows)
        pc, pr = sums[:n], sums[n:]
        if obj == "dpo":
            ref = reference(indices, seqs, "main")
            losses, cr, rr = dpo_losses(pc, pr, ref[:n], ref[n:], settings.beta)
            loss = losses.sum() / step_units
        elif obj == "simpo":
            cc, rc = counts[:n].clamp(min=1), counts[n:].clamp(min=1)
            losses, cr, rr = simpo_losses(pc / cc, pr / rc, settings.beta, settings.gamma)
            loss = losses.sum() / step_units
        else:
            cc, rc = counts[:n].clamp(min=1), counts[n:].clamp(min=1)
            odds, _ = orpo_odds_losses(pc / cc, pr / rc, settings.beta)
            nll = -pc.sum() / max(step_chosen_targets, 1)
            losses = -pc / cc + odds  # for logging: per-pair NLL (mean per token) + odds term
            loss = nll + odds.sum() / step_units
            cr, rr = settings.beta * (pc / cc).detach(), settings.beta * (pr / rc).detach()
        correct = int((cr > rr).sum())
        return BatchResult(loss, float(losses.detach().sum()), n, correct, float((cr - rr).sum()),
                           float(cr.sum()), float(rr.sum()))
    # kto
    seqs = [r.sequences[0] for r in rows]
    sums, _ = forward(seqs)
    kl_seqs = [kl_sequence(all_rows[i], all_rows[kl_partner(i, len(all_rows))]) for i in indices]
    with torch.no_grad():
        policy_kl, _ = no_grad_forward(kl_seqs)
    ref = reference(indices, seqs, "main")
    ref_kl = reference(indices, kl_seqs, "kl")
    z = kto_kl(policy_kl, ref_kl)
    desirable = torch.tensor([bool(r.desirable) for r in rows], device=sums.device)
    losses, rewards = kto_losses(sums, ref, desirable, z, settings.beta, settings.desirable_weight,
                                 settings.undesirable_weight)
    right = int(((rewards > 0) == desirable).sum())
    good, bad = rewards[desirable], rewards[~desirable]
    return BatchResult(losses.sum() / step_units, float(losses.detach().sum()), len(rows), right,
                       float(rewards.sum()), float(good.sum()), float(bad.sum()))


class Reference:
    """Reference log-probabilities: the adapter-disabled base computed per batch, or values computed once."""

    def __init__(self, model, *, adapters: bool, packing: bool, pad_id: int, device, autocast=nullcontext):
        self.model, self.adapters, self.packing, self.pad_id, self.device = model, adapters, packing, pad_id, device
        self.autocast = autocast
        self.cache: dict[tuple[str, int], list[float]] | None = None

    def compute(self, seqs: Sequence[Seq]):
        import torch

        with torch.no_grad(), (self.model.disable_adapter() if self.adapters else nullcontext()), self.autocast():
            sums, _ = sequence_logps(self.model, seqs, packing=self.packing, pad_id=self.pad_id, device=self.device)
        return sums

    def precompute(self, rows: Sequence[Row], objective: str, batch_size: int) -> None:
        """Full fine-tuning: the base's log-probabilities of every sequence, before any update."""
        cache: dict[tuple[str, int], list[float]] = {}
        for start in range(0, len(rows), batch_size):
            idx = list(range(start, min(start + batch_size, len(rows))))
            main = [s for i in idx for s in rows[i].sequences]
            sums = self.compute(main).tolist()
            per = len(rows[0].sequences)
            for k, i in enumerate(idx):
                cache[("main", i)] = sums[k * per:(k + 1) * per]
            if objective == "kto":
                kl = self.compute([kl_sequence(rows[i], rows[kl_partner(i, len(rows))]) for i in idx]).tolist()
                for k, i in enumerate(idx):
                    cache[("kl", i)] = [kl[k]]
        self.cache = cache

    def __call__(self, indices: Sequence[int], seqs: Sequence[Seq], kind: str):
        import torch

        if self.cache is None:
            return self.compute(seqs)
        if kind == "kl" or len(seqs) == len(indices):
            values = [self.cache[(kind, i)][0] for i in indices]
        else:  # pairs: all chosen, then all rejected (batch_loss's order)
            values = [self.cache[("main", i)][0] for i in indices] + [self.cache[("main", i)][1] for i in indices]
        return torch.tensor(values, device=self.device)


# ------------------------------------------------------------------------------------------- the data
def has_preference_columns(columns: Sequence[str]) -> str | None:
    """"pairs", "unpaired" (KTO rows) or None (SFT rows) from a tokenized split's columns."""
    if all(c in columns for c in PAIR_COLUMNS):
        return "pairs"
    if LABEL_COLUMN in columns:
        return "unpaired"
    return None


def load_rows(path: Path, split: str, objective: str) -> list[Row]:
    """Preference rows of a tokenized split, shaped for the objective (KTO takes pairs as one desirable and one
    undesirable row, as TRL's unpairing does)."""
    ds = tokenized.load(path)
    kind = has_preference_columns(ds.column_names)
    if kind is None or (objective in PAIRED and kind != "pairs"):
        need = ("pairs (prompt/chosen/rejected)" if objective in PAIRED
                else "preference rows (prompt/chosen/rejected pairs or prompt/completion/label)")
        has = "unpaired prompt/completion/label rows" if kind == "unpaired" else "SFT rows"
        raise UserError(f"{path}: train.objective {objective} needs {need}, but the prepared {split} split has "
                        f"{has} (columns {ds.column_names}). Point data.sources at preference data and rerun "
                        "prepare, or set train.objective=" + ("kto" if kind == "unpaired" else "sft") + ".")
    prompt = ds[PROMPT_COLUMN] if PROMPT_COLUMN in ds.column_names else [0] * len(ds)
    rows: list[Row] = []
    chosen = tokenized.rows(ds)
    if kind == "pairs":
        rejected = tokenized.rows(ds, prefix="rejected_")
        for (c, r, p) in zip(chosen, rejected, prompt, strict=True):
            if not (_trained(c) and _trained(r)):
                continue
            if objective == "kto":
                rows += [Row((c,), p, True), Row((r,), p, False)]
            else:
                rows.append(Row((c, r), p))
    else:
        for (c, p, d) in zip(chosen, prompt, ds[LABEL_COLUMN], strict=True):
            if _trained(c):
                rows.append(Row((c,), p, bool(d)))
    if split == "train" and not rows:
        raise UserError(f"{path}: no {split} row has a trained token in every completion; check data.train_on and "
                        "rerun prepare.")
    return rows


def _trained(seq: Seq) -> bool:
    return tokenized.has_target(seq[1])
