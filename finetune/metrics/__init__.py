"""Metrics for generated answers: the local implementations by default, the Hub's ``evaluate`` modules on request.

Each metric is computed here (``finetune.metrics.local``: scikit-learn, sacrebleu, rouge-score behind the Hub
modules' arguments and output keys), so the same answers get the same scores online and offline. With
``prefer_hub=True`` (the recipe's ``eval.hub_metrics: true``) the Hub module ``evaluate-metric/<name>`` scores
instead, when it can be loaded; which one scored is recorded next to the numbers. Plain functions, no recipe.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from finetune.metrics import local

LOCAL_METRICS = tuple(local.METRICS)
# Classification-style metrics compare normalised answer strings as class labels.
LABEL_METRICS = ("accuracy", "precision", "recall", "f1")

_hub_unreachable = False  # after one failed Hub load, stop paying for the Hub in this process


def hub_offline() -> bool:
    from finetune.models import hub_offline as hub_is_offline

    return hub_is_offline() or os.environ.get("HF_EVALUATE_OFFLINE", "0").lower() in ("1", "true", "yes")


def load(name: str, *, prefer_hub: bool = False) -> tuple[Callable[..., dict[str, Any]], str]:
    """(compute function, source) for a metric: the local one, or with ``prefer_hub`` the Hub module's ``compute``
    when the Hub can be reached. Both take the same keyword arguments and return the same keys.

    source is 'local:finetune.metrics.local.<name>' or 'hub:evaluate-metric/<name>'.
    """
    global _hub_unreachable
    if name not in local.METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(LOCAL_METRICS)}")
    if prefer_hub and not hub_offline() and not _hub_unreachable:
        import evaluate as hf_evaluate

        try:
            return hf_evaluate.load(f"evaluate-metric/{name}").compute, f"hub:evaluate-metric/{name}"
        except Exception as exc:  # no network, a proxy, a Hub outage: the local one scores, and says so
            _hub_unreachable = True
            print(f"eval: the Hub metric evaluate-metric/{name} could not be loaded ({type(exc).__name__}: {exc}); "
                  "scoring with the local metrics (metric_sources in metrics.json says which scored)")
    return local.METRICS[name], f"local:finetune.metrics.local.{name}"


# ------------------------------------------------------------------------------------------- scoring
def normalize(text: str) -> str:
    """Whitespace-trimmed answer: what exact match compares (case and punctuation count)."""
    return text.strip()


def label_of(text: str) -> str:
    """A generated answer as a class label: trimmed, case-folded, trailing full stop dropped."""
    return text.strip().casefold().rstrip(".").strip()


def score_generations(
    names: Sequence[str], predictions: Sequence[str], references: Sequence[str], *, prefer_hub: bool = False
) -> tuple[dict[str, float], list[dict[str, float]], dict[str, str]]:
    """Score generated answers against references.

    Returns (corpus scores, per-example scores, metric sources). Corpus keys: exact_match, accuracy,
    precision/recall/f1 (macro over the reference labels), rouge1/rouge2/rougeL/rougeLsum, bleu (0-1),
    chrf (0-100). Per-example keys: exact_match, correct (label match), rougeL, chrf, bleu (sentence BLEU,
    smoothed, for reading the table; the corpus value is the one to compare).
    """
    import sacrebleu

    preds = [normalize(p) for p in predictions]
    refs = [normalize(r) for r in references]
    n = len(preds)
    corpus: dict[str, float] = {}
    per_example: list[dict[str, float]] = [{} for _ in range(n)]
    sources: dict[str, str] = {}
    if n == 0:
        return corpus, per_example, sources

    if "exact_match" in names:
        compute, sources["exact_match"] = load("exact_match", prefer_hub=prefer_hub)
        corpus["exact_match"] = float(compute(predictions=preds, references=refs)["exact_match"])
        for row, p, r in zip(per_example, preds, refs, strict=True):
            row["exact_match"] = float(p == r)

    wanted_labels = [m for m in LABEL_METRICS if m in names]
    if wanted_labels:
        ref_labels = [label_of(r) for r in refs]
        pred_labels = [label_of(p) for p in preds]
        classes = sorted(set(ref_labels))
        ids = {c: i for i, c in enumerate(classes)}
        # An answer that is not one of the reference classes is wrong for every class: id -1.
        y_true = [ids[c] for c in ref_labels]
        y_pred = [ids.get(c, -1) for c in pred_labels]
        for m in wanted_labels:
            compute, sources[m] = load(m, prefer_hub=prefer_hub)
            kwargs: dict[str, Any] = {} if m == "accuracy" else {"average": "macro", "labels": list(range(len(classes)))}
            if m in ("precision", "recall"):  # the Hub's f1 module has no zero_division argument
                kwargs["zero_division"] = 0
            corpus[m] = float(compute(predictions=y_pred, references=y_true, **kwargs)[m])
        for row, t, p in zip(per_example, y_true, y_pred, strict=True):
            row["correct"] = float(t == p)

    if "rouge" in names:
        compute, sources["rouge"] = load("rouge", prefer_hub=prefer_hub)
        scores = compute(predictions=preds, references=refs, use_aggregator=False)
        for key, values in scores.items():
            corpus[key] = float(sum(values) / n)
        for row, value in zip(per_example, scores["rougeL"], strict=True):
            row["rougeL"] = float(value)

    if "bleu" in names:
        compute, sources["bleu"] = load("bleu", prefer_hub=prefer_hub)
        corpus["bleu"] = float(compute(predictions=preds, references=[[r] for r in refs])["bleu"])
        for row, p, r in zip(per_example, preds, refs, strict=True):
            row["bleu"] = sacrebleu.sentence_bleu(p, [r]).score / 100.0

    if "chrf" in names:
        compute, sources["chrf"] = load("chrf", prefer_hub=prefer_hub)
        corpus["chrf"] = float(compute(predictions=preds, references=[[r] for r in refs])["score"])
        for row, p, r in zip(per_example, preds, refs, strict=True):
            row["chrf"] = sacrebleu.sentence_chrf(p, [r]).score
    return corpus, per_example, sources


# ------------------------------------------------------------------------------------------ tool calls
def canonical_calls(calls: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Tool calls as {"name", "arguments"} with arguments parsed, from OpenAI's shape ({"function": {...}},
    arguments as JSON text or an object) or the bare one. Arguments that are not a JSON object stay as text."""
    import json

    out = []
    for call in calls or []:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        out.append({"name": function.get("name"), "arguments": arguments})
    return out


