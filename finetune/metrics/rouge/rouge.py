"""ROUGE F-measures computed by Google's ``rouge-score`` (same interface and keys as ``evaluate-metric/rouge``).

One difference on purpose: with ``use_aggregator=True`` the corpus score is the plain mean of the per-example
F-measures (the Hub module reports the median of an unseeded bootstrap, which is close to it but not repeatable).
"""

import datasets
import evaluate
import numpy as np
from rouge_score import rouge_scorer

_KWARGS = """
Args:
    predictions (list of str), references (list of str, or list of list of str for several references)
    rouge_types (list of str): default ['rouge1', 'rouge2', 'rougeL', 'rougeLsum'].
    use_aggregator (bool): True (default) -> mean over examples; False -> one score per example.
    use_stemmer (bool): Porter stemmer on words (default False).
    tokenizer: an object with a tokenize(text) method (default: rouge-score's, lower-cased alphanumeric words).
Returns:
    {rouge_type: F-measure in [0, 1]} (a float, or a list per example without the aggregator)
"""


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-N and ROUGE-L F-measures (rouge-score).",
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS,
            features=[
                datasets.Features({"predictions": datasets.Value("string", id="sequence"),
                                   "references": datasets.Sequence(datasets.Value("string", id="sequence"))}),
                datasets.Features({"predictions": datasets.Value("string", id="sequence"),
                                   "references": datasets.Value("string", id="sequence")}),
            ],
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, rouge_types=None, use_aggregator=True, use_stemmer=False,
                 tokenizer=None):
        rouge_types = rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer, tokenizer=tokenizer)
        per_example = {t: [] for t in rouge_types}
        for pred, ref in zip(predictions, references, strict=True):
            scores = scorer.score_multi(ref, pred) if isinstance(ref, list) else scorer.score(ref, pred)
            for t in rouge_types:
                per_example[t].append(float(scores[t].fmeasure))
        if use_aggregator:
            return {t: float(np.mean(v)) if v else 0.0 for t, v in per_example.items()}
        return per_example
