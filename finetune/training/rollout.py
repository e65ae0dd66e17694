"""GRPO's prompts and rollouts: prompt rows read from prepare's tokenized splits, and batched sampling from the
training model.

Prompt rows come from the rows prepare already writes (messages, prompt/completion, alpaca, TRL's prompt-only rows:
templated, split and checked like every other run): the prompt is everything before the row's last trained span (it
ends with the chat template's assistant header), the reference is that span's text without the end-of-turn token. A
row without a trained token is prompt-only (reference None): prepare rendered it up to the generation prompt. The
row's other columns (prepare's ``extra_columns``) go to the reward functions as keyword arguments, as TRL passes a
dataset's other columns.

Generation is ``model.generate`` on the training model itself (adapter on, eval mode, no gradients, KV cache),
left-padded, every prompt's completions in one call, stopping at the end-of-turn ids of ``models.stop_ids``
(via eval_models.stop_ids_of: one home). A completion keeps its stop token (it is trained: the model learns to
stop), as TRL's completion mask does.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data import tokenized
from finetune.data.render import IGNORE_INDEX
from finetune.errors import UserError


@dataclass(frozen=True)
class PromptRow:
    ids: tuple[int, ...]                      # the rendered prompt, up to the assistant's reply
    reference_ids: tuple[int, ...] | None     # the reference reply's tokens (None: a prompt-only row)
    name: str                                 # "training row 12": how errors name it
    columns: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # for the reward functions

    def reference(self, tokenizer, stop_ids) -> str | None:
        if self.reference_ids is None:
            return None
        ids = list(self.reference_ids)
        while ids and ids[-1] in stop_ids:
            ids.pop()
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    @property
    def length(self) -> int:
        return len(self.ids)


def prompt_row(input_ids, labels, name: str, columns: dict[str, Any] | None = None) -> PromptRow:
    """The prompt (before the last trained span) and the reference (that span) of one tokenized row, with the
    row's columns for the reward functions."""
    ids, labels = [int(t) for t in input_ids], [int(t) for t in labels]
    trained = [k for k, lab in enumerate(labels) if lab != IGNORE_INDEX]
    if not trained:
        return PromptRow(tuple(ids), None, name, dict(columns or {}))
    end = trained[-1] + 1
    start = end - 1
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return PromptRow(tuple(ids[:start]), tuple(ids[start:end]), name, dict(columns or {}))


def load_rows(path: Path, split: str) -> list[PromptRow]:
    ds = tokenized.load(path)
    missing = {"input_ids", "labels"} - set(ds.column_names)
    if missing:
        raise UserError(f"{path}: the tokenized {split} split lacks columns {sorted(missing)}; train.objective grpo "
                        "reads prompt (+ reference) rows: messages, prompt/completion, alpaca or prompt-only rows. "
                        "Rerun prepare.")
    extra = tokenized.extra_columns(ds)
    rows = [prompt_row(i, lab, f"{split} row {k}", extra[k]) for k, (i, lab) in enumerate(tokenized.rows(ds))]
    rows = [r for r in rows if r.ids]
    if split == "train" and not rows:
        raise UserError(f"{path}: the training split has no prompt; check data.sources and rerun prepare.")
    return rows


def step_seed(seed: int, step: int, rank: int, micro_batch: int) -> int:
    """The rollouts' seed of one micro-batch: a pure function of (recipe seed, step, process, micro-batch), so a
    resumed run samples what an uninterrupted one would."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + micro_batch * 31) % (2**63 - 1)


def generate(model, prompts: list[tuple[int, ...]], *, n: int, settings, stop_ids: list[int], pad_id: int, device,
             seed: int, sample: bool, autocast) -> list[list[int]]:
    """``n`` completions of each prompt (consecutive), each cut after its first stop token."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for k, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[k, width - len(p):] = torch.tensor(p)
        mask[k, width - len(p):] = 1
    kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                                  use_cache=True, num_return_sequences=n)
    if sample:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    devices = [device] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast(), _padded_attention(model):
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    finally:
        if was_training:
            model.train()
    completions = []
    for row in out[:, width:].tolist():
        stop = next((k for k, t in enumerate(row) if t in stop_ids), None)
        completions.append(row if stop is None else row[:stop + 1])
    return [c if c else [stop_ids[0]] for c in completions]  # an empty completion still ends its turn


@contextmanager
def _padded_attention(model):
    """Training's packed-batch attention (training/attention.py) takes one packed row; generation runs padded
    batches, so the model attends with SDPA (eager where SDPA is unsupported) while it generates."""
    from finetune.training import attention

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attn = getattr(base.config, "_attn_implementation", None)
    if attn != attention.NAME:
        yield
        return
    try:
        base.set_attn_implementation("sdpa")
    except (ValueError, ImportError):  # an architecture without SDPA support (gpt-oss: attention sinks)
        base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(attn)
