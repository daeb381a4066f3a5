"""Precision: of the rows predicted as a class, the fraction that truly are.

A local `evaluate` metric module (the hub's versions cannot be fetched offline); loaded with
`evaluate.load(path_to_this_file)` by adapters.evaluation.metrics.
"""

import datasets
import evaluate
from sklearn.metrics import precision_score


_DESCRIPTION = "Precision: of the rows predicted as a class, the fraction that truly are."
_KWARGS = """
Args:
    predictions: predicted class ids (-1 for an answer outside the label set).
    references: true class ids.
    labels: the class ids to score (ids outside, e.g. -1, only count as errors).
    average: 'macro', 'micro', 'weighted', or None for one score per class.
"""


class Precision(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None, average="macro", zero_division=0.0):
        score = precision_score(references, predictions, labels=labels, average=average, zero_division=zero_division)
        return {"precision": score.tolist() if average is None else float(score)}
