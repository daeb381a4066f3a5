"""Recall: of the rows of a class, the fraction predicted as it.

A local `evaluate` metric module (the hub's versions cannot be fetched offline); loaded with
`evaluate.load(path_to_this_file)` by adapters.evaluation.metrics.
"""

import datasets
import evaluate
from sklearn.metrics import recall_score


_DESCRIPTION = "Recall: of the rows of a class, the fraction predicted as it."
_KWARGS = """
Args:
    predictions: predicted class ids (-1 for an answer outside the label set).
    references: true class ids.
    labels: the class ids to score (ids outside, e.g. -1, only count as errors).
    average: 'macro', 'micro', 'weighted', or None for one score per class.
"""


class Recall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None, average="macro", zero_division=0.0):
        score = recall_score(references, predictions, labels=labels, average=average, zero_division=zero_division)
        return {"recall": score.tolist() if average is None else float(score)}
