"""Bottleneck adapters: Houlsby (after attention and feed-forward) and Pfeiffer (after feed-forward only).

Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751) insert a
small MLP h + up(act(down(h))) after both sub-layers of every block; Pfeiffer et al. 2021
(AdapterFusion, EACL, arXiv:2005.00247) keep only the one after the feed-forward block. The tuner
itself (shapes, peft registration) lives in ``adapters.methods.tuners.bottleneck``, so the saved
folder is peft's layout and ``peft.PeftModel.from_pretrained`` loads it once that module has been
imported. This module only maps options to its config; it stays free of peft so that config
validation and ``--list-methods`` are light.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from adapters.errors import ConfigError
from adapters.methods.base import MethodOptions, ModelInfo, register_method
from adapters.methods.peft_base import PeftMethod
from adapters.methods.targets import BOTTLENECK_MODEL_TYPES, chosen_layers


class BottleneckVariantOptions(MethodOptions):
    """Options shared by every variant; `init` comes before `residual` so that its validator can see it."""

    reduction_factor: float = Field(16, gt=0, description="Bottleneck width = hidden size / reduction_factor.")
    non_linearity: Literal["relu", "gelu", "swish", "silu", "tanh"] = Field(
        "relu", description="Activation inside the bottleneck."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the bottleneck.")
    init: Literal["near-identity", "random"] = Field(
        "near-identity", description="near-identity: zero up-projection, so training starts from the base model."
    )
    residual: bool = Field(
        True,
        description="Output h + adapter(h); false replaces the sub-layer output by adapter(h) (needs init=random).",
    )
    layers: list[int] | None = Field(None, description="Only these block indices (default: every block).")
    top_layers: int | None = Field(None, ge=1, description="Only the top N blocks (shorthand for layers).")

    @field_validator("residual")
    @classmethod
    def _residual_needs_nonzero_init(cls, residual: bool, info: ValidationInfo) -> bool:
        if not residual and info.data.get("init") == "near-identity":
            raise ValueError(
                "residual=false with init=near-identity would zero every adapted sub-layer at the start; "
                "keep residual=true or set init=random"
            )
        return residual

    @field_validator("top_layers")
    @classmethod
    def _one_way_to_pick_layers(cls, top_layers: int | None, info: ValidationInfo) -> int | None:
        if top_layers is not None and info.data.get("layers") is not None:
            raise ValueError("give either layers or top_layers, not both")
        return top_layers


class BottleneckOptions(BottleneckVariantOptions):
    """Options of ``bottleneck``: the shared ones plus the variant."""

    variant: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: adapters after attention and feed-forward; pfeiffer: after feed-forward only."
    )


class BottleneckMethod(PeftMethod):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) through our peft tuner."""

    name = "bottleneck"
    summary = "Small bottleneck MLPs inserted after sub-layers (Houlsby/Pfeiffer adapters, a peft tuner of ours)."
    Options = BottleneckOptions
    fixed_variant: ClassVar[str | None] = None
    mixable = True  # model(..., adapter_names=[...]) gives each row its own adapter and head
    supports_quantized = True  # the adapter only reads the wrapped layer's output: a 4/8-bit base is fine

    def variant(self, options) -> str:
        """ "houlsby" or "pfeiffer": fixed by the houlsby/pfeiffer methods, else from the options."""
        return self.fixed_variant or options.variant

    def check_model(self, options, info: ModelInfo, task: str) -> None:
        """ConfigError for an architecture the tuner cannot hook into, or block indices out of range."""
        if info.model_type not in BOTTLENECK_MODEL_TYPES:
            raise ConfigError(
                f"method {self.name!r} cannot hook into model type {info.model_type!r}; "
                f"supported model types: {', '.join(BOTTLENECK_MODEL_TYPES)}"
            )
        bad = [i for i in options.layers or [] if not 0 <= i < info.num_layers]
        if bad:
            raise ConfigError(
                f"method.layers ({self.name}): {bad} out of range; the model has blocks 0..{info.num_layers - 1}"
            )

    def peft_config(self, options, task, model):
        """Our ``BottleneckConfig`` for `options` (the tuner derives the target modules from the model type)."""
        # The tuner imports peft; it loads when a model is adapted, not when configs are validated.
        from adapters.methods.tuners.bottleneck import BottleneckConfig

        return BottleneckConfig(
            variant=self.variant(options),
            reduction_factor=options.reduction_factor,
            non_linearity=options.non_linearity,
            dropout=options.dropout,
            residual=options.residual,
            init_weights=options.init == "near-identity",
            layers=chosen_layers(options.layers, options.top_layers, model),
            adapterkit_method=self.name,
        )

    def load(self, model, folder, adapter_name="default", is_trainable=False):
        """``PeftMethod.load`` once our tuner is registered with peft."""
        # Registers the BOTTLENECK peft type; imports peft, so only when a model is adapted.
        import adapters.methods.tuners.bottleneck  # noqa: F401

        return super().load(model, folder, adapter_name=adapter_name, is_trainable=is_trainable)


class HoulsbyMethod(BottleneckMethod):
    """``bottleneck`` with variant=houlsby (Houlsby et al. 2019)."""

    name = "houlsby"
    summary = "Bottleneck adapters after attention and after the feed-forward block (bottleneck, variant=houlsby)."
    Options = BottleneckVariantOptions
    fixed_variant = "houlsby"


class PfeifferMethod(BottleneckMethod):
    """``bottleneck`` with variant=pfeiffer (Pfeiffer et al. 2021)."""

    name = "pfeiffer"
    summary = "Bottleneck adapters after the feed-forward block only (bottleneck, variant=pfeiffer)."
    Options = BottleneckVariantOptions
    fixed_variant = "pfeiffer"


register_method(BottleneckMethod())
register_method(HoulsbyMethod())
register_method(PfeifferMethod())
