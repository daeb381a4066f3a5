"""VeRA: one frozen random low-rank pair shared by all layers, with trained per-layer scaling vectors (peft VeRA).

VeRA (Kopiczko et al. 2024, arXiv:2310.11454) updates a weight W [out, in] by
diag(b) @ B @ diag(d) @ A, where A [r, in] and B [out, r] are frozen random matrices shared by
every adapted layer (slices of one pair sized for the largest layer) and only d [r] and b [out]
are trained, per layer.
"""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
from pydantic import Field

from adapters.methods.base import MethodOptions, register_method
from adapters.methods.peft_base import PeftMethod
from adapters.methods.targets import excluded_modules, resolve_target_modules


def _matches(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def vera_targets(targets: str | list[str], model: nn.Module) -> list[str] | str:
    """LoRA's target groups for VeRA. VeraConfig has no exclude_modules, so where a group needs
    exclusions (BERT "mlp") the matching nn.Linear modules are listed by full name instead."""
    resolved = resolve_target_modules(targets, model)
    excluded = excluded_modules(targets, model)
    if not excluded or isinstance(resolved, str):
        return resolved
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _matches(name, resolved) and not _matches(name, excluded)
    ]


class VeraOptions(MethodOptions):
    """Options of ``vera`` (peft ``VeraConfig``)."""

    r: int = Field(
        256, ge=1, description="Rank of the shared random projections (VeRA uses far higher ranks than LoRA)."
    )
    target_modules: Literal["attention", "mlp", "all", "all-linear"] | list[str] = Field(
        "all",
        description="Which linear layers get VeRA: attention, mlp, all (both), all-linear, or a list of names. "
        "Layers of different shapes share slices of one projection sized for the largest.",
    )
    projection_prng_key: int = Field(0, description="Seed of the shared random projections.")
    save_projection: bool = Field(
        True, description="Save the shared projections with the adapter (larger file, but no dependence on the RNG)."
    )
    d_initial: float = Field(0.1, gt=0, description="Initial value of the trained scaling vector d.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the VeRA input.")


class VeraMethod(PeftMethod):
    """VeRA (Kopiczko et al. 2024) through peft ``VeraConfig``, with LoRA's target groups."""

    name = "vera"
    summary = (
        "VeRA: one frozen random low-rank pair shared by all layers; trains only per-layer scaling vectors (peft VeRA)."
    )
    Options = VeraOptions
    mixable = False  # peft 0.21 ignores per-row adapter_names for VeRA (LoRA-only feature)

    def peft_config(self, options: VeraOptions, task, model):
        """peft ``VeraConfig`` for `options` on `model`."""
        from peft import VeraConfig  # peft loads when a model is adapted, not when configs are validated

        return VeraConfig(
            r=options.r,
            target_modules=vera_targets(options.target_modules, model),
            projection_prng_key=options.projection_prng_key,
            save_projection=options.save_projection,
            d_initial=options.d_initial,
            vera_dropout=options.dropout,
        )


register_method(VeraMethod())
