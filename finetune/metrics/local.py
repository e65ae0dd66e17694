"""The local metrics: plain functions with the arguments and output keys of the Hub's ``evaluate-metric/<name>``
modules, computed by the libraries the field uses (scikit-learn, sacrebleu, Google's rouge-score).

Why plain functions and not local ``evaluate`` modules: an ``evaluate`` module is a script that ``evaluate.load``
copies into a cache and imports by path, with a class, a ``MetricInfo`` and Arrow features around one library call;
eight such scripts were eight copies of that frame. Here each metric is the library call itself, and ``METRICS``
maps the Hub's name to it, so ``finetune.metrics.load`` hands back either this function or a Hub module's
``compute`` and the caller passes the same keyword arguments to both. Only the arguments the scorer passes are
taken; an unknown one is a TypeError, never silently dropped.

One difference from the Hub on purpose: ROUGE with ``use_aggregator=True`` is the plain mean of the per-example
F-measures (the Hub module reports the median of an unseeded bootstrap, close to it but not repeatable).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Share of predictions equal to their reference, to the letter."""
    same = [p == r for p, r in zip(predictions, references, strict=True)]
    return {"exact_match": sum(same) / len(same) if same else 0.0}


def _label_metric(name: str) -> Callable[..., dict[str, float]]:
    """accuracy / precision / recall / f1 over integer class labels: scikit-learn's ``<name>_score`` with the
    Hub module's argument order (predictions, references) and keyword arguments (average, labels, zero_division)."""

    def compute(predictions: Sequence[int], references: Sequence[int], **kwargs: Any) -> dict[str, float]:
        import sklearn.metrics

        score = getattr(sklearn.metrics, f"{name}_score")(list(references), list(predictions), **kwargs)
        return {name: float(score)}

    compute.__name__ = compute.__qualname__ = name
    return compute


def rouge(predictions: Sequence[str], references: Sequence[str], *, use_aggregator: bool = True
          ) -> dict[str, float | list[float]]:
    """ROUGE-1/2/L/Lsum F-measures (rouge-score, no stemmer): the mean over examples, or one value per example
    without the aggregator."""
    from rouge_score import rouge_scorer

    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(rouge_types=types)
    per_example: dict[str, list[float]] = {t: [] for t in types}
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for t in types:
            per_example[t].append(float(scores[t].fmeasure))
    if use_aggregator:
        import numpy as np

        return {t: float(np.mean(v)) if v else 0.0 for t, v in per_example.items()}
    return dict(per_example)


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """The Hub's references (one list per prediction) as sacrebleu's streams (one list per reference slot)."""
    counts = sorted({len(r) for r in references})
    if len(counts) > 1:
        raise ValueError(f"every prediction needs the same number of references, got {counts}")
    return [list(s) for s in zip(*references, strict=True)] if references else [[]]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Corpus BLEU (sacrebleu, 13a tokenizer, 4-grams, no smoothing) on the Hub module's 0..1 scale."""
    import sacrebleu

    metric = sacrebleu.metrics.BLEU(max_ngram_order=4, smooth_method="none", tokenize="13a", effective_order=False)
    result = metric.corpus_score(list(predictions), _reference_streams(references))
    return {"bleu": result.score / 100.0, "precisions": [p / 100.0 for p in result.precisions],
            "brevity_penalty": result.bp, "length_ratio": result.ratio,
            "translation_length": result.sys_len, "reference_length": result.ref_len}


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]], *, char_order: int = 6,
         word_order: int = 0, beta: int = 2) -> dict[str, Any]:
    """chrF (sacrebleu; word_order=2 gives chrF++) on the Hub module's 0..100 scale."""
    import sacrebleu

    metric = sacrebleu.metrics.CHRF(char_order=char_order, word_order=word_order, beta=beta)
    result = metric.corpus_score(list(predictions), _reference_streams(references))
    return {"score": result.score, "char_order": char_order, "word_order": word_order, "beta": beta}


METRICS: dict[str, Callable[..., dict[str, Any]]] = {
    "exact_match": exact_match,
    **{name: _label_metric(name) for name in ("accuracy", "precision", "recall", "f1")},
    "rouge": rouge,
    "bleu": bleu,
    "chrf": chrf,
}
