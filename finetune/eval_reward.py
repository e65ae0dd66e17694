"""Eval's held-out reward for a GRPO run: every model variant's answers (base, fine-tuned, GGUF) scored by the
rewards it was trained on (``train.rewards``, training/rewards.py), beside the task metrics.

Writes into each variant of metrics.json ``reward`` (the weighted sum's mean over the examples, None counted as 0)
and ``reward/<name>`` (each reward's mean over the examples it had an opinion on); the per-example weighted reward
goes into each example's scores (examples.jsonl, the report).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from finetune.training import rewards as rewards_mod


def score(reward_configs, base_dir: Path, answers: dict[str, list[dict[str, Any]]], prompts: list[str],
          references: list[str], variants: dict[str, dict[str, Any]],
          per_example_scores: dict[str, list[dict[str, float]]], *, template: str = "") -> None:
    """Score every variant's answers with the recipe's rewards; results go into ``variants`` and
    ``per_example_scores`` (in place)."""
    built = rewards_mod.build(reward_configs, base_dir, template=template)
    names = [f"test example {k}" for k in range(len(references))]
    for name, outs in answers.items():
        texts = [o["text"] for o in outs]
        ids = [[0] * int(o.get("tokens") or 0) for o in outs]
        per_func = rewards_mod.score(built, prompts, texts, references, ids, names).tolist()
        totals = [sum(r.weight * v for r, v in zip(built, row, strict=True) if not math.isnan(v)) for row in per_func]
        variants[name]["reward"] = round(sum(totals) / max(len(totals), 1), 6)
        for j, r in enumerate(built):
            seen = [row[j] for row in per_func if not math.isnan(row[j])]
            variants[name][f"reward/{r.label}"] = round(sum(seen) / len(seen), 6) if seen else None
        for row, total in zip(per_example_scores.get(name, []), totals, strict=False):
            row["reward"] = total
    shown = ", ".join(f"{name} {v['reward']:.3f}" for name, v in variants.items() if "reward" in v)
    print(f"eval: held-out reward (train.rewards): {shown}")