def json_equal(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value (25 == 25.0), but a boolean is never a number, and key order and
    formatting do not count."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def calls_match(predicted: Sequence[dict[str, Any]] | None, reference: Sequence[dict[str, Any]] | None) -> bool:
    """The same calls (function name + JSON-equal arguments), in any order; no call on both sides matches too."""
    left = canonical_calls(predicted)
    unmatched = canonical_calls(reference)
    if len(left) != len(unmatched):
        return False
    for call in left:
        k = next((i for i, ref in enumerate(unmatched) if ref["name"] == call["name"]
                  and json_equal(ref["arguments"], call["arguments"])), None)
        if k is None:
            return False
        unmatched.pop(k)
    return True


def answer_text(content: str, calls: Sequence[dict[str, Any]] | None = None) -> str:
    """What the text metrics compare: the answer without its reasoning, then one canonical JSON line per call
    (sorted keys, integral floats as integers), so that exact match also covers the calls."""
    import json

    def tidy(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {k: tidy(v) for k, v in value.items()}
        if isinstance(value, list):
            return [tidy(v) for v in value]
        return value

    lines = [json.dumps(tidy(c), sort_keys=True, ensure_ascii=False) for c in canonical_calls(calls)]
    return "\n".join(p for p in [content.strip(), *lines] if p)


def score_tool_calls(predicted: Sequence[Sequence[dict[str, Any]]], references: Sequence[Sequence[dict[str, Any]]]
                     ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Function-call exact match per example (calls_match) and over all examples; ``tool_call_rows`` counts the
    examples whose reference calls a tool (the others score 1 only when the model made no call either)."""
    per_example = [{"tool_call_match": float(calls_match(p, r))} for p, r in zip(predicted, references, strict=True)]
    corpus = {"tool_call_match": sum(r["tool_call_match"] for r in per_example) / len(per_example)
              if per_example else 0.0, "tool_call_rows": float(sum(bool(r) for r in references))}
    return corpus, per_example
