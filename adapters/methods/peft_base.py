"""Shared base for methods that peft implements: attach = get_peft_model, save/load in peft's format.

A peft-backed method only builds its peft config (``PeftMethod.peft_config``); the rest is here.
peft is imported inside the methods that run it: this module is part of the method registry,
which config validation and ``--list-methods`` load without peft.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch.nn as nn
from safetensors import safe_open

from adapters.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapters.errors import BaseMismatchError, ConfigError
from adapters.methods.base import AdaptationMethod, MethodOptions
from adapters.methods.targets import head_module_names
from adapters.methods.tuners import OWN_PEFT_TYPES
from adapters.methods.weights_delta import renamed_by

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
        """``load_peft_adapter``: ``PeftModel.from_pretrained``, or ``load_adapter`` when `model` already
        holds a peft adapter; refused unless every saved tensor lands on the model."""
        return load_peft_adapter(model, folder, adapter_name=adapter_name, is_trainable=is_trainable)


def load_peft_adapter(model, folder: Path, adapter_name: str = "default", is_trainable: bool = False, **kwargs):
    """Load the peft adapter in `folder` onto `model` (a base model, or a PeftModel holding other adapters)
    as `adapter_name`; returns the PeftModel. kwargs go to peft (e.g. low_cpu_mem_usage).

    Registers adapterkit's own peft types first (adapters.methods.tuners), maps keys saved under an
    older module name (the base's ``_checkpoint_conversion_mapping``, as peft's from_pretrained does)
    and then checks that every saved tensor landed (``check_adapter_landed``). Raises
    BaseMismatchError for an adapter that does not fit the model (other architecture, other shapes,
    renamed tensors); peft itself only warns about tensors it could not place.
    """
    from peft import PeftModel, PromptLearningConfig  # peft loads when a model is adapted

    folder = Path(folder)
    config_class = peft_config_class(folder)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    # Prompt learning keys have no "base_model.model." prefix to map below (peft skips them too).
    prompt_learning = issubclass(config_class, PromptLearningConfig)
    mapping = None if prompt_learning else getattr(base, "_checkpoint_conversion_mapping", None) or None
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(
                str(folder), adapter_name=adapter_name, is_trainable=is_trainable, key_mapping=mapping, **kwargs
            )
        else:
            model = PeftModel.from_pretrained(
                model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable, key_mapping=mapping, **kwargs
            )
    except (ValueError, RuntimeError) as err:  # peft: target modules not found, size mismatches
        raise BaseMismatchError(
            f"adapter {folder} does not fit this base model ({type(base).__name__}, "
            f"{getattr(getattr(base, 'config', None), 'model_type', '?')}): {err}"
        ) from err
    check_adapter_landed(model, folder, adapter_name, mapping)
    return model


def peft_config_class(folder: Path) -> type:
    """peft's config class for the adapter in `folder` (its adapter_config.json's peft_type), after importing
    the tuner of adapterkit's own that registers that type, if it is one (a fresh process serving a
    bottleneck adapter has not imported it yet). Raises ConfigError for a type peft does not know."""
    # peft loads when a model is adapted, not when configs are validated.
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    path = Path(folder) / ADAPTER_CONFIG
    peft_type = str(json.loads(path.read_text()).get("peft_type", "")).upper() if path.is_file() else ""
    if peft_type in OWN_PEFT_TYPES:
        importlib.import_module(OWN_PEFT_TYPES[peft_type])
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ConfigError(f"{path}: peft type {peft_type!r} is not one peft {peft.__version__} knows")
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]


def check_adapter_landed(peft_model, folder: Path, adapter_name: str, key_mapping: dict | None = None) -> None:
    """Raise BaseMismatchError unless the tensors saved in `folder` are exactly the adapter `adapter_name`'s
    parameters on `peft_model` (names as peft saves them, after `key_mapping`), naming the unmatched ones.

    A tensor that matches no parameter was dropped (peft only warns, and the adapter silently does less
    or nothing); a parameter the file lacks keeps its initial value (a LoRA B of zeros, a random head).
    """
    from peft.utils import get_peft_model_state_dict  # peft loads when a model is adapted

    with safe_open(str(Path(folder) / ADAPTER_WEIGHTS), framework="pt") as fh:
        saved = {_mapped(key, key_mapping) for key in fh.keys()}
    expected = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    unmatched, missing = sorted(saved - expected), sorted(expected - saved)
    if unmatched or missing:
        problems = []
        if unmatched:
            problems.append(f"{len(unmatched)} saved tensor(s) match no module of the base model: {unmatched[:5]}")
        if missing:
            problems.append(f"{len(missing)} adapter parameter(s) are missing from the file: {missing[:5]}")
        raise BaseMismatchError(f"adapter {folder} does not fit this base model: {'; '.join(problems)}")


def _mapped(key: str, key_mapping: dict | None) -> str:
    """`key` renamed by the first matching pattern of `key_mapping`, below peft's "base_model.model."
    prefix (as peft's load_peft_weights renames)."""
    if not key_mapping:
        return key
    prefix = "base_model.model." if key.startswith("base_model.model.") else "base_model."
    return prefix + renamed_by(key.removeprefix(prefix), key_mapping)
