"""Shared base for methods that peft implements: attach = get_peft_model, save/load in peft's format.

A peft-backed method only builds its peft config (``PeftMethod.peft_config``); the rest is here.
peft is imported inside the methods that run it: this module is part of the method registry,
which config validation and ``--list-methods`` load without peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch.nn as nn

from adapters.methods.base import AdaptationMethod, MethodOptions
from adapters.methods.targets import head_module_names

if TYPE_CHECKING:  # peft is heavy; annotations only
    from peft import PeftConfig

PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS"}


class PeftMethod(AdaptationMethod):
    """A method backed by a peft tuner. Subclasses only build the peft config."""

    uses_task_type: ClassVar[bool] = True

    def peft_config(self, options: MethodOptions, task: str, model: nn.Module) -> PeftConfig:
        """The peft config that attaches this method with `options` to `model` for `task`."""
        raise NotImplementedError

    def attach(self, model, options, task, adapter_name="default"):
        """``get_peft_model`` with this method's config; a classifier's new head stays trainable and is saved."""
        from peft import get_peft_model  # peft loads when a model is adapted, not when configs are validated

        config = self.peft_config(options, task, model)
        if self.uses_task_type:
            config.task_type = PEFT_TASK_TYPES[task]
        if task == "sequence-classification" and hasattr(config, "modules_to_save"):
            # The new head is trained from scratch: keep it trainable and save it with the adapter.
            config.modules_to_save = sorted(set(config.modules_to_save or []) | set(head_module_names(model)))
        return get_peft_model(model, config, adapter_name=adapter_name)

    def save(self, model, folder: Path, state_dict=None) -> None:
        """peft's ``save_pretrained`` (safetensors); peft picks this adapter's tensors out of `state_dict`."""
        model.save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict)

    def load(self, model, folder: Path, adapter_name="default", is_trainable=False):
        """``PeftModel.from_pretrained``, or ``load_adapter`` when `model` already holds a peft adapter."""
        from peft import PeftModel  # peft loads when a model is adapted, not when configs are validated

        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
