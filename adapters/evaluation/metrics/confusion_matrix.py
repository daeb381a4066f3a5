"""Confusion matrix: row = true class, column = predicted class.

A local `evaluate` metric module (the hub's versions cannot be fetched offline); loaded with
`evaluate.load(path_to_this_file)` by adapters.evaluation.metrics.
"""

import datasets
import evaluate
from sklearn.metrics import confusion_matrix


_DESCRIPTION = "Confusion matrix: row = true class, column = predicted class."
_KWARGS = """
Args:
    predictions: predicted class ids (-1 for an answer outside the label set).
    references: true class ids.
    labels: the class ids, in row/column order.
    normalize: None (counts), 'true', 'pred' or 'all'.
"""


class ConfusionMatrix(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None, normalize=None):
        matrix = confusion_matrix(references, predictions, labels=labels, normalize=normalize)
        return {"confusion_matrix": matrix.tolist()}
