"""Partial fine-tuning: unfreeze the top N transformer blocks plus what sits above them.

Above the blocks: the classification head, a decoder's final norm, BERT's pooler. For causal-lm
the output projection is left frozen (usually tied to the input embeddings). Saves only the
unfrozen weights.
"""

from __future__ import annotations

from pydantic import Field

from adapters.errors import ConfigError
from adapters.methods.base import AdaptationMethod, MethodOptions, register_method
from adapters.methods.targets import head_module_names
from adapters.methods.weights_delta import DeltaMethod, block_list_name, top_modules


class PartialOptions(MethodOptions):
    """Options of ``partial``."""

    blocks: int = Field(2, ge=1, description="How many of the top transformer blocks to unfreeze (plus the head).")


class PartialMethod(DeltaMethod, AdaptationMethod):
    """Partial fine-tuning: the top ``blocks`` transformer blocks, what sits above them, and a classifier's head."""

    name = "partial"
    summary = "Unfreeze the top N blocks plus head/final norm; saves only those weights."
    Options = PartialOptions

    def check_model(self, options, info, task):
        """ConfigError when the model has fewer blocks than ``blocks``."""
        if info.num_layers and options.blocks > info.num_layers:
            raise ConfigError(
                f"method.blocks ({self.name}): {options.blocks} is more than the model's {info.num_layers} blocks; "
                f"use 1..{info.num_layers} (or method 'full' to train everything)"
            )

    def trainable_prefixes(self, model, options, task):
        """The top blocks, the modules above them (final norm, pooler) and, for classification, the head."""
        blocks = block_list_name(model)
        n = model.config.num_hidden_layers
        chosen = [f"{blocks}.{i}" for i in range(max(0, n - options.blocks), n)]
        heads = head_module_names(model) if task == "sequence-classification" else []
        return chosen + top_modules(model, blocks) + heads


register_method(PartialMethod())
