"""Accuracy: the fraction of predictions equal to the reference.

A local `evaluate` metric module (the hub's versions cannot be fetched offline); loaded with
`evaluate.load(path_to_this_file)` by adapters.evaluation.metrics.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score


_DESCRIPTION = "Accuracy: the fraction of predictions equal to the reference."
_KWARGS = """
Args:
    predictions: predicted class ids (-1 for an answer outside the label set).
    references: true class ids.

"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, sample_weight=None):
        return {"accuracy": float(accuracy_score(references, predictions, sample_weight=sample_weight))}
