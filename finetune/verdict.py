"""Did fine-tuning help? The verdict eval writes, and the statistics it rests on. Plain functions, no recipe.

Improvement is read from a paired-bootstrap 95% interval of (fine-tuned - base) on the primary metric (the same
examples resampled together for both models); exact-match rates also get 95% Wilson intervals. Over- and
underfitting are read from train's log.jsonl and from the gap between the fine-tuned model's loss on training
examples and on held-out examples. VERDICT_RULES states every rule; metrics.json and the report repeat it.

A GRPO run (train.objective grpo) is judged by its reward instead: its training loss is a policy-gradient surrogate
(it is not expected to fall, and its size says nothing of how good the answers are), and its validation "loss" is
minus the held-out reward. Improvement is the paired bootstrap of the held-out reward that eval measures on every
model's answers (finetune/eval_reward.py), over- and underfitting are read from the training and held-out rewards
in the train log, and no loss-based judgement is made. REWARD_RULES states those rules (``rules`` picks the set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# The metric the "improved?" verdict is read from: the first of these the recipe asks for (per-example scores).
PRIMARY_ORDER = [("tool_call_match", "tool_call_match"), ("exact_match", "exact_match"), ("accuracy", "correct"),
                 ("rouge", "rougeL"), ("chrf", "chrf"), ("bleu", "bleu")]
SATURATED_DROP = 0.01  # nats: a smaller fall over the last third of training is not "still falling"
# Forgetting (eval.forgetting): (top-1 agreement at least, KL nats/token at most, perplexity ratio at most) for "none",
# and the bounds past which it is "strong"; anything between is "mild".
FORGETTING_NONE = (0.90, 0.10, 1.05)
FORGETTING_STRONG = (0.75, 0.50, 1.25)

VERDICT_RULES = {
    "improved": "Improved when the 95% paired-bootstrap interval of (fine-tuned - base) on the primary metric "
                "lies entirely above 0; worse when entirely below 0; otherwise no clear difference at this "
                "sample size. Exact-match rates also get 95% Wilson intervals.",
    "overfitting": "Overfitting when the last validation loss is more than 5% above the best one while the "
                   "training loss kept falling after the best step (train log), or when the fine-tuned model's "
                   "held-out loss exceeds its loss on training examples by more than 25% and 0.1 nats/token.",
    "underfitting": "Underfitting when the training loss is still above 70% of its first value at the end, or "
                    "when training and validation loss were both still falling at the end (the last third of "
                    "the logged training loss fell by more than 5% and 0.01 nats, and the last validation loss was the "
                    "best).",
    "forgetting": "Forgetting is none when, on the base model's own greedy answers to the shipped general prompts, "
                  f"the fine-tuned model's top-1 next token agrees with the base's at >= {FORGETTING_NONE[0]:.0%} of "
                  f"positions, the mean KL(base || fine-tuned) is <= {FORGETTING_NONE[1]} nats/token and the "
                  f"perplexity on the shipped general text rose by <= {FORGETTING_NONE[2] - 1:.0%}; strong when "
                  f"agreement < {FORGETTING_STRONG[0]:.0%}, KL > {FORGETTING_STRONG[1]} nats/token or perplexity up "
                  f"by > {FORGETTING_STRONG[2] - 1:.0%}; mild otherwise.",
}

# A GRPO run's verdict (reward units: the weighted sum of train.rewards; the built-ins score within [-1, 1]).
REWARD_DROP = 0.05  # a smaller fall of the held-out reward from its best is noise, not overfitting
REWARD_RISE = 0.05  # a smaller rise of the training reward over the last third is not "still rising"
REWARD_RULES = {
    "improved": "A GRPO run is judged by its held-out reward (the weighted sum of train.rewards on each model's "
                "answers to the held-out prompts): improved when the 95% paired-bootstrap interval of (fine-tuned - "
                "base) lies entirely above 0; worse when entirely below 0; otherwise no clear difference at this "
                "sample size. Its loss is a policy-gradient surrogate and is not judged.",
    "overfitting": f"Overfitting when the last held-out reward of the train log is more than {REWARD_DROP} below "
                   "its best while the training reward kept rising after the best step.",
    "underfitting": "Underfitting when the training reward was still rising at the end (the last third of the "
                    f"logged steps rose by more than {REWARD_RISE}) and the last held-out reward was the best.",
}


def rules(reward_run: bool = False) -> dict[str, str]:
    """The verdict's rules as metrics.json and the report state them: a GRPO run's (``reward_run``) or the others'."""
    return {**VERDICT_RULES, **REWARD_RULES} if reward_run else dict(VERDICT_RULES)


