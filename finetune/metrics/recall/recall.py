"""Recall over integer class labels, computed by scikit-learn (same interface as ``evaluate-metric/recall``)."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import recall_score

_KWARGS = """
Args:
    predictions (list of int), references (list of int)
    labels (list of int): the classes to score (default: all seen).
    pos_label (int): the positive class for average='binary' (default 1).
    average (str): 'binary' (default), 'micro', 'macro', 'weighted', 'samples' or None (one score per class).
    sample_weight (list of float): optional weights.
    zero_division ('warn', 0, 1): the value when the score divides by zero.
Returns:
    recall (float, or a list of floats when average is None)
"""


class Recall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Recall of predicted class labels (scikit-learn recall_score).",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.recall_score.html"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None,
                 zero_division="warn"):
        score = recall_score(references, predictions, labels=labels, pos_label=pos_label, average=average,
                      sample_weight=sample_weight, zero_division=zero_division)
        return {"recall": float(score) if np.ndim(score) == 0 else [float(s) for s in score]}
