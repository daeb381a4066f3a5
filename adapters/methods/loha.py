"""LoHa: a low-rank Hadamard-product update (peft LoHa, from LyCORIS).

LoHa (Hyeon-Woo et al. 2022, FedPara, arXiv:2108.06098) updates a weight W [out, in] by
(alpha / r) * (B1 @ A1) * (B2 @ A2), the element-wise product of two rank-r products with
A [r, in] and B [out, r]: the update can reach rank r^2 with the parameters of two rank-r LoRAs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapters.methods.base import MethodOptions, register_method
from adapters.methods.peft_base import PeftMethod
from adapters.methods.targets import excluded_modules, resolve_target_modules


class LohaOptions(MethodOptions):
    """Options of ``loha`` (peft ``LoHaConfig``)."""

    r: int = Field(8, ge=1, description="Rank of each of the two low-rank factors (the update has rank up to r^2).")
    alpha: float = Field(8, gt=0, description="Scaling numerator: the update is scaled by alpha/r.")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout over the rank dimension during training.")
    module_dropout: float = Field(
        0.0, ge=0, lt=1, description="Probability of skipping a whole layer's update during training."
    )
    target_modules: Literal["attention", "mlp", "all", "all-linear"] | list[str] = Field(
        "all", description="Which linear layers get LoHa: attention, mlp, all (both), all-linear, or a list of names."
    )


class LohaMethod(PeftMethod):
    """LoHa (Hyeon-Woo et al. 2022) through peft ``LoHaConfig``, with LoRA's target groups."""

    name = "loha"
    summary = (
        "LoHa: low-rank Hadamard-product updates to linear layers (peft LoHa); more expressive than LoRA per rank."
    )
    Options = LohaOptions
    mixable = False  # peft 0.21 ignores per-row adapter_names for LoHa (LoRA-only feature)

    def peft_config(self, options: LohaOptions, task, model):
        """peft ``LoHaConfig`` for `options` on `model`."""
        from peft import LoHaConfig  # peft loads when a model is adapted, not when configs are validated

        return LoHaConfig(
            r=options.r,
            alpha=options.alpha,
            rank_dropout=options.rank_dropout,
            module_dropout=options.module_dropout,
            target_modules=resolve_target_modules(options.target_modules, model),
            exclude_modules=excluded_modules(options.target_modules, model),
        )


register_method(LohaMethod())
