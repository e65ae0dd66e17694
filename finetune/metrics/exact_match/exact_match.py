"""Exact match: the share of predictions equal to their reference (same arguments and output as the Hub's
``evaluate-metric/exact_match``, so either can be loaded)."""

import re
import string

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Share of predictions that equal their reference string exactly (after the optional normalisations)."
_KWARGS = """
Args:
    predictions (list of str), references (list of str)
    regexes_to_ignore (list of str): removed from both before comparing.
    ignore_case (bool), ignore_punctuation (bool), ignore_numbers (bool): default False.
Returns:
    exact_match (float): in [0, 1].
"""


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string", id="sequence"),
                 "references": datasets.Value("string", id="sequence")}
            ),
        )

    def _compute(self, predictions, references, regexes_to_ignore=None, ignore_case=False,
                 ignore_punctuation=False, ignore_numbers=False):
        preds = np.asarray(predictions, dtype=object)
        refs = np.asarray(references, dtype=object)
        for pattern in regexes_to_ignore or []:
            preds = np.array([re.sub(pattern, "", p) for p in preds], dtype=object)
            refs = np.array([re.sub(pattern, "", r) for r in refs], dtype=object)
        if ignore_case:
            preds = np.array([p.lower() for p in preds], dtype=object)
            refs = np.array([r.lower() for r in refs], dtype=object)
        drop = ""
        if ignore_punctuation:
            drop += string.punctuation
        if ignore_numbers:
            drop += string.digits
        if drop:
            table = str.maketrans("", "", drop)
            preds = np.array([p.translate(table) for p in preds], dtype=object)
            refs = np.array([r.translate(table) for r in refs], dtype=object)
        return {"exact_match": float(np.mean(preds == refs)) if len(preds) else 0.0}
