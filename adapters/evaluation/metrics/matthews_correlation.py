"""Matthews correlation coefficient: a balanced measure of classification quality in [-1, 1].

A local `evaluate` metric module (the hub's versions cannot be fetched offline); loaded with
`evaluate.load(path_to_this_file)` by adapters.evaluation.metrics.
"""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef


_DESCRIPTION = "Matthews correlation coefficient: a balanced measure of classification quality in [-1, 1]."
_KWARGS = """
Args:
    predictions: predicted class ids (-1 for an answer outside the label set).
    references: true class ids.

"""


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, sample_weight=None):
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions, sample_weight=sample_weight))}