def is_reward_run(variants: dict[str, dict[str, Any]], log_rows: list[dict[str, Any]]) -> bool:
    """Whether the run learned from rewards (GRPO): eval scored the answers with its rewards (``reward`` in a
    variant, finetune/eval_reward.py) or train logged rewards (``reward``, ``val_reward``)."""
    return (any("reward" in v for v in variants.values())
            or any(r.get("reward") is not None or r.get("val_reward") is not None for r in log_rows))


# ------------------------------------------------------------------------------------------ statistics
def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound at 0/n and n/n, unlike the normal approximation)."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 1.0
    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, float]:
    """Difference mean(b) - mean(a) on paired examples, with a percentile bootstrap interval.

    Examples are resampled together for both models, so the interval reflects this sample size and the
    pairing (the same prompts for both).
    """
    import numpy as np
    from scipy.stats import bootstrap

    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        return {"difference": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    difference = float(np.mean(y - x))
    if n == 1:  # every resample is the one pair (scipy asks for two)
        low = high = difference
    else:
        ci = bootstrap((x, y), lambda u, v, axis: np.mean(v - u, axis=axis), paired=True, vectorized=True,
                       n_resamples=resamples, confidence_level=confidence, method="percentile",
                       rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return {"difference": difference, "low": low, "high": high, "n": n, "confidence": confidence,
            "resamples": resamples}


# -------------------------------------------------------------------------------------------- verdict
def make_verdict(variants: dict[str, dict[str, Any]], scores: dict[str, list[dict[str, float]]],
                 example_loss: dict[str, list[float]], log_rows: list[dict[str, Any]], gen_names: list[str],
                 gguf_status: dict[str, Any]) -> dict[str, Any]:
    """The verdict of metrics.json: improved (primary metric, else held-out loss), over- and underfitting, and
    the GGUF against the fine-tuned model when its column was scored. ``scores`` and ``example_loss`` are per
    example and per variant name ("base", "finetuned", "gguf-<quant>"). A GRPO run (``is_reward_run``) gets
    ``reward_verdict`` instead."""
    if is_reward_run(variants, log_rows):
        return reward_verdict(variants, scores, log_rows, gen_names, gguf_status)
    verdict: dict[str, Any] = {}
    primary = next(((m, k) for m, k in PRIMARY_ORDER if m in gen_names), None)
    if primary and "base" in scores and "finetuned" in scores:
        metric, key = primary
        a = [s[key] for s in scores["base"]]
        b = [s[key] for s in scores["finetuned"]]
        boot = paired_bootstrap(a, b)
        verdict["improved"] = improvement(key, boot, higher_is_better=True, base=sum(a) / len(a),
                                           finetuned=sum(b) / len(b))
        if key in ("exact_match", "tool_call_match"):
            n = len(a)
            verdict["improved"]["wilson95"] = {
                "base": wilson_interval(round(sum(a)), n),
                "finetuned": wilson_interval(round(sum(b)), n),
            }
    if "base" in example_loss and "finetuned" in example_loss:
        pairs = [(x, y) for x, y in zip(example_loss["base"], example_loss["finetuned"], strict=True)
                 if not (math.isnan(x) or math.isnan(y))]
        if pairs:
            boot = paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs])
            verdict["loss"] = improvement("loss", boot, higher_is_better=False,
                                           base=variants["base"]["loss"], finetuned=variants["finetuned"]["loss"])
            verdict.setdefault("improved", verdict["loss"])
    if "improved" not in verdict:
        verdict["improved"] = {"status": "unknown", "metric": None, "summary": "nothing to compare: ask for a "
                               "generation metric or loss in eval.metrics"}
    verdict["summary"] = verdict["improved"]["summary"]
    verdict["overfitting"] = overfitting(log_rows, variants.get("finetuned", {}))
    verdict["underfitting"] = underfitting(log_rows)
    gguf_name = gguf_status.get("variant")
    if gguf_name and gguf_name in scores and primary:
        key = primary[1]
        g = [s[key] for s in scores[gguf_name]]
        f = [s[key] for s in scores["finetuned"]]
        boot = paired_bootstrap(f, g)
        verdict["gguf"] = {
            "metric": key, "finetuned": sum(f) / len(f), "gguf": sum(g) / len(g), "difference": boot["difference"],
            "ci95": [boot["low"], boot["high"]],
            "summary": f"{gguf_name} vs fine-tuned (transformers) on {key}: {sum(g) / len(g):.3f} vs "
                       f"{sum(f) / len(f):.3f} (difference {boot['difference']:+.3f}, 95% CI {boot['low']:+.3f} to "
                       f"{boot['high']:+.3f}).",
        }
    return verdict


