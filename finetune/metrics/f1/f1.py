"""F1 over integer class labels, computed by scikit-learn (same interface as ``evaluate-metric/f1``)."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_KWARGS = """
Args:
    predictions (list of int), references (list of int)
    labels (list of int): the classes to score (default: all seen).
    pos_label (int): the positive class for average='binary' (default 1).
    average (str): 'binary' (default), 'micro', 'macro', 'weighted', 'samples' or None (one score per class).
    sample_weight (list of float): optional weights.
    zero_division ('warn', 0, 1): the value when the score divides by zero.
Returns:
    f1 (float, or a list of floats when average is None)
"""


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 of predicted class labels (scikit-learn f1_score).",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None,
                 zero_division="warn"):
        score = f1_score(references, predictions, labels=labels, pos_label=pos_label, average=average,
                      sample_weight=sample_weight, zero_division=zero_division)
        return {"f1": float(score) if np.ndim(score) == 0 else [float(s) for s in score]}
