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

Sampling draws each completion from its own random stream, seeded by (recipe seed, step, the prompt's row in the
training split, the completion's number): the argmax of the temperature-scaled, top-p-filtered logits plus Gumbel
noise from that stream (the Gumbel-max trick: exactly a draw from the softmax of those logits). So a completion
depends on its prompt and step only, never on the process that samples it, the rows batched beside it or a
resumption: N processes sample what one process does, and a resumed run what an uninterrupted one did.
"""

from __future__ import annotations

import hashlib
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


def completion_seeds(seed: int, step: int, row: int, n: int) -> list[int]:
    """The random streams' seeds of the ``n`` completions of training row ``row`` at optimizer step ``step`` (a row
    is in a step at most once: a step's micro-batches are cut from one epoch): a pure function of the four numbers,
    so neither the process that samples them nor a resumption changes them."""
    return [int.from_bytes(hashlib.blake2b(f"{seed}/{step}/{row}/{k}".encode(), digest_size=8).digest(), "little")
            >> 1 for k in range(n)]


def generate(model, prompts: list[tuple[int, ...]], *, n: int, settings, stop_ids: list[int], pad_id: int, device,
             seeds: list[int] | None, autocast) -> list[list[int]]:
    """``n`` completions of each prompt (consecutive), each cut after its first stop token: sampled, completion
    ``j`` from the random stream ``seeds[j]`` (``completion_seeds``), or greedy when ``seeds`` is None."""
    import torch

    prompts = [p for p in prompts for _ in range(n)]  # one sequence per completion
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for k, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[k, width - len(p):] = torch.tensor(p)
        mask[k, width - len(p):] = 1
    # decoding is greedy; sampling is greedy decoding of the scores plus each sequence's Gumbel noise
    kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                                  use_cache=True, do_sample=False, temperature=None, top_p=None, top_k=None)
    if seeds is not None:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} completions")
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([SeededSampling(seeds, settings.temperature,
                                                                         settings.top_p)])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(), _padded_attention(model):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    finally:
        if was_training:
            model.train()
    completions = []
    for row in out[:, width:].tolist():
        stop = next((k for k, t in enumerate(row) if t in stop_ids), None)
        completions.append(row if stop is None else row[:stop + 1])
    return [c if c else [stop_ids[0]] for c in completions]  # an empty completion still ends its turn


class SeededSampling:
    """A logits processor that turns greedy decoding into sampling with one random stream per sequence: the scores
    become ``logits / temperature`` (top-p filtered as transformers' TopPLogitsWarper does) plus Gumbel noise
    drawn from the sequence's own generator, whose argmax is a draw from the softmax of the filtered scores. Each
    generator is advanced once per generated token, so what a sequence samples depends only on its seed."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.seeds, self.temperature, self.top_p = list(seeds), float(temperature), float(top_p)
        self.generators: list[Any] = []

    def __call__(self, input_ids, scores):
        import torch

        if len(scores) != len(self.seeds):
            raise ValueError(f"{len(scores)} sequences for {len(self.seeds)} seeds")
        if not self.generators:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            from transformers import TopPLogitsWarper

            scores = TopPLogitsWarper(self.top_p)(input_ids, scores)
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
        return scores - torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))


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
