"""Full fine-tuning: every weight trainable. The saved artifact is the size of the model (tied
weights, such as an LM head tied to the embeddings, are saved once)."""

from __future__ import annotations

from adapters.methods.base import AdaptationMethod, register_method
from adapters.methods.weights_delta import DeltaMethod


class FullMethod(DeltaMethod, AdaptationMethod):
    """Full fine-tuning: every parameter trained and saved."""

    name = "full"
    summary = "Train every weight (the baseline the other methods approximate); saves the whole model."

    def trainable_prefixes(self, model, options, task):
        """None: every parameter."""
        return None


register_method(FullMethod())
