"""LoKr: a Kronecker-product update with a low-rank factor (peft LoKr, from LyCORIS).

LoKr (Yeh et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to
Model Evaluation", arXiv:2309.14859) updates a weight W [out, in] by (alpha / r) * C kron (B @ A):
C [out1, in1] is small, B @ A [out2, in2] has rank r, and out1 * out2 = out, in1 * in2 = in, so
large layers need very few parameters.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from adapters.methods.base import MethodOptions, register_method
from adapters.methods.peft_base import PeftMethod
from adapters.methods.targets import excluded_modules, resolve_target_modules


class LokrOptions(MethodOptions):
    """Options of ``lokr`` (peft ``LoKrConfig``)."""

    r: int = Field(8, ge=1, description="Rank of the low-rank Kronecker factor.")
    alpha: float = Field(8, gt=0, description="Scaling numerator: the update is scaled by alpha/r.")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout over the rank dimension during training.")
    module_dropout: float = Field(
        0.0, ge=0, lt=1, description="Probability of skipping a whole layer's update during training."
    )
    decompose_both: bool = Field(False, description="Also decompose the left Kronecker factor into low rank.")
    decompose_factor: int = Field(-1, description="Size of the left Kronecker factor (-1: as square as possible).")
    target_modules: Literal["attention", "mlp", "all", "all-linear"] | list[str] = Field(
        "all", description="Which linear layers get LoKr: attention, mlp, all (both), all-linear, or a list of names."
    )


class LokrMethod(PeftMethod):
    """LoKr (Yeh et al. 2023) through peft ``LoKrConfig``, with LoRA's target groups."""

    name = "lokr"
    summary = "LoKr: Kronecker-product updates to linear layers (peft LoKr); very few parameters for large layers."
    Options = LokrOptions
    mixable = False  # peft 0.21 ignores per-row adapter_names for LoKr (LoRA-only feature)

    def peft_config(self, options: LokrOptions, task, model):
        """peft ``LoKrConfig`` for `options` on `model`."""
        from peft import LoKrConfig  # peft loads when a model is adapted, not when configs are validated

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