def reward_verdict(variants: dict[str, dict[str, Any]], scores: dict[str, list[dict[str, float]]],
                   log_rows: list[dict[str, Any]], gen_names: list[str], gguf_status: dict[str, Any]) -> dict[str, Any]:
    """The verdict of a GRPO run: improved from the held-out reward (each example's weighted reward, base vs
    fine-tuned), over- and underfitting from the rewards in the train log; the primary task metric, where the
    examples have a reference, beside it (``task``). No loss-based judgement."""
    verdict: dict[str, Any] = {}
    paired = _paired(scores, "base", "finetuned", "reward")
    if paired:
        a, b = paired
        verdict["improved"] = improvement("reward", paired_bootstrap(a, b), higher_is_better=True,
                                          base=sum(a) / len(a), finetuned=sum(b) / len(b))
        verdict["improved"]["rule"] = REWARD_RULES["improved"]
    else:
        verdict["improved"] = {"status": "unknown", "metric": "reward", "summary": "nothing to compare: the held-out "
                               "answers of the base and the fine-tuned model were not scored with train.rewards"}
    primary = next(((m, k) for m, k in PRIMARY_ORDER if m in gen_names), None)
    if primary and (task := _paired(scores, "base", "finetuned", primary[1])):
        a, b = task
        verdict["task"] = improvement(primary[1], paired_bootstrap(a, b), higher_is_better=True,
                                      base=sum(a) / len(a), finetuned=sum(b) / len(b))
    verdict["summary"] = verdict["improved"]["summary"]
    verdict["overfitting"] = reward_overfitting(log_rows)
    verdict["underfitting"] = reward_underfitting(log_rows)
    gguf_name = gguf_status.get("variant")
    if gguf_name and (pair := _paired(scores, "finetuned", gguf_name, "reward")):
        f, g = pair
        boot = paired_bootstrap(f, g)
        verdict["gguf"] = {
            "metric": "reward", "finetuned": sum(f) / len(f), "gguf": sum(g) / len(g),
            "difference": boot["difference"], "ci95": [boot["low"], boot["high"]],
            "summary": f"{gguf_name} vs fine-tuned (transformers) on the held-out reward: {sum(g) / len(g):.3f} vs "
                       f"{sum(f) / len(f):.3f} (difference {boot['difference']:+.3f}, 95% CI {boot['low']:+.3f} to "
                       f"{boot['high']:+.3f}).",
        }
    return verdict


