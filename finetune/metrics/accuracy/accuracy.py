"""Accuracy over integer class labels, computed by scikit-learn (same interface as ``evaluate-metric/accuracy``)."""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_KWARGS = """
Args:
    predictions (list of int), references (list of int)
    normalize (bool): True (default) -> share correct; False -> number correct.
    sample_weight (list of float): optional weights.
Returns:
    accuracy (float)
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of predictions equal to the reference label (scikit-learn accuracy_score).",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return {"accuracy": float(accuracy_score(references, predictions, normalize=normalize,
                                                 sample_weight=sample_weight))}
