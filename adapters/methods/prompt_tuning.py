"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
arXiv:2104.08691): num_virtual_tokens trained embeddings [num_virtual_tokens, hidden] prepended to
every input's embeddings [batch, seq, hidden] -> [batch, num_virtual_tokens + seq, hidden] (peft)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch.nn as nn
from pydantic import Field, field_validator

from adapters.errors import ConfigError
from adapters.methods.base import MethodOptions, register_method
from adapters.methods.prompt_learning import PromptLearningMethod


class PromptTuningOptions(MethodOptions):
    """Options of ``prompt-tuning`` (peft ``PromptTuningConfig``)."""

    num_virtual_tokens: int = Field(20, ge=1, description="Number of learned prompt embeddings prepended to the input.")
    init: Literal["random", "text"] = Field(
        "random", description="Start from random vectors, or from the embeddings of init_text's tokens."
    )
    init_text: str | None = Field(
        None,
        validate_default=True,
        description="Text whose token embeddings initialise the prompt (repeated/truncated to num_virtual_tokens).",
    )

    @field_validator("init_text")
    @classmethod
    def _text_init_needs_text(cls, value, info):
        if info.data.get("init") == "text" and not (value or "").strip():
            raise ValueError("init 'text' needs init_text (the words to start the prompt from)")
        return value


def model_folder(model: nn.Module) -> str:
    """The folder the backbone was loaded from (its tokenizer lives there too); ConfigError if not local."""
    for candidate in (getattr(model.config, "_name_or_path", None), getattr(model, "name_or_path", None)):
        if candidate and Path(candidate).is_dir():
            return str(candidate)
    raise ConfigError(
        "method.init 'text' needs the backbone's tokenizer, but the model was not loaded from a local folder "
        f"(config._name_or_path={getattr(model.config, '_name_or_path', None)!r}); use method.init: random"
    )


class PromptTuningMethod(PromptLearningMethod):
    """Prompt tuning (Lester et al. 2021) through peft ``PromptTuningConfig``; init from random or from text."""

    name = "prompt-tuning"
    summary = "Prompt tuning: learned input embeddings prepended to every input (peft); init from random or text."
    Options = PromptTuningOptions

    def peft_config(self, options: PromptTuningOptions, task, model):
        """peft ``PromptTuningConfig``; text init reads the tokenizer from the backbone's folder."""
        # peft loads when a model is adapted, not when configs are validated.
        from peft import PromptTuningConfig, PromptTuningInit

        kwargs = {}
        if options.init == "text":
            kwargs = {
                "prompt_tuning_init": PromptTuningInit.TEXT,
                "prompt_tuning_init_text": options.init_text,
                "tokenizer_name_or_path": model_folder(model),
            }
        return PromptTuningConfig(num_virtual_tokens=options.num_virtual_tokens, **self.geometry(model), **kwargs)


register_method(PromptTuningMethod())
