"""Exact match of generated answers, after normalization (strip, lowercase, whitespace
collapsed, trailing punctuation dropped): "Location." matches "location".

A local `evaluate` metric module (the hub's version cannot be fetched offline); loaded with
`evaluate.load(path_to_this_file)` by adapters.evaluation.metrics.
"""

import string

import datasets
import evaluate

_DESCRIPTION = "Exact match: the fraction of generated answers equal to the reference after normalization."
_KWARGS = """
Args:
    predictions: generated answers (strings).
    references: reference answers (strings).
"""

_TRAILING = string.punctuation + " \t\n"


def normalize_answer(text):
    return " ".join(str(text).strip().lower().split()).rstrip(_TRAILING).strip()


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not references:
            return {"exact_match": 0.0}
        hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
        return {"exact_match": hits / len(references)}
