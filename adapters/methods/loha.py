"""LoHa: a low-rank Hadamard-product update (peft LoHa, from LyCORIS)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapters.methods.base import MethodOptions, register_method
from adapters.methods.lora import excluded_modules, resolve_target_modules
from adapters.methods.peft_base import PeftMethod


class LohaOptions(MethodOptions):
    r: int = Field(8, ge=1, description="Rank of each of the two low-rank factors (the update has rank up to r^2).")
    alpha: float = Field(8, gt=0, description="Scaling numerator: the update is scaled by alpha/r.")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout over the rank dimension during training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of skipping a whole layer's update during training.")
    target_modules: Literal["attention", "mlp", "all", "all-linear"] | list[str] = Field(
        "all", description="Which linear layers get LoHa: attention, mlp, all (both), all-linear, or a list of names."
    )


class LohaMethod(PeftMethod):
    name = "loha"
    summary = "LoHa: low-rank Hadamard-product updates to linear layers (peft LoHa); more expressive than LoRA per rank."
    Options = LohaOptions
    mixable = False  # peft 0.21 ignores per-row adapter_names for LoHa (LoRA-only feature)

    def peft_config(self, options: LohaOptions, task, model):
        from peft import LoHaConfig

        return LoHaConfig(
            r=options.r,
            alpha=options.alpha,
            rank_dropout=options.rank_dropout,
            module_dropout=options.module_dropout,
            target_modules=resolve_target_modules(options.target_modules, model),
            exclude_modules=excluded_modules(options.target_modules, model),
        )


register_method(LohaMethod())
