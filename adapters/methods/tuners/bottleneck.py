"""Bottleneck adapters (Houlsby / Pfeiffer) as a real peft tuner.

peft 0.21 has no bottleneck adapter and no public way to add a ``PeftType`` member, which
``peft.utils.register_peft_method`` requires. Importing this module adds ``PeftType.BOTTLENECK``
to peft's enum (a str-valued enum, extended the way ``aenum.extend_enum`` does it) and registers
``BottleneckConfig`` / ``BottleneckModel``. From then on peft treats it like any built-in method:
``get_peft_model``, ``PeftModel.from_pretrained``, ``load_adapter``, ``set_adapter``,
``disable_adapter``, ``delete_adapter``, ``modules_to_save``, ``save_pretrained`` and mixed
batches (``model(..., adapter_names=[...])``, one adapter per row) all work, and the saved folder
is peft's own layout (adapter_config.json + adapter_model.safetensors).

An adapter wraps the output projection of a sub-layer and rewrites its output h as
``h + up(dropout(act(down(h))))`` before the block adds its residual stream (and, in BERT,
before the LayerNorm) - Houlsby et al. 2019 (arXiv:1902.00751). Houlsby places one after
attention and one after the feed-forward block; Pfeiffer et al. 2021 (AdapterFusion,
arXiv:2005.00247) only after the feed-forward block. Shapes, with hidden = the wrapped layer's
out_features and bottleneck = max(1, round(hidden / reduction_factor)):

    h [batch, seq, hidden] -> down -> [batch, seq, bottleneck] -> act, dropout
      -> up -> [batch, seq, hidden] -> * scaling (+ h when residual)

The up-projection starts at zero, so a fresh adapter leaves the model's outputs unchanged.
Adapters are non-linear: they cannot be merged into the base weights. Where they go per
architecture: ``adapters.methods.targets.BOTTLENECK_TARGETS``.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn as nn
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, register_peft_method
from peft.utils.other import AuxiliaryTrainingWrapper

from adapters.constants import PEFT_BASE
from adapters.methods.targets import BOTTLENECK_MODEL_TYPES, BOTTLENECK_TARGETS

PEFT_TYPE_NAME = "BOTTLENECK"
PREFIX = "bottleneck_"

VARIANTS = ("houlsby", "pfeiffer")
NON_LINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _extend_peft_type(name: str) -> PeftType:
    """Add `name` to peft's PeftType enum (idempotent). peft offers no API for it; enum internals
    (_member_map_, _value2member_map_, _member_names_) are the same on Python 3.10-3.12."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    if hasattr(PeftType, "_add_member_"):  # Python 3.13+
        PeftType._add_member_(name, member)
    else:
        type.__setattr__(PeftType, name, member)
        PeftType._member_map_[name] = member
    if name not in PeftType._member_names_:
        PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    # Verify through the public API: a silent half-registration would surface much later.
    if PeftType(name) is not member or PeftType[name] is not member or member not in list(PeftType):
        raise RuntimeError(f"could not add {name} to peft.PeftType on this Python version")
    return member


BOTTLENECK = _extend_peft_type(PEFT_TYPE_NAME)


