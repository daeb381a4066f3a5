"""Checks a run makes once the backbone's config and the data are known, before any weights load:
values the config alone cannot judge, and that would otherwise fail (or silently waste the run) later.

- a LoRA-family rank (``method.r`` of lora, dora, loha, lokr) larger than the smallest
  input/output dimension of a layer it adapts (not VeRA: its r is the rank of frozen random
  projections shared by all layers, routinely larger than a layer — Kopiczko et al. 2024 use 256-1024);
- a global batch (train.batch_size x train.grad_accum x processes) larger than the training split;
- ``method.layers`` naming blocks the backbone does not have (peft would fail after the weights load).
"""

from __future__ import annotations

import logging

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from adapters.config import RunConfig
from adapters.errors import ConfigError
from adapters.methods.targets import head_module_names
from adapters.modeling.builtins import resolve_model

log = logging.getLogger(__name__)


def adapted_layer_dims(cfg: RunConfig, method, options) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of every layer `method` with `options` would adapt on cfg.model.

    Built on a weightless copy of the backbone (PyTorch's meta device: shapes, no memory), matched
    with peft's own target rules (``check_target_module_exists``) on the peft config the method
    would use; "all-linear" is every linear layer but the output head. Empty when the method has
    no peft config or the architecture cannot be built without weights (the check is then skipped).
    """
    try:
        skeleton = _skeleton(cfg)
        peft_config = method.peft_config(options, cfg.task, skeleton)
    except Exception as err:  # an architecture without a meta-device path, or a method without a peft config
        log.debug("rank check skipped: %s: %s", type(err).__name__, err)
        return {}
    # Output layers are never adapted: the LM head (peft leaves it out of all-linear) and new class heads.
    heads = tuple(head_module_names(skeleton)) + ("lm_head",)
    dims = {}
    for name, module in skeleton.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or name.split(".")[0] in heads:
            continue
        if peft_config.target_modules == "all-linear":
            hit = isinstance(module, (nn.Linear, Conv1D))
        else:
            hit = check_target_module_exists(peft_config, name)
        if hit:  # peft's "excluded" answer is falsy too
            dims[name] = tuple(weight.shape)  # Linear [out, in]; GPT-2's Conv1D [in, out]: min() is the same
    return dims


def _skeleton(cfg: RunConfig) -> nn.Module:
    """The task's model class built from the backbone config on the meta device (module names as
    training sees them, so that peft's layer-index patterns match)."""
    config = AutoConfig.from_pretrained(resolve_model(cfg.model.name), revision=cfg.model.revision)
    auto = AutoModelForCausalLM if cfg.task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        try:
            return auto.from_config(config)
        except ValueError:  # no such head for this architecture (the loader then wraps the bare backbone)
            return AutoModel.from_config(config)


def check_rank_fits(cfg: RunConfig, method, options) -> None:
    """Raise ConfigError when ``method.r`` exceeds min(in, out) of a layer the method adapts: the
    low-rank factors (A [r, in], B [out, r]) would then hold more than the layer's own rank."""
    rank = getattr(options, "r", None)
    if rank is None or method.name == "vera" or getattr(options, "target_modules", None) is None:
        return
    dims = adapted_layer_dims(cfg, method, options)
    if not dims:
        return
    name, shape = min(dims.items(), key=lambda item: min(item[1]))
    limit = min(shape)
    if rank > limit:
        raise ConfigError(
            f"method.r ({method.name}): {rank} is larger than the smallest dimension of a layer it adapts "
            f"({name}: {shape[0]} x {shape[1]}); use method.r <= {limit}"
        )


def check_layers_exist(options, num_layers: int) -> None:
    """Raise ConfigError when ``method.layers`` names a block index outside 0 .. num_layers - 1
    (num_layers: the backbone's transformer blocks, config.num_hidden_layers)."""
    layers = getattr(options, "layers", None) or []
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(
            f"method.layers: {bad} are not blocks of this model; valid: 0..{num_layers - 1} ({num_layers} blocks)"
        )


def check_batch_fits(cfg: RunConfig, train_rows: int, num_processes: int) -> None:
    """Raise ConfigError when one optimizer step needs more rows than the training split has
    (train.batch_size x train.grad_accum x num_processes > train_rows, after splitting and truncation)."""
    t = cfg.train
    needed = t.batch_size * t.grad_accum * num_processes
    if needed > train_rows:
        raise ConfigError(
            f"train.batch_size: {t.batch_size} x train.grad_accum {t.grad_accum} x {num_processes} process(es) "
            f"= {needed} rows per optimizer step, but the training split has {train_rows} rows; "
            f"use train.batch_size <= {max(1, train_rows // (t.grad_accum * num_processes))} or add data"
        )
