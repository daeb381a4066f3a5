"""LoKr: a Kronecker-product update with a low-rank factor (peft LoKr, from LyCORIS)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapters.methods.base import MethodOptions, register_method
from adapters.methods.lora import excluded_modules, resolve_target_modules
from adapters.methods.peft_base import PeftMethod


class LokrOptions(MethodOptions):
    r: int = Field(8, ge=1, description="Rank of the low-rank Kronecker factor.")
    alpha: float = Field(8, gt=0, description="Scaling numerator: the update is scaled by alpha/r.")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout over the rank dimension during training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of skipping a whole layer's update during training.")
    decompose_both: bool = Field(False, description="Also decompose the left Kronecker factor into low rank.")
    decompose_factor: int = Field(-1, description="Size of the left Kronecker factor (-1: as square as possible).")
    target_modules: Literal["attention", "mlp", "all", "all-linear"] | list[str] = Field(
        "all", description="Which linear layers get LoKr: attention, mlp, all (both), all-linear, or a list of names."
    )


class LokrMethod(PeftMethod):
    name = "lokr"
    summary = "LoKr: Kronecker-product updates to linear layers (peft LoKr); very few parameters for large layers."
    Options = LokrOptions
    mixable = False  # peft 0.21 ignores per-row adapter_names for LoKr (LoRA-only feature)

    def peft_config(self, options: LokrOptions, task, model):
        from peft import LoKrConfig

        return LoKrConfig(
            r=options.r,
            alpha=options.alpha,
            rank_dropout=options.rank_dropout,
            module_dropout=options.module_dropout,
            decompose_both=options.decompose_both,
            decompose_factor=options.decompose_factor,
            target_modules=resolve_target_modules(options.target_modules, model),
            exclude_modules=excluded_modules(options.target_modules, model),
        )


register_method(LokrMethod())
