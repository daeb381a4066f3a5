"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
arXiv:2101.00190): trained keys and values for num_virtual_tokens extra positions in every
attention layer (peft: one embedding [num_virtual_tokens, num_layers * 2 * hidden], passed as
past_key_values), so each layer attends over num_virtual_tokens + seq positions. Optionally a
2-layer MLP produces the prefix during training (peft ``PrefixTuningConfig``)."""

from __future__ import annotations

import inspect

import torch.nn as nn
from pydantic import Field

from adapters.errors import ConfigError
from adapters.methods.base import MethodOptions, ModelInfo, register_method
from adapters.methods.prompt_learning import PromptLearningMethod

# Model types whose attention takes no past key/values, so a prefix has nowhere to go.
NO_PAST_KEY_VALUES = {"distilbert"}


class PrefixTuningOptions(MethodOptions):
    """Options of ``prefix-tuning`` (peft ``PrefixTuningConfig``)."""

    num_virtual_tokens: int = Field(
        20, ge=1, description="Length of the learned key/value prefix in every attention layer."
    )
    prefix_projection: bool = Field(
        False,
        description="Produce the prefix with a 2-layer MLP (more stable training, more parameters while training).",
    )
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="Hidden width of the projection MLP (default: the model's hidden size)."
    )


def accepts_past_key_values(model: nn.Module) -> bool:
    """Whether the model, or the transformer backbone inside it (peft's fallback), takes past_key_values."""
    candidates = [model] + [child for _, child in model.named_children()]
    return any("past_key_values" in inspect.signature(m.forward).parameters for m in candidates)


class PrefixTuningMethod(PromptLearningMethod):
    """Prefix tuning (Li & Liang 2021) through peft ``PrefixTuningConfig``; needs attention with past_key_values."""

    name = "prefix-tuning"
    summary = "Prefix tuning: learned keys/values prepended in every attention layer (peft); optional MLP projection."
    Options = PrefixTuningOptions
    needs_input_ids_for_decoder_classifier = False  # the input ids still reach the classifier

    def check_model(self, options, info: ModelInfo, task: str) -> None:
        """The shared checks, and ConfigError for an architecture without past key/values."""
        super().check_model(options, info, task)
        if info.model_type in NO_PAST_KEY_VALUES:
            raise ConfigError(
                f"method 'prefix-tuning' cannot work on model type {info.model_type!r}: its attention takes no "
                "past key/values to hold the prefix. prefix-tuning supports models whose attention accepts "
                "past_key_values (Llama, BERT, RoBERTa, GPT-2, ...); use prompt-tuning or p-tuning here"
            )

    def resumable(self, config) -> bool:
        """Without the MLP projection the saved prefix is the trained parameter; with it, only its output."""
        return not config.prefix_projection

    def attach(self, model, options, task, adapter_name="default"):
        """``PromptLearningMethod.attach``; ConfigError when no module of `model` takes past_key_values."""
        if not accepts_past_key_values(model):
            raise ConfigError(
                f"method 'prefix-tuning' cannot attach to {type(model).__name__}: neither it nor its backbone "
                "takes past_key_values; prefix-tuning supports models whose attention accepts them. "
                "Use prompt-tuning or p-tuning"
            )
        return super().attach(model, options, task, adapter_name)

    def peft_config(self, options: PrefixTuningOptions, task, model):
        """peft ``PrefixTuningConfig``; the projection MLP defaults to the model's hidden size."""
        from peft import PrefixTuningConfig  # peft loads when a model is adapted, not when configs are validated

        geometry = self.geometry(model)
        return PrefixTuningConfig(
            num_virtual_tokens=options.num_virtual_tokens,
            prefix_projection=options.prefix_projection,
            encoder_hidden_size=options.encoder_hidden_size or geometry["token_dim"],
            **geometry,
        )


register_method(PrefixTuningMethod())
