"""LoRA and its variants DoRA and rsLoRA, through peft. QLoRA is LoRA on a 4/8-bit backbone.

LoRA (Hu et al. 2021, arXiv:2106.09685) adds a trained low-rank update to a frozen weight
W [out, in]: W + (alpha / r) * B @ A, with A [r, in], B [out, r] and B starting at zero.
rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) scales by alpha / sqrt(r) instead, which keeps
the update's size stable as r grows. DoRA (Liu et al. 2024, arXiv:2402.09353) splits W into a
magnitude vector and a direction and applies LoRA to the direction only. QLoRA (Dettmers et al.
2023) trains LoRA on a 4-bit quantized backbone.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from adapters.methods.base import MethodOptions, register_method
from adapters.methods.peft_base import PeftMethod
from adapters.methods.targets import chosen_layers, excluded_modules, resolve_target_modules


class LoraOptions(MethodOptions):
    """Options of ``lora`` and ``dora`` (peft ``LoraConfig``)."""

    r: int = Field(8, ge=1, description="Rank of the update matrices.")
    alpha: float = Field(
        16, gt=0, description="Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["attention", "mlp", "all", "all-linear"] | list[str] = Field(
        "all", description="Which linear layers get LoRA: attention, mlp, all (both), all-linear, or a list of names."
    )
    layers: list[int] | None = Field(
        None, description="Only these block indices (e.g. the top ones); backward then stops below the lowest."
    )
    top_layers: int | None = Field(
        None, ge=1, description="Only the top N blocks (shorthand for layers). Cuts backward cost on deep models."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha/sqrt(r).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field("default", description="Weight initialisation.")


class LoraMethod(PeftMethod):
    """LoRA (Hu et al. 2021) through peft ``LoraConfig``; rsLoRA and DoRA as options, QLoRA on a quantized base."""

    name = "lora"
    summary = "Low-rank updates to chosen linear layers (peft LoRA); DoRA/rsLoRA as options; QLoRA on a 4/8-bit base."
    Options = LoraOptions
    supports_quantized = True
    mixable = True
    force_dora: ClassVar[bool] = False  # the dora method: use_dora whatever the options say

    def peft_config(self, options: LoraOptions, task, model):
        """peft ``LoraConfig`` for `options` on `model` (target groups resolved per architecture)."""
        from peft import LoraConfig  # peft loads when a model is adapted, not when configs are validated

        return LoraConfig(
            r=options.r,
            lora_alpha=options.alpha,
            lora_dropout=options.dropout,
            target_modules=resolve_target_modules(options.target_modules, model),
            exclude_modules=excluded_modules(options.target_modules, model),
            layers_to_transform=chosen_layers(options.layers, options.top_layers, model),
            use_dora=options.use_dora or self.force_dora,
            use_rslora=options.use_rslora,
            bias=options.bias,
            init_lora_weights=True if options.init == "default" else options.init,
        )


class DoraMethod(LoraMethod):
    """DoRA (Liu et al. 2024): LoRA on the direction of each weight, a trained magnitude per output row."""

    name = "dora"
    summary = "Weight-decomposed LoRA: learns magnitude and direction separately (peft use_dora)."
    force_dora = True
    mixable = False  # peft cannot mix DoRA adapters in one batch


register_method(LoraMethod())
register_method(DoraMethod())