def _paired(scores: dict[str, list[dict[str, float]]], first: str, second: str,
            key: str) -> tuple[list[float], list[float]] | None:
    """(first's, second's) values of ``key`` on the examples both have it for (a task metric exists only where an
    example has a reference), or None when there are none."""
    if first not in scores or second not in scores:
        return None
    pairs = [(x[key], y[key]) for x, y in zip(scores[first], scores[second], strict=False)
             if x.get(key) is not None and y.get(key) is not None]
    return ([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else None


def reward_overfitting(log_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A GRPO run's held-out reward falling from its best while its training reward keeps rising (train log)."""
    train = [(r["step"], r["reward"]) for r in log_rows if r.get("reward") is not None]
    val = [(r["step"], r["val_reward"]) for r in log_rows if r.get("val_reward") is not None]
    flag = False
    if len(val) >= 3:
        best_step, best = max(val, key=lambda p: p[1])
        last_step, last = val[-1]
        before = [x for st, x in train if st <= best_step][-3:]
        after = [x for st, x in train if st > best_step][-3:]
        train_rose = bool(before and after) and sum(after) / len(after) > sum(before) / len(before)
        if last < best - REWARD_DROP and last_step > best_step:
            flag = train_rose
            finding = (f"held-out reward fell from {best:.3f} (step {best_step}) to {last:.3f} (step {last_step})"
                       + (" while the training reward kept rising" if train_rose else ""))
        else:
            finding = f"held-out reward at the end {last:.3f} is within {REWARD_DROP} of its best {best:.3f}"
    else:
        finding = f"only {len(val)} held-out reward point(s) in the train log: too few to see a trend"
    return {"flag": flag, "finding": ("yes: " if flag else "no: ") + finding, "rule": REWARD_RULES["overfitting"]}


def reward_underfitting(log_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A GRPO run's training and held-out rewards both still rising at the end (train log)."""
    train = [r["reward"] for r in log_rows if r.get("reward") is not None]
    val = [r["val_reward"] for r in log_rows if r.get("val_reward") is not None]
    if len(train) < 4:
        return {"flag": False, "finding": f"unknown: only {len(train)} training reward point(s) in the train log",
                "rule": REWARD_RULES["underfitting"]}
    third = max(1, len(train) // 3)
    evidence = [f"training reward {sum(train[:third]) / third:.3f} → {sum(train[-third:]) / third:.3f} (mean of the "
                "first and last third of the logged steps)"]
    tail = train[-max(4, len(train) // 3):]
    half = len(tail) // 2
    first, second = sum(tail[:half]) / half, sum(tail[half:]) / (len(tail) - half)
    train_rising = second > first + REWARD_RISE
    val_rising = len(val) >= 2 and val[-1] == max(val) and val[-1] > val[-2]
    if train_rising:
        evidence.append(f"still rising at the end ({first:.3f} → {second:.3f} over the last third)")
    if val_rising:
        evidence.append(f"held-out reward still rising at the end ({val[-2]:.3f} → {val[-1]:.3f})")
    elif train_rising:
        evidence.append("but the held-out reward is not seen still rising" + (" (fewer than 2 validation points)"
                                                                                if len(val) < 2 else ""))
    flag = train_rising and val_rising
    hint = " More steps (train.max_steps / epochs) would likely raise it further." if flag else ""
    return {"flag": flag, "finding": ("yes: " if flag else "no: ") + "; ".join(evidence) + "." + hint,
            "rule": REWARD_RULES["underfitting"]}


def forgetting(measures: dict[str, Any]) -> dict[str, Any]:
    """none / mild / strong from the forgetting check's measures (finetune.eval_forgetting): top1_agreement, kl and
    perplexity of the base and the fine-tuned model on the general text; the rule in VERDICT_RULES["forgetting"]."""
    agree, kl = measures["top1_agreement"], measures["kl"]
    ratio = measures["perplexity"]["finetuned"] / measures["perplexity"]["base"]
    if agree >= FORGETTING_NONE[0] and kl <= FORGETTING_NONE[1] and ratio <= FORGETTING_NONE[2]:
        status = "none"
    elif agree < FORGETTING_STRONG[0] or kl > FORGETTING_STRONG[1] or ratio > FORGETTING_STRONG[2]:
        status = "strong"
    else:
        status = "mild"
    summary = (f"Forgetting: {status} (general prompts: top-1 agreement with the base {agree:.3f}, KL(base || "
               f"fine-tuned) {kl:.3f} nats/token; general text perplexity {measures['perplexity']['base']:.2f} → "
               f"{measures['perplexity']['finetuned']:.2f}, x{ratio:.3f}).")
    return {"status": status, "top1_agreement": agree, "kl": kl, "perplexity_ratio": ratio,
            "summary": summary, "rule": VERDICT_RULES["forgetting"]}


def improvement(metric: str, boot: dict[str, float], *, higher_is_better: bool, base: float,
                 finetuned: float) -> dict[str, Any]:
    """Improved, worse or no clear difference, from a paired bootstrap of (fine-tuned - base), in words too."""
    low, high = boot["low"], boot["high"]
    better_low, better_high = (low, high) if higher_is_better else (-high, -low)
    status = "improved" if better_low > 0 else "worse" if better_high < 0 else "no clear difference"
    words = {"improved": "Fine-tuning improved", "worse": "Fine-tuning made it worse:",
             "no clear difference": "No clear difference in"}[status]
    label = {"tool_call_match": "function-call exact match", "exact_match": "exact match", "correct": "accuracy", "rougeL": "ROUGE-L", "chrf": "chrF (sentence)",
             "bleu": "BLEU (sentence)", "loss": "held-out loss", "reward": "held-out reward"}.get(metric, metric)
    summary = (f"{words} {label}: base {base:.3f} → fine-tuned {finetuned:.3f} (difference {boot['difference']:+.3f}, "
               f"95% CI {low:+.3f} to {high:+.3f}, n={boot['n']} paired examples).")
    return {"status": status, "metric": metric, "base": base, "finetuned": finetuned, "difference": boot["difference"],
            "ci95": [low, high], "n": boot["n"], "higher_is_better": higher_is_better, "summary": summary}


def overfitting(log_rows: list[dict[str, Any]], finetuned: dict[str, Any]) -> dict[str, Any]:
    """Validation loss rising while training loss falls (train log), or a large held-out vs training-examples gap."""
    train = [(r["step"], r["loss"]) for r in log_rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in log_rows if r.get("val_loss") is not None]
    evidence = []
    flag = False
    if len(val) >= 3:
        best_step, best = min(val, key=lambda p: p[1])
        last_step, last = val[-1]
        before = [loss for s, loss in train if s <= best_step][-3:]
        after = [loss for s, loss in train if s > best_step][-3:]
        train_fell = bool(before and after) and sum(after) / len(after) < sum(before) / len(before)
        if last > best * 1.05 and last_step > best_step:
            flag = flag or train_fell
            evidence.append(f"validation loss rose from {best:.3f} (step {best_step}) to {last:.3f} (step {last_step})"
                            + (" while training loss kept falling" if train_fell else ""))
        else:
            evidence.append(f"validation loss at the end {last:.3f} is within 5% of its best {best:.3f}")
    else:
        evidence.append(f"only {len(val)} validation point(s) in the train log: too few to see a trend")
    test_loss, train_loss = finetuned.get("loss"), finetuned.get("train_sample_loss")
    if test_loss is not None and train_loss is not None:
        gap = test_loss - train_loss
        big = test_loss > 1.25 * train_loss and gap > 0.1
        flag = flag or big
        evidence.append(f"held-out loss {test_loss:.3f} vs loss on training examples {train_loss:.3f} "
                        f"(gap {gap:+.3f}{', large' if big else ''})")
    finding = ("yes: " if flag else "no: ") + "; ".join(evidence)
    return {"flag": flag, "finding": finding, "rule": VERDICT_RULES["overfitting"]}


def underfitting(log_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Training loss still high at the end, or training and validation loss both still falling (train log)."""
    train = [r["loss"] for r in log_rows if r.get("loss") is not None]
    val = [r["val_loss"] for r in log_rows if r.get("val_loss") is not None]
    if len(train) < 4:
        return {"flag": False, "finding": f"unknown: only {len(train)} training loss point(s) in the train log",
                "rule": VERDICT_RULES["underfitting"]}
    evidence = []
    still_high = train[-1] > 0.7 * train[0]
    evidence.append(f"training loss {train[0]:.3f} → {train[-1]:.3f} ({train[-1] / train[0]:.0%} of the first value)")
    tail = train[-max(4, len(train) // 3):]
    half = len(tail) // 2
    first, second = sum(tail[:half]) / half, sum(tail[half:]) / (len(tail) - half)
    # a loss near 0 that still halves (a preference loss saturating) is not underfitting: ask for a real drop too
    train_falling = second < first * 0.95 and first - second > SATURATED_DROP
    val_falling = len(val) >= 2 and val[-1] == min(val) and val[-1] < val[-2]
    if train_falling:
        evidence.append(f"still falling at the end ({first:.3f} → {second:.3f} over the last third)")
    if val_falling:
        evidence.append(f"validation loss still improving at the end ({val[-2]:.3f} → {val[-1]:.3f})")
    elif train_falling:
        evidence.append("but validation loss is not seen still improving" + (" (fewer than 2 validation points)"
                                                                             if len(val) < 2 else ""))
    flag = still_high or (train_falling and val_falling)
    hint = " More steps (train.epochs / max_steps) or a higher learning rate would likely help." if flag else ""
    return {"flag": flag, "finding": ("yes: " if flag else "no: ") + "; ".join(evidence) + "." + hint,
            "rule": VERDICT_RULES["underfitting"]}
