"""chrF / chrF++ computed by ``sacrebleu`` (same interface and 0..100 scale as ``evaluate-metric/chrf``)."""

import datasets
import evaluate
import sacrebleu

_KWARGS = """
Args:
    predictions (list of str), references (list of str, or list of list of str; every prediction needs the
        same number of references)
    char_order (int): character n-gram order (default 6).
    word_order (int): word n-gram order (default 0; 2 gives chrF++).
    beta (int): recall weight (default 2).
    lowercase (bool), whitespace (bool): default False.
    eps_smoothing (bool): default False.
Returns:
    score (float in [0, 100]), char_order, word_order, beta
"""


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Character n-gram F-score (sacrebleu CHRF).",
            citation="Popovic, M. (2015). chrF: character n-gram F-score for automatic MT evaluation.",
            inputs_description=_KWARGS,
            features=[
                datasets.Features({"predictions": datasets.Value("string", id="sequence"),
                                   "references": datasets.Sequence(datasets.Value("string", id="sequence"))}),
                datasets.Features({"predictions": datasets.Value("string", id="sequence"),
                                   "references": datasets.Value("string", id="sequence")}),
            ],
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, char_order=6, word_order=0, beta=2, lowercase=False,
                 whitespace=False, eps_smoothing=False):
        refs = [r if isinstance(r, list) else [r] for r in references]
        n_refs = {len(r) for r in refs}
        if len(n_refs) > 1:
            raise ValueError(f"every prediction needs the same number of references, got {sorted(n_refs)}")
        streams = [list(s) for s in zip(*refs, strict=True)] if refs else [[]]
        metric = sacrebleu.metrics.CHRF(char_order=char_order, word_order=word_order, beta=beta,
                                        lowercase=lowercase, whitespace=whitespace, eps_smoothing=eps_smoothing)
        result = metric.corpus_score(list(predictions), streams)
        return {"score": result.score, "char_order": char_order, "word_order": word_order, "beta": beta}