def target_regex(model_type: str, variant: str, layers: list[int] | None = None) -> str:
    """A full-match regex over module names selecting where the adapters go.

    variant: "houlsby" (attention and feed-forward outputs) or "pfeiffer" (feed-forward only);
    layers: block indices (None: every block). Raises ValueError for an unknown model type or variant.
    """
    if model_type not in BOTTLENECK_TARGETS:
        raise ValueError(
            f"bottleneck adapters do not know where to hook into model type {model_type!r}; "
            f"supported model types: {', '.join(BOTTLENECK_MODEL_TYPES)} (or pass target_modules)"
        )
    if variant not in VARIANTS:
        raise ValueError(f"bottleneck variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    blocks, attention_out, ffn_out = BOTTLENECK_TARGETS[model_type]
    modules = [ffn_out] if variant == "pfeiffer" else [attention_out, ffn_out]
    index = r"\d+" if layers is None else "(?:" + "|".join(str(int(i)) for i in layers) + ")"
    alternatives = "|".join(re.escape(m) for m in modules)
    return rf"(?:.*\.)?{re.escape(blocks)}\.{index}\.(?:{alternatives})"


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a bottleneck adapter (see the module docstring). Raises ValueError for invalid values."""

    variant: Literal["houlsby", "pfeiffer"] = field(
        default="houlsby",
        metadata={"help": "houlsby: after attention and feed-forward; pfeiffer: after feed-forward only."},
    )
    reduction_factor: float = field(default=16, metadata={"help": "Bottleneck width = hidden size / reduction_factor."})
    non_linearity: str = field(default="relu", metadata={"help": f"One of {', '.join(NON_LINEARITIES)}."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout inside the bottleneck."})
    residual: bool = field(default=True, metadata={"help": "Add the adapter to the sub-layer output (h + f(h))."})
    scaling: float = field(default=1.0, metadata={"help": "Multiplier on the adapter's output."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: zero up-projection (starts as the identity); False: small random."}
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "Block indices to adapt (None: all); folded into the derived target regex."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex; None: derived from variant and the model type."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Other modules to train and save (e.g. a classification head)."}
    )
    adapterkit_method: str = field(
        default="bottleneck", metadata={"help": "Which adapterkit method wrote this folder."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = BOTTLENECK
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"non_linearity must be one of {', '.join(NON_LINEARITIES)}, got {self.non_linearity!r}")
        if self.reduction_factor <= 0:
            raise ValueError(f"reduction_factor must be > 0, got {self.reduction_factor}")
        if isinstance(self.target_modules, (list, set)) and self.layers is not None:
            # `layers` is folded into the regex derived from `variant`; a saved config carries both.
            raise ValueError("layers only applies when target_modules is None (derived from variant)")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


class BottleneckLayer(BaseTunerLayer):
    """Wraps a module whose output [batch, seq, features] the adapters rewrite; adapters of several
    names live side by side. Raises TypeError for a module without out_features."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_act", "bottleneck_dropout", "bottleneck_residual", "bottleneck_scaling")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict()
        self.bottleneck_up = nn.ModuleDict()
        self.bottleneck_act = nn.ModuleDict()
        self.bottleneck_dropout = nn.ModuleDict()
        self.bottleneck_residual: dict[str, bool] = {}
        self.bottleneck_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        self.features = getattr(base, "out_features", None)
        if self.features is None:
            raise TypeError(f"bottleneck adapters wrap layers with out_features; got {type(base).__name__}")

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        """Add adapter `adapter_name`: down nn.Linear(features -> width), up nn.Linear(width -> features),
        width = max(1, round(features / reduction_factor))."""
        width = max(1, int(round(self.features / config.reduction_factor)))
        down = nn.Linear(self.features, width)
        up = nn.Linear(width, self.features)
        # Houlsby's near-identity init: small down-projection, zero up-projection (output unchanged).
        nn.init.normal_(down.weight, std=1e-2)
        nn.init.zeros_(down.bias)
        if config.init_weights:
            nn.init.zeros_(up.weight)
        else:
            nn.init.normal_(up.weight, std=2e-2)
        nn.init.zeros_(up.bias)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self.bottleneck_act[adapter_name] = NON_LINEARITIES[config.non_linearity]()
        self.bottleneck_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.bottleneck_residual[adapter_name] = config.residual
        self.bottleneck_scaling[adapter_name] = config.scaling
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        # A quantized base (bnb) reports an integer weight dtype; keep adapters in float32 then.
        for layers in (self.bottleneck_down, self.bottleneck_up):
            if adapter_name in layers and not layers[adapter_name].weight.dtype.is_floating_point:
                layers[adapter_name] = layers[adapter_name].float()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Always raises TypeError: the adapter is non-linear."""
        raise TypeError("bottleneck adapters are non-linear and cannot be merged into the base weights")

    def unmerge(self) -> None:
        """Always raises TypeError: nothing is ever merged."""
        raise TypeError("bottleneck adapters are never merged")


class BottleneckWrapper(nn.Module, BottleneckLayer):
    """The module that replaces an adapted output projection."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig) -> None:
        super().__init__()
        BottleneckLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """The base layer's output [batch, seq, features], rewritten by the active adapters in turn, or
        row by row by ``adapter_names`` (one name per row; a name without an adapter here leaves its row as is)."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if adapter_names is not None:  # one adapter per row (inference only; PEFT_BASE = none)
            mixed = result.clone()
            for name in set(adapter_names):
                if name in self.bottleneck_down:
                    rows = [i for i, n in enumerate(adapter_names) if n == name]
                    mixed[rows] = self._adapt(name, result[rows])
            return mixed
        for name in self.active_adapters:
            if name in self.bottleneck_down:
                result = self._adapt(name, result)
        return result

    def _adapt(self, name: str, result: torch.Tensor) -> torch.Tensor:
        """[rows, seq, features] -> same shape, in the adapter's dtype inside and `result`'s dtype out."""
        down = self.bottleneck_down[name]
        h = result.to(down.weight.dtype)
        z = self.bottleneck_act[name](down(h))  # [rows, seq, bottleneck]
        z = self.bottleneck_up[name](self.bottleneck_dropout[name](z))  # [rows, seq, features]
        z = z * self.bottleneck_scaling[name]
        out = h + z if self.bottleneck_residual[name] else z
        return out.to(result.dtype)

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


class BottleneckModel(BaseTuner):
    """peft tuner that inserts bottleneck adapters (use through ``get_peft_model`` / ``PeftModel``)."""

    prefix: str = PREFIX
    tuner_layer_cls = BottleneckLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = target_regex(
                model_config.get("model_type", "custom"), peft_config.variant, peft_config.layers
            )
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = BottleneckWrapper(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # a second adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Mixed batches: ``model(..., adapter_names=[...])`` runs each row through its own adapter
        (and its own saved head), the way peft does it for LoRA."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set()
        for module in self.modules():
            if isinstance(module, BottleneckLayer):
                known |= set(module.bottleneck_down.keys())
        unknown = {n for n in adapter_names if n != PEFT_BASE} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate() repeats every row num_beams times
            adapter_names = [n for n in adapter_names for _ in range(num_beams)]
        handles = []
        for module in self.modules():
            if isinstance(module, (BottleneckLayer, AuxiliaryTrainingWrapper)):
                hook = partial(_inject_adapter_names, adapter_names=list(adapter_names))
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_merge_allowed(self):
        raise TypeError("bottleneck adapters are non-linear and cannot be merged into the base weights")


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _register() -> None:
    if BOTTLENECK not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name="bottleneck", config_cls=BottleneckConfig, model_cls=BottleneckModel, prefix=PREFIX)


_register()

__all__ = ["BOTTLENECK", "BottleneckConfig", "BottleneckLayer", "BottleneckModel", "target_regex"]
