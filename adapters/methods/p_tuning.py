"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385): a prompt encoder (MLP, or
bidirectional LSTM + MLP) maps num_virtual_tokens trained embeddings to the virtual-token
embeddings [num_virtual_tokens, hidden] prepended to every input (peft ``PromptEncoderConfig``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapters.methods.base import MethodOptions, register_method
from adapters.methods.prompt_learning import PromptLearningMethod


class PTuningOptions(MethodOptions):
    """Options of ``p-tuning`` (peft ``PromptEncoderConfig``)."""

    num_virtual_tokens: int = Field(20, ge=1, description="Number of virtual tokens produced by the prompt encoder.")
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field(
        "MLP", description="Prompt encoder: an MLP, or a bidirectional LSTM followed by an MLP."
    )
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="Hidden width of the prompt encoder (default: the model's hidden size)."
    )
    encoder_num_layers: int = Field(2, ge=1, description="LSTM layers (LSTM encoder only).")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the prompt encoder.")


class PTuningMethod(PromptLearningMethod):
    """P-tuning (Liu et al. 2021) through peft ``PromptEncoderConfig``."""

    name = "p-tuning"
    summary = "P-tuning: virtual-token embeddings produced by a small MLP/LSTM prompt encoder (peft)."
    Options = PTuningOptions

    def resumable(self, config) -> bool:
        """Never: peft saves the encoder's output tokens, not the MLP/LSTM."""
        return False

    def peft_config(self, options: PTuningOptions, task, model):
        """peft ``PromptEncoderConfig``; the encoder width defaults to the model's hidden size."""
        from peft import PromptEncoderConfig  # peft loads when a model is adapted, not when configs are validated

        geometry = self.geometry(model)
        return PromptEncoderConfig(
            num_virtual_tokens=options.num_virtual_tokens,
            encoder_reparameterization_type=options.encoder_reparameterization_type,
            encoder_hidden_size=options.encoder_hidden_size or geometry["token_dim"],
            encoder_num_layers=options.encoder_num_layers,
            encoder_dropout=options.encoder_dropout,
            **geometry,
        )


register_method(PTuningMethod())
