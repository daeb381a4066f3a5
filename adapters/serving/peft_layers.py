"""The peft side of serving: one PeftModel around the base, its adapter layers, and which adapter they run.

Adapters live in the PeftModel under private names (``slot``s: ``a0``, ``a1``, ...). This
module attaches and deletes them, points every adapter layer at one slot (or at the bare
base), resizes a classifier's placeholder head to an adapter's label count, and routes the
rows of a mixed batch through the wrapped LoRA layers (adapters.serving.mixed_lora).
Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

from adapters.methods.peft_base import load_peft_adapter
from adapters.methods.targets import head_module_names
from adapters.serving.mixed_lora import MixedLoraForward


class PeftLayers:
    """The base model and, once an adapter is attached, the PeftModel wrapping it.

    ``base_model``: the loaded backbone (in eval mode). ``fast_mixed_lora``: route mixed LoRA
    batches through MixedLoraForward's batched matmuls (False: peft's per-adapter loop).
    """

    def __init__(self, base_model: torch.nn.Module, fast_mixed_lora: bool = True):
        self.base_model = base_model
        self.peft: PeftModel | None = None  # the PeftModel, once an adapter is attached
        self.active_slot: str | None = None
        self.mixed = MixedLoraForward()
        self.mixed.enabled = fast_mixed_lora
        self._tuner_layers: list[torch.nn.Module] = []
        # each tuner layer's __dict__, and whether its active adapter is kept as a list
        self._layer_dicts: list[tuple[dict, bool]] = []
        self._route_rows = False  # every adapter layer is a wrapped LoRA Linear (see MixedLoraForward)

    def attach(self, path: Path, slot: str, num_labels: int | None, resident_slots: list[str]) -> None:
        """Load the adapter folder ``path`` as a new peft adapter named ``slot``: peft builds its
        layers (the slow path, ~0.1-1 s on SmolLM2). ``num_labels``: a classifier's head size.
        The active slot stays active when it is in ``resident_slots``; otherwise ``slot`` becomes active."""
        if num_labels is not None:
            self.resize_heads(num_labels)
        try:
            self.peft = load_peft_adapter(self.peft or self.base_model, path, adapter_name=slot, low_cpu_mem_usage=True)
        except BaseException:
            self._drop_failed(slot, resident_slots)
            raise
        self.peft.eval()
        self._refresh_tuner_layers()
        self.activate(self.active_slot if self.active_slot in resident_slots else slot)

    def _drop_failed(self, slot: str, resident_slots: list[str]) -> None:
        """Undo an attach that failed (an adapter that does not fit the base): its half-built layers go, the
        other slots stay as they were."""
        if self.peft is not None:
            if slot in self.peft.peft_config:
                self.delete(slot, survivors=list(self.peft.peft_config.keys() - {slot}))
            return
        # The first adapter: peft wrapped the base in place before failing; restore its plain layers.
        for name, module in list(self.base_model.named_modules()):
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                plain = module.original_module if isinstance(module, ModulesToSaveWrapper) else module.get_base_layer()
                parent_name, _, attr = name.rpartition(".")
                setattr(self.base_model.get_submodule(parent_name) if parent_name else self.base_model, attr, plain)
        if hasattr(self.base_model, "peft_config"):
            del self.base_model.peft_config

    def delete(self, slot: str, survivors: list[str]) -> None:
        """Delete the peft adapter ``slot``; ``survivors`` are the slots that stay. With none left,
        the PeftModel is dropped and the plain base restored (peft keeps at least one adapter)."""
        self.mixed.clear()  # it may hold the deleted adapter's weights
        if survivors:
            if self.active_slot in (None, slot):  # point peft at a survivor first: deleting the active one warns
                self.activate(survivors[0])
            self.peft.delete_adapter(slot)
            self._refresh_tuner_layers()
        else:
            self.base_model = self._unwrap()
            self.peft = None
            self._tuner_layers = []
            self.active_slot = None

    def _unwrap(self) -> torch.nn.Module:
        """The plain base model again, without any adapter layers."""
        if self.has_prompt_learning():
            return self.peft.get_base_model()  # prompt learning never touched the base's modules
        return self.peft.unload()

    def has_prompt_learning(self) -> bool:
        """Whether the attached adapters prepend virtual tokens (prompt learning) instead of adapting layers."""
        return any(c.is_prompt_learning for c in self.peft.peft_config.values())

    def peft_type(self) -> str:
        """The attached adapters' peft type, e.g. ``LORA`` (LoRA and DoRA share it); one PeftModel holds one."""
        return str(getattr(self.peft, "peft_type", "")).split(".")[-1].upper()

    def state_dict(self, slot: str) -> dict[str, torch.Tensor]:
        """The slot's parameters under the key names of an adapter file (sharing their storage)."""
        return get_peft_model_state_dict(self.peft, adapter_name=slot)

    def _refresh_tuner_layers(self) -> None:
        layer_types = (BaseTunerLayer, AuxiliaryTrainingWrapper)
        self._tuner_layers = [m for m in self.peft.modules() if isinstance(m, layer_types)]
        self._layer_dicts = [(m.__dict__, isinstance(m._active_adapter, list)) for m in self._tuner_layers]
        self.mixed.install(self.peft)
        self._route_rows = self.mixed.covers(self._tuner_layers)

    def activate(self, slot: str | None) -> None:
        """Point every adapter layer at ``slot`` (None: the bare base).

        peft's set_adapter also flips requires_grad on every adapter of every layer, which grows
        with the number of resident adapters; at inference only the active name matters, set
        straight in each layer's __dict__ (nn.Module.__setattr__ is ~10x slower).
        """
        if self.peft is None:
            return
        if slot is None:
            for d, _ in self._layer_dicts:
                d["_disable_adapters"] = True
            self.active_slot = None
            return
        listed = [slot]
        for d, is_list in self._layer_dicts:
            d["_active_adapter"] = listed if is_list else slot
            d["_disable_adapters"] = False
        if self.peft.peft_config[slot].is_prompt_learning:
            self.peft.set_adapter(slot)  # no tuner layers to walk: cheap
        else:
            self.peft.base_model.active_adapter = slot
        self.active_slot = slot

    def forward_of(self, model: torch.nn.Module) -> Callable:
        """The call that runs ``model`` (the PeftModel, its base, or the plain base) for one pass.

        Given per-row adapter names (``adapter_names``: one slot name or PEFT_BASE per row), the
        PeftModel's call routes them through the wrapped LoRA layers when those cover the model,
        and through peft's own ``adapter_names`` otherwise (heads, other methods).
        """
        if model is self.peft and self._route_rows and self.mixed.enabled:

            def forward(adapter_names=None, **kwargs):
                if adapter_names is None:
                    return model(**kwargs)
                return self.mixed.forward(model, adapter_names, **kwargs)

            return forward
        return model

    def resize_heads(self, num_labels: int) -> None:
        """Give the placeholder head ``num_labels`` outputs, so peft's per-adapter copy matches the adapter's
        weights (a ModulesToSaveWrapper's original module is replaced, else the head itself)."""
        root = self.base_model
        for name in head_module_names(root):
            module = root.get_submodule(name)
            holder = module
            current = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
            if not isinstance(current, torch.nn.Linear) or current.out_features == num_labels:
                continue
            fresh = torch.nn.Linear(current.in_features, num_labels, bias=current.bias is not None)
            fresh = fresh.to(device=current.weight.device, dtype=current.weight.dtype)
            if isinstance(holder, ModulesToSaveWrapper):
                holder.original_module = fresh
            else:
                parent_name, _, attr = name.rpartition(".")
                setattr(root.get_submodule(parent_name) if parent_name else root, attr, fresh)
        if hasattr(root, "config"):
            root.config.num_labels = num_labels
