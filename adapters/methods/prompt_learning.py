"""Shared base of the prompt-learning methods (peft): prompt tuning, prefix tuning and P-tuning.

All three leave the backbone untouched and learn "virtual tokens": prompt tuning (Lester et al.
2021) learns input embeddings, P-tuning (Liu et al. 2021) produces them with a small MLP/LSTM,
prefix tuning (Li & Liang 2021) learns keys/values for every attention layer. None can mix
adapters per row (peft prepends one prompt to the batch). Each method lives in its own module:
``prompt_tuning``, ``prefix_tuning``, ``p_tuning``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch.nn as nn

from adapters.errors import ConfigError
from adapters.methods.base import ModelInfo
from adapters.methods.peft_base import PeftMethod


class PromptLearningMethod(PeftMethod):
    """Shared checks, model geometry and trainable reload for the three prompt-learning methods."""

    mixable = False
    # Prompt/P-tuning feed the classifier inputs_embeds; a decoder classifier then cannot find the last
    # real token (it pools the last position, which is padding on right-padded rows).
    needs_input_ids_for_decoder_classifier: ClassVar[bool] = True

    def check_model(self, options, info: ModelInfo, task: str) -> None:
        """ConfigError on a quantized backbone, and for a decoder classifier where the method hides the input ids."""
        if info.quantized:
            raise ConfigError(
                f"method {self.name!r} is not supported on a quantized backbone here; "
                "drop model.quantization (prompt learning trains so few weights that a 4-bit base saves little)"
            )
        if task == "sequence-classification" and not info.is_encoder and self.needs_input_ids_for_decoder_classifier:
            raise ConfigError(
                f"method {self.name!r} cannot do sequence-classification on decoder model type {info.model_type!r}: "
                "the classifier pools the last token, which it cannot locate among padded prompt embeddings. "
                f"{self.name!r} supports: causal-lm on any model, sequence-classification on encoders "
                "(BERT family); use prefix-tuning or lora for a decoder classifier"
            )

    def geometry(self, model: nn.Module) -> dict[str, int]:
        """token_dim (hidden size) / num_layers / num_attention_heads from the backbone config.

        peft reads them from config.to_dict() by a few spellings; attribute access also follows
        transformers' attribute_map (DistilBERT's dim / n_layers / n_heads). ConfigError if missing."""
        config = model.config
        try:
            return {
                "token_dim": int(config.hidden_size),
                "num_layers": int(config.num_hidden_layers),
                "num_attention_heads": int(config.num_attention_heads),
            }
        except AttributeError as err:
            raise ConfigError(
                f"method {self.name!r}: cannot read the backbone's width/depth/heads from its config ({err})"
            ) from err

    def attach(self, model, options, task, adapter_name="default"):
        """``PeftMethod.attach``; peft's ValueError for an unsuitable model becomes a ConfigError."""
        try:
            return super().attach(model, options, task, adapter_name)
        except ValueError as err:
            raise ConfigError(f"method {self.name!r} cannot attach to {type(model).__name__}: {err}") from err

    def resumable(self, config) -> bool:
        """Whether the saved file holds the trained parameters themselves (not only their output)."""
        return True

    def load(self, model, folder: Path, adapter_name="default", is_trainable=False):
        """``PeftMethod.load``; trainable (to continue training) where the saved tensor is the trained parameter.

        Raises ConfigError for a trainable load of a method whose file holds only the encoder's output.
        """
        if not is_trainable:
            return super().load(model, folder, adapter_name, is_trainable)
        # peft refuses to load prompt learning as trainable; where the saved tensor *is* the trained
        # parameter, build the adapter from the saved config and load the tensor into it.
        # peft loads when a model is adapted, not when configs are validated.
        from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
        from peft.utils import load_peft_weights

        config = PeftConfig.from_pretrained(str(folder))
        if not self.resumable(config):
            raise ConfigError(
                f"cannot continue training a saved {self.name!r} adapter: peft saves only the virtual tokens its "
                "prompt encoder produced, not the encoder itself; train a new adapter instead of init_from"
            )
        config.inference_mode = False
        if getattr(config, "prompt_tuning_init", None) is not None:
            config.prompt_tuning_init = "RANDOM"  # the saved prompt replaces it; no tokenizer from a foreign path
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, config)
        else:
            model = get_peft_model(model, config, adapter_name=adapter_name)
        set_peft_model_state_dict(model, load_peft_weights(str(folder)), adapter_name=adapter_name)
        return model
