"""What multi-process and DeepSpeed ZeRO-3 runs need beyond accelerate's defaults.

Under ZeRO-3 every parameter is sharded across the ranks: a rank holds an empty placeholder
(numel 0) plus its slice. Reading, copying or counting weights then needs the full tensors
gathered (a collective: every rank must take part), and a model loaded by one rank alone must
not be sharded at all. accelerate 1.15 registers its DeepSpeed config with transformers whenever
the ZeRO stage is 3, whatever `zero3_init_flag` says, so every `from_pretrained` in such a run
builds the model under `deepspeed.zero.Init`, which is itself a collective.

deepspeed is an optional dependency: it is imported only where ZeRO-3 parameters exist, which
means it is already loaded.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from accelerate.state import AcceleratorState
from transformers.integrations.deepspeed import (
    is_deepspeed_zero3_enabled,
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)


def zero3_enabled() -> bool:
    """True inside a DeepSpeed ZeRO-3 run (after the Accelerator was made)."""
    return bool(is_deepspeed_zero3_enabled())


def param_count(param: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 left only a placeholder on this rank."""
    return int(getattr(param, "ds_numel", param.numel()))


@contextmanager
def no_zero3_init():
    """Load a model whole on this process, for work only one rank does (e.g. the main process
    embedding texts): under zero.Init the load would wait for the other ranks forever."""
    if not zero3_enabled():
        yield
        return
    plugin = AcceleratorState().deepspeed_plugin
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf)


def gathered(params, modifier_rank: int | None = None):
    """Context in which ZeRO-3 parameters are whole on every rank (call it on ALL ranks).

    With modifier_rank set, what that rank writes into them is re-sharded on exit.
    Outside ZeRO-3 it does nothing.
    """
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed  # optional dependency, already loaded where parameters carry a ds_id

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
