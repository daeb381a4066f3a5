"""Head-only: freeze the backbone and train a new classification head (feature extraction).

The head pools the way the backbone was trained to be pooled: sentence encoders (MiniLM) get
``MeanPoolingClassifier`` from the loader, other models their architecture's own head.
"""

from __future__ import annotations

from adapters.methods.base import AdaptationMethod, register_method
from adapters.methods.peft_base import head_module_names
from adapters.methods.weights_delta import DeltaMethod


class HeadOnlyMethod(DeltaMethod, AdaptationMethod):
    name = "head-only"
    summary = "Frozen backbone, new classification head trained on its features; saves only the head."
    tasks = frozenset({"sequence-classification"})

    def trainable_prefixes(self, model, options, task):
        return head_module_names(model)


register_method(HeadOnlyMethod())
