"""Render and tokenize prepare's examples with the model's chat template, and filter them by length.

Chat rows are rendered with their tools and the reasoning setting (finetune.data.render); preference rows train
(and compare) the final reply only, and a pair's two conversations must render the same prompt tokens; raw text
rows get BOS + text + EOS; prompt-only rows (reward-driven training) end with the template's generation prompt and
train no token. Token arrays are numpy int32: a tenth of the memory of Python int lists.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from finetune.data.example import Example, row_kind
from finetune.data.load import Dropped, excerpt
from finetune.data.render import IGNORE_INDEX, RenderError, render_batch, render_prompts, render_text
from finetune.errors import UserError

RENDER_CHUNK = 512


def render_examples(examples: list[Example], tokenizer, *, train_on: str, reasoning: str, max_tokens: int,
                    min_tokens: int, overlong: str, dropped: list[Dropped], counters: Counter[str]) -> list[Example]:
    """Give each example its token arrays (ids, labels; the rejected conversation's too for a pair), rendered in
    chunks with the chat template; drop the rows the template refuses, that are too short, too long (``overlong``:
    drop) or left without a trained token, each with its reason in ``dropped``; ``counters["truncated"]`` counts
    the rows cut to ``max_tokens`` (overlong: truncate)."""
    def render(chunk: list[Example]) -> list[Any]:
        return _render_chunk(chunk, tokenizer, train_on=train_on, reasoning=reasoning)

    kept = []
    for start in range(0, len(examples), RENDER_CHUNK):
        chunk = examples[start: start + RENDER_CHUNK]
        try:
            results: list[Any] = render(chunk)
        except RenderError:
            results = []  # find the rows the template refuses, keep the rest
            for e in chunk:
                try:
                    results.append(render([e])[0])
                except RenderError as exc:
                    results.append(exc)
        for e, r in zip(chunk, results, strict=True):
            why = (("template_error", str(r)) if isinstance(r, Exception)
                   else _fit(e, r, max_tokens=max_tokens, min_tokens=min_tokens, overlong=overlong, counters=counters))
            if why is None:
                kept.append(e)
            else:
                dropped.append(Dropped(e.origin, why[0], why[1], excerpt(e.example)))
    refused = [d for d in dropped if d.reason == "template_error"]
    if refused and not kept and not getattr(tokenizer, "chat_template", None):  # a base model: say only that
        raise UserError(f"{refused[0].detail} ({len(refused)} rows, e.g. {refused[0].origin})")
    if refused and not kept:  # the template refuses every row: one clear error beats a report of drops
        raise UserError(f"the model's chat template refused all {len(refused)} rows, e.g. {refused[0].origin}: "
                        f"{refused[0].detail}. Some templates reject a system message or non-alternating turns; "
                        "adjust data.system_prompt or the data, or choose a model whose template fits.")
    return kept


def _render_chunk(chunk: list[Example], tokenizer, *, train_on: str, reasoning: str) -> list[Any]:
    """(ids, labels) of each example of the chunk, and (ids, labels, rejected (ids, labels) or None) for a
    preference row; the conversations of one kind rendered together."""
    # Preference rows train (and compare) the final reply only: earlier assistant turns are prompt.
    pref_on = "completion" if train_on == "completion" else "last_assistant"
    prefs = [e for e in chunk if row_kind(e.example) != "sft"]
    chats = [e for e in chunk if "messages" in e.example and row_kind(e.example) == "sft"
             and not e.example.get("prompt_only")]
    prompts = [e for e in chunk if e.example.get("prompt_only")]
    texts = [e for e in chunk if "text" in e.example]
    got: dict[int, Any] = {}
    if prefs:
        pairs = [e for e in prefs if "rejected" in e.example]
        convs = [e.example["messages"] for e in prefs] + [e.example["rejected"] for e in pairs]
        out = render_batch(tokenizer, convs, train_on=pref_on, reasoning=reasoning)
        rejected = {id(e): r for e, r in zip(pairs, out[len(prefs):], strict=True)}
        for e, r in zip(prefs, out[:len(prefs)], strict=True):
            got[id(e)] = (*r, rejected.get(id(e)))
    if chats:
        for e, r in zip(chats, render_batch(tokenizer, [e.example["messages"] for e in chats], train_on=train_on,
                                            reasoning=reasoning, tools=[e.example.get("tools") for e in chats]),
                        strict=True):
            got[id(e)] = r
    if prompts:
        for e, r in zip(prompts, render_prompts(tokenizer, [e.example["messages"] for e in prompts],
                                                tools=[e.example.get("tools") for e in prompts],
                                                reasoning=reasoning), strict=True):
            got[id(e)] = r
    if texts:
        for e, r in zip(texts, render_text(tokenizer, [e.example["text"] for e in texts]), strict=True):
            got[id(e)] = r
    return [got[id(e)] for e in chunk]


def _fit(e: Example, rendered: tuple, *, max_tokens: int, min_tokens: int, overlong: str,
         counters: Counter[str]) -> tuple[str, str] | None:
    """Store the rendered arrays on ``e`` (int32, cut to ``max_tokens`` with overlong: truncate), or say why the
    example is dropped: (reason, detail)."""
    import numpy as np

    ids, labels = rendered[0], rendered[1]
    limit = max_tokens
    rejected = rendered[2] if len(rendered) > 2 else None
    if rejected is not None:
        why = pair_problem(ids, labels, *rejected, limit if overlong == "drop" else None)
        if why is not None:
            return why
        e.rejected_ids = np.asarray(rejected[0][:limit], dtype=np.int32)
        e.rejected_labels = np.asarray(rejected[1][:limit], dtype=np.int32)
    if len(rendered) > 2:
        e.prompt_length = next((k for k, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    if len(ids) < min_tokens:
        return "too_short", f"{len(ids)} tokens < min_tokens {min_tokens}"
    prompt_only = bool(e.example.get("prompt_only"))
    if len(ids) > limit:
        if overlong == "drop":
            return "too_long", f"{len(ids)} tokens > max_tokens {limit}"
        if prompt_only:  # a cut prompt would lose the turn the model answers and the generation prompt
            return "too_long", f"a prompt of {len(ids)} tokens > max_tokens {limit} (a prompt is never cut)"
        ids, labels = ids[:limit], labels[:limit]
        counters["truncated"] += 1
    # int32 arrays: a tenth of the memory of Python int lists (100k rows: ~3 GB -> well under 1 GB)
    ids, labels = np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)
    if not prompt_only and not (labels != IGNORE_INDEX).any():
        return "no_trained_tokens", "no token left to train on (truncation cut the whole reply)"
    if e.rejected_labels is not None and not (e.rejected_labels != IGNORE_INDEX).any():
        return "no_trained_tokens", "truncation cut the whole rejected reply"
    e.ids, e.labels = ids, labels
    return None


def pair_problem(ids, labels, rej_ids, rej_labels, limit: int | None) -> tuple[str, str] | None:
    """Why a rendered pair cannot be used: its two conversations must share the prompt's tokens, differ after it,
    and (overlong: drop) fit."""
    p = next((k for k, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    q = next((k for k, t in enumerate(rej_labels) if t != IGNORE_INDEX), len(rej_labels))
    if p != q or list(ids[:p]) != list(rej_ids[:q]):
        return "pair_prompt_mismatch", "the chosen and rejected conversations do not render the same prompt tokens"
    if list(ids) == list(rej_ids):
        return "identical_pair", "chosen and rejected render to the same tokens"
    if limit is not None and len(rej_ids) > limit:
        return "too_long", f"the rejected conversation has {len(rej_ids)} tokens > max_tokens {limit}"
    return None
