"""Shared base for methods that peft implements: attach = get_peft_model, save/load in peft's format."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from adapters.methods.base import AdaptationMethod, MethodOptions

if TYPE_CHECKING:
    import torch.nn as nn
    from peft import PeftConfig

PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS"}


def head_module_names(model: "nn.Module") -> list[str]:
    """Names of the classification head modules that must stay trainable (and be saved)."""
    names = getattr(model, "adapterkit_head_names", None)
    if names:
        return list(names)
    return [n for n in ("classifier", "score") if hasattr(model, n)]


class PeftMethod(AdaptationMethod):
    """A method backed by a peft tuner. Subclasses only build the peft config."""

    uses_task_type: ClassVar[bool] = True

    def peft_config(self, options: MethodOptions, task: str, model: "nn.Module") -> "PeftConfig":
        raise NotImplementedError

    def attach(self, model, options, task, adapter_name="default"):
        from peft import get_peft_model

        config = self.peft_config(options, task, model)
        if self.uses_task_type:
            config.task_type = PEFT_TASK_TYPES[task]
        if task == "sequence-classification" and hasattr(config, "modules_to_save"):
            # The new head is trained from scratch: keep it trainable and save it with the adapter.
            config.modules_to_save = sorted(set(config.modules_to_save or []) | set(head_module_names(model)))
        return get_peft_model(model, config, adapter_name=adapter_name)

    def save(self, model, folder: Path, state_dict=None) -> None:
        # peft picks this adapter's tensors out of state_dict (gathered under ZeRO-3) itself.
        model.save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict)

    def load(self, model, folder: Path, adapter_name="default", is_trainable=False):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
