"""Head-only: freeze the backbone and train a new classification head (feature extraction).

The head pools the way the backbone was trained to be pooled: sentence encoders (MiniLM) get
``MeanPoolingClassifier`` from the loader, other models their architecture's own head.
"""

from __future__ import annotations

from adapters.methods.base import AdaptationMethod, register_method
from adapters.methods.targets import head_module_names
from adapters.methods.weights_delta import DeltaMethod


class HeadOnlyMethod(DeltaMethod, AdaptationMethod):
    """Feature extraction: train only the classification head on the frozen backbone's features."""

    name = "head-only"
    summary = "Frozen backbone, new classification head trained on its features; saves only the head."
    tasks = frozenset({"sequence-classification"})

    def trainable_prefixes(self, model, options, task):
        """The classification head modules."""
        return head_module_names(model)


register_method(HeadOnlyMethod())
