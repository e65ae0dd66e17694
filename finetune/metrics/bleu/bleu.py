"""Corpus BLEU computed by ``sacrebleu`` (same keys and 0..1 scale as ``evaluate-metric/bleu``)."""

import datasets
import evaluate
import sacrebleu

_KWARGS = """
Args:
    predictions (list of str), references (list of str, or list of list of str; every prediction needs the
        same number of references)
    max_order (int): longest n-gram (default 4).
    smooth (bool): add-one smoothing of the n-gram precisions (default False: sacrebleu 'none').
    tokenize (str): sacrebleu tokenizer, default '13a' (the WMT standard).
    lowercase (bool): default False.
Returns:
    bleu (float in [0, 1]), precisions (list of float in [0, 1]), brevity_penalty, length_ratio,
    translation_length, reference_length
"""


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus BLEU (sacrebleu).",
            citation="Post, M. (2018). A Call for Clarity in Reporting BLEU Scores.",
            inputs_description=_KWARGS,
            features=[
                datasets.Features({"predictions": datasets.Value("string", id="sequence"),
                                   "references": datasets.Sequence(datasets.Value("string", id="sequence"))}),
                datasets.Features({"predictions": datasets.Value("string", id="sequence"),
                                   "references": datasets.Value("string", id="sequence")}),
            ],
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, max_order=4, smooth=False, tokenize="13a", lowercase=False):
        refs = [r if isinstance(r, list) else [r] for r in references]
        n_refs = {len(r) for r in refs}
        if len(n_refs) > 1:
            raise ValueError(f"every prediction needs the same number of references, got {sorted(n_refs)}")
        streams = [list(s) for s in zip(*refs, strict=True)] if refs else [[]]
        metric = sacrebleu.metrics.BLEU(max_ngram_order=max_order, smooth_method="add-k" if smooth else "none",
                                        tokenize=tokenize, lowercase=lowercase, effective_order=False)
        result = metric.corpus_score(list(predictions), streams)
        return {
            "bleu": result.score / 100.0,
            "precisions": [p / 100.0 for p in result.precisions],
            "brevity_penalty": result.bp,
            "length_ratio": result.ratio,
            "translation_length": result.sys_len,
            "reference_length": result.ref_len,
        }
