"""Eval's held-out reward for a GRPO run: every model variant's answers (base, fine-tuned, GGUF) scored by the
rewards it was trained on (``train.rewards``, training/rewards.py), beside the task metrics.

Writes into each variant of metrics.json ``reward`` (the weighted sum's mean over the examples, None counted as 0)
and ``reward/<name>`` (each reward's mean over the examples it had an opinion on); the per-example weighted reward
goes into each example's scores (examples.jsonl, the report). The verdict of a GRPO run is read from these
(finetune/verdict.py).

A GRPO run's held-out split may hold prompt-only rows (prepare keeps them for train.objective grpo: ``"prompt_only":
true``, no reply): their prompt is the whole conversation, they have no reference (a reward that compares with one
stops on them, as in training; exact-match style metrics are scored only on the rows that have one), and the row's
``extra_columns`` reach the reward functions as keyword arguments, as in training. ``examples``,
``prompt_messages`` and ``has_reference`` say which rows eval scores and how.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from finetune.training import rewards as rewards_mod


def is_prompt_only(row: dict[str, Any]) -> bool:
    """A prompt-only row of prepare's splits (reward-driven training): the conversation ends with the turn the
    model answers, and there is no reply."""
    return bool(row.get("prompt_only"))


def has_reference(row: dict[str, Any]) -> bool:
    """Whether the row has a reference answer (its last assistant turn) that task metrics compare with."""
    msgs = row.get("messages") or []
    return not is_prompt_only(row) and len(msgs) >= 2 and msgs[-1].get("role") == "assistant"


def examples(rows: list[dict[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of a split a GRPO run's eval answers: conversations ending in a reply (not an undesirable one) and
    prompt-only rows, in order, at most ``limit``."""
    kept = [r for r in rows if is_prompt_only(r) or (has_reference(r) and r.get("desirable") is not False)]
    return kept[:limit] if limit else kept


def prompt_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The turns a model answers: the conversation without its reply (all of it for a prompt-only row)."""
    return list(row["messages"]) if is_prompt_only(row) else list(row["messages"][:-1])


def score(reward_configs, base_dir: Path, answers: dict[str, list[dict[str, Any]]], prompts: list[str],
          references: list[str | None], variants: dict[str, dict[str, Any]],
          per_example_scores: dict[str, list[dict[str, float]]], *, template: str = "",
          columns: list[dict[str, Any]] | None = None) -> None:
    """Score every variant's answers with the recipe's rewards; results go into ``variants`` and
    ``per_example_scores`` (in place). ``references``: None for a prompt-only row; ``columns``: each example's
    ``extra_columns`` (the reward functions' keyword arguments), none when not given."""
    built = rewards_mod.build(reward_configs, base_dir, template=template)
    names = [f"test example {k}" for k in range(len(references))]
    for name, outs in answers.items():
        texts = [o["text"] for o in outs]
        ids = [[0] * int(o.get("tokens") or 0) for o in outs]
        per_func = rewards_mod.score(built, prompts, texts, references, ids, names, columns=columns).tolist()
        totals = [sum(r.weight * v for r, v in zip(built, row, strict=True) if not math.isnan(v)) for row in per_func]
        variants[name]["reward"] = round(sum(totals) / max(len(totals), 1), 6)
        for j, r in enumerate(built):
            seen = [row[j] for row in per_func if not math.isnan(row[j])]
            variants[name][f"reward/{r.label}"] = round(sum(seen) / len(seen), 6) if seen else None
        scores = per_example_scores.setdefault(name, [{} for _ in outs])
        for row, total in zip(scores, totals, strict=False):
            row["reward"] = total
    shown = ", ".join(f"{name} {v['reward']:.3f}" for name, v in variants.items() if "reward" in v)
    print(f"eval: held-out reward (train.rewards): {shown}")
