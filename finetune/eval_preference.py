"""Preference scores for the eval stage: on held-out pairs, how often each model prefers the chosen reply.

Read from the tokenized split prepare wrote for preference data (the same token rows training used):
pairs (``input_ids``/``labels`` the chosen conversation, ``rejected_input_ids``/``rejected_labels`` the rejected
one) or KTO's rated rows (``desirable`` 1/0; pairs are formed from a prompt's desirable and undesirable replies).
Each reply is scored by the summed log-probability of its trained tokens, as the DPO and KTO losses score it.

Per model (base and fine-tuned):
- ``preference_accuracy``: share of pairs whose chosen reply has the higher summed log-probability;
- ``preference_accuracy_per_token``: the same with the mean log-probability per token (length-neutral);
- ``logp_margin``: mean (chosen - rejected) summed log-probability.
Fine-tuned relative to the reference (the base model, as in training):
- ``reward_accuracy``: share of pairs with implicit reward ``beta * (policy - base)`` of the chosen reply above
  the rejected one's; ``reward_margin``: their mean difference; ``chosen_reward`` / ``rejected_reward``: means.
  The base's own rewards are 0 by definition (it is the reference), so it has no reward accuracy of its own.
- rated rows also get ``rated_accuracy``: share of replies whose reward is on the side of 0 their label asks for.

Plain functions over token rows and a model; no recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.verdict import paired_bootstrap, wilson_interval

Seq = tuple[list[int], list[int]]
TOKENS_PER_BATCH = 2048  # bounds the logits of one forward pass (tokens x vocabulary floats)
MAX_SEQS_PER_BATCH = 16


def read_rows(path: Path, limit: int | None) -> dict[str, Any] | None:
    """The held-out preference rows of a tokenized split, or None when it holds SFT rows.

    Returns {"kind": "pairs" | "rated", "sequences": [(ids, labels)], "pairs": [(chosen index, rejected index)],
    "rated": [(index, desirable)]}. ``limit`` caps the pairs (pairs data) or the rated rows."""
    from datasets import load_from_disk

    from finetune.training import preference

    if not Path(path).exists():
        return None
    ds = load_from_disk(str(path))
    kind = preference.has_preference_columns(ds.column_names)
    if kind is None:
        return None
    if limit:
        ds = ds.select(range(min(len(ds), limit)))
    seqs: list[Seq] = []
    pairs: list[tuple[int, int]] = []
    rated: list[tuple[int, bool]] = []
    if kind == "pairs":
        for row in ds:
            seqs += [(list(row["input_ids"]), list(row["labels"])),
                     (list(row["rejected_input_ids"]), list(row["rejected_labels"]))]
            pairs.append((len(seqs) - 2, len(seqs) - 1))
        return {"kind": "pairs", "sequences": seqs, "pairs": pairs, "rated": rated}
    by_prompt: dict[tuple[int, ...], dict[bool, list[int]]] = {}
    prompt_lengths = ds["prompt_length"] if "prompt_length" in ds.column_names else [0] * len(ds)
    for row, p in zip(ds, prompt_lengths, strict=True):
        seqs.append((list(row["input_ids"]), list(row["labels"])))
        good = bool(row[preference.LABEL_COLUMN])
        rated.append((len(seqs) - 1, good))
        by_prompt.setdefault(tuple(row["input_ids"][:p]), {True: [], False: []})[good].append(len(seqs) - 1)
    for groups in by_prompt.values():
        pairs += [(c, r) for c in groups[True] for r in groups[False]]
    return {"kind": "rated", "sequences": seqs, "pairs": pairs, "rated": rated}


def sequence_logps(model, sequences: Sequence[Seq], *, pad_id: int, device) -> list[tuple[float, int]]:
    """(summed log-probability of the trained tokens, trained tokens) of each sequence, without gradients, in
    padded batches of similar lengths (the training code's own function computes each batch)."""
    import torch

    from finetune.training import preference

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    out: list[tuple[float, int] | None] = [None] * len(sequences)
    batch: list[int] = []

    def flush(idx: list[int]) -> None:
        with torch.no_grad():
            sums, counts = preference.sequence_logps(model, [sequences[i] for i in idx], packing=False,
                                                     pad_id=pad_id, device=device)
        for i, s, n in zip(idx, sums.tolist(), counts.tolist(), strict=True):
            out[i] = (float(s), int(n))

    for i in order:
        width = len(sequences[i][0])
        if batch and ((len(batch) + 1) * width > TOKENS_PER_BATCH or len(batch) == MAX_SEQS_PER_BATCH):
            flush(batch)
            batch = []
        batch.append(i)
    if batch:
        flush(batch)
    return out  # type: ignore[return-value]


def score(rows: dict[str, Any], logps: dict[str, list[tuple[float, int]]], *, beta: float,
          reference: str = "base", policy: str = "finetuned") -> dict[str, Any]:
    """Per-model preference accuracies and the policy's implicit rewards against the reference (see module doc).

    Returns {"kind", "pairs", "rows", "beta", "models": {name: {...}}, "reward": {...} | None, "per_pair": [...]}."""
    pairs = rows["pairs"]
    models: dict[str, dict[str, Any]] = {}
    per_pair: list[dict[str, Any]] = [{"chosen_tokens": logps[reference][c][1], "rejected_tokens":
                                       logps[reference][r][1]} for c, r in pairs]
    for name, values in logps.items():
        right = right_per_token = 0
        margins = []
        for k, (c, r) in enumerate(pairs):
            (sc, nc), (sr, nr) = values[c], values[r]
            right += sc > sr
            right_per_token += sc / max(nc, 1) > sr / max(nr, 1)
            margins.append(sc - sr)
            per_pair[k].setdefault("chosen_logp", {})[name] = round(sc, 5)
            per_pair[k].setdefault("rejected_logp", {})[name] = round(sr, 5)
            per_pair[k].setdefault("prefers_chosen", {})[name] = int(sc > sr)
        n = max(len(pairs), 1)
        models[name] = {"preference_accuracy": right / n if pairs else None,
                        "preference_accuracy_per_token": right_per_token / n if pairs else None,
                        "logp_margin": sum(margins) / n if pairs else None}
    reward = None
    if policy in logps and reference in logps:
        ref, pol = logps[reference], logps[policy]

        def rew(i: int) -> float:
            return beta * (pol[i][0] - ref[i][0])

        chosen = [rew(c) for c, _ in pairs]
        rejected = [rew(r) for _, r in pairs]
        for k in range(len(pairs)):
            per_pair[k].update(chosen_reward=round(chosen[k], 5), rejected_reward=round(rejected[k], 5),
                               reward_margin=round(chosen[k] - rejected[k], 5))
        n = max(len(pairs), 1)
        correct = sum(c > r for c, r in zip(chosen, rejected, strict=True))
        reward = {"reward_accuracy": correct / n if pairs else None,
                  "reward_accuracy_wilson95": list(wilson_interval(correct, len(pairs))) if pairs else None,
                  "reward_margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / n if pairs else None,
                  "chosen_reward": sum(chosen) / n if pairs else None,
                  "rejected_reward": sum(rejected) / n if pairs else None}
        if rows["rated"]:
            on_side = sum((rew(i) > 0) == good for i, good in rows["rated"])
            reward["rated_accuracy"] = on_side / len(rows["rated"])
        models[policy].update(reward)
    return {"kind": rows["kind"], "pairs": len(pairs), "rows": len(rows["rated"]) or len(pairs), "beta": beta,
            "reference": reference, "models": models, "reward": reward, "per_pair": per_pair}


def verdict(result: dict[str, Any], *, reference: str = "base", policy: str = "finetuned") -> dict[str, Any] | None:
    """Did the policy come to prefer the chosen replies more often than the base? A paired bootstrap over pairs of
    (prefers chosen: 0/1) under each model, plus the reward accuracy against the reference."""
    rows = result["per_pair"]
    if not rows or policy not in result["models"]:
        return None
    a = [r["prefers_chosen"][reference] for r in rows]
    b = [r["prefers_chosen"][policy] for r in rows]
    boot = paired_bootstrap(a, b)
    low, high = boot["low"], boot["high"]
    status = "improved" if low > 0 else "worse" if high < 0 else "no clear difference"
    reward = result["reward"] or {}
    summary = (f"Preference accuracy on {len(rows)} held-out pairs (chosen reply more likely than rejected): base "
               f"{sum(a) / len(a):.3f} → fine-tuned {sum(b) / len(b):.3f} (difference {boot['difference']:+.3f}, "
               f"95% CI {low:+.3f} to {high:+.3f}); reward accuracy against the base {reward['reward_accuracy']:.3f}, "
               f"mean reward margin {reward['reward_margin']:+.3f} (beta {result['beta']}).")
    return {"status": status, "metric": "preference_accuracy", "base": sum(a) / len(a), "finetuned": sum(b) / len(b),
            "difference": boot["difference"], "ci95": [low, high], "n": boot["n"],
            "reward_accuracy": reward.get("reward_accuracy"), "reward_margin": reward.get("reward_margin"),
            "summary": summary}


def answer_shape(texts: Sequence[str]) -> dict[str, float | None]:
    """Length of the answers, the behaviour preference tuning often moves: mean words and mean lines."""
    if not texts:
        return {"answer_words": None, "answer_lines": None}
    words = [len(t.split()) for t in texts]
    lines = [sum(1 for line in t.splitlines() if line.strip()) for t in texts]
    return {"answer_words": sum(words) / len(words), "answer_lines": sum(lines) / len(lines)}
