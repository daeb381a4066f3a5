"""Optimizer parameter groups: weight decay where it belongs, discriminative learning rates.

Discriminative fine-tuning (a lower LR for lower layers) is from ULMFiT (Howard & Ruder, 2018);
the geometric per-layer form, layer-wise LR decay, is the one of ELECTRA (Clark et al., 2020)
and BEiT (Bao et al., 2022). No weight decay on biases and norms follows BERT's and
transformers' Trainer's AdamW setup.

Every trainable parameter gets one *role*, read from its name:

- ``head``: the new task head: a module named ``classifier`` or ``score`` (what
  transformers and MeanPoolingClassifier call it), including peft's trainable
  ``modules_to_save`` copy of it; also any other ``modules_to_save`` copy that sits outside
  the transformer blocks and embeddings. Trained from scratch, so it gets ``train.head_lr``
  (default ``train.lr``) and no layer decay.
- ``prompt``: peft's prompt encoders (prompt/prefix/p-tuning virtual tokens, names with
  ``prompt_encoder``). New parameters too, but they *are* the whole adapter of those methods
  and feed every layer, so they train at ``train.lr`` without layer decay.
- ``layer.i``: anything inside transformer block i (its pretrained weights, or the LoRA/IA3/...
  weights peft inserted there: adapters live where they act, so they share the block's LR).
- ``embeddings``: token/position embeddings and their norm (names with ``embed``, ``wte``, ``wpe``).
- ``top``: pretrained parameters above the blocks: final norm, pooler, lm_head.

Layer-wise decay (``train.layer_decay`` = d, N blocks): block i trains at lr x d^(N-1-i),
embeddings at lr x d^N, ``top`` at lr. Weight decay (``train.weight_decay``) skips biases,
norm weights (names containing ``norm``/``LayerNorm``/``bias``) and every 1-D tensor (e.g.
DoRA magnitudes, which decay would pull towards zero).

Each group carries a readable ``name`` ("layer.5/decay", "head/no_decay", ...) for logs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from adapters.config import TrainConfig

HEAD_MODULES = ("classifier", "score")
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_EMBED_SEGMENTS = ("wte", "wpe")


def block_index(param_name: str, num_layers: int | None = None) -> int | None:
    """Index of the transformer block holding `param_name`, or None outside the blocks.

    Works for Llama ("model.layers.12."), BERT ("encoder.layer.3."), GPT-2 ("transformer.h.5."),
    and through peft prefixes ("base_model.model."). An index >= num_layers is a bug in the
    caller's idea of the model, so it raises instead of being misfiled.
    """
    match = _BLOCK.search(param_name)
    if match is None:
        return None
    index = int(match.group(1))
    if num_layers is not None and index >= num_layers:
        raise ValueError(f"parameter {param_name!r} is in block {index}, but the model has {num_layers} blocks")
    return index


def _segments(name: str) -> list[str]:
    return name.split(".")


def is_head_param(name: str) -> bool:
    """Whether the parameter belongs to a new task head (a module named classifier or score)."""
    segments = _segments(name)
    return any(s in HEAD_MODULES for s in segments)


def is_prompt_param(name: str) -> bool:
    """Whether the parameter belongs to peft's prompt encoder (prompt/prefix/p-tuning)."""
    return "prompt_encoder" in _segments(name)


def is_embedding_param(name: str) -> bool:
    """Whether the parameter belongs to the token/position embeddings (names with embed, wte, wpe)."""
    return any("embed" in s.lower() or s in _EMBED_SEGMENTS for s in _segments(name))


def is_no_decay_param(name: str, param: Any = None) -> bool:
    """Whether weight decay should skip the parameter: biases, norms, and (given `param`) any tensor under 2-D."""
    lowered = name.lower()
    if "bias" in _segments(lowered) or lowered.endswith("bias") or "norm" in lowered:
        return True
    return param is not None and getattr(param, "ndim", 2) < 2


@dataclass(frozen=True)
class ParamRole:
    """A parameter's role (see the module doc); `label` names it for groups and logs."""

    role: str  # "head" | "prompt" | "layer" | "embeddings" | "top"
    index: int | None = None  # block index for role == "layer"

    @property
    def label(self) -> str:
        """ "layer.<i>" for a block, else the role name."""
        return f"layer.{self.index}" if self.role == "layer" else self.role


def param_role(name: str, num_layers: int | None = None) -> ParamRole:
    """Which role (see the module doc) the parameter `name` plays."""
    if is_head_param(name):
        return ParamRole("head")
    if is_prompt_param(name):
        return ParamRole("prompt")
    index = block_index(name, num_layers)
    if index is not None:
        return ParamRole("layer", index)
    if is_embedding_param(name):
        return ParamRole("embeddings")
    if "modules_to_save" in _segments(name):
        return ParamRole("head")  # a trained-from-copy module outside blocks and embeddings
    return ParamRole("top")


def num_blocks(model: nn.Module, names: Iterable[str] = ()) -> int:
    """Number of transformer blocks: config.num_hidden_layers (peft and our wrappers forward
    `.config`), else one more than the highest block index seen in the names."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) if config is not None else None
    if isinstance(count, int) and count > 0:
        return count
    indices = [block_index(n) for n in names]
    return max((i for i in indices if i is not None), default=-1) + 1


def role_lr(role: ParamRole, train_cfg: TrainConfig, num_layers: int) -> float:
    """The peak LR of a role under train.lr, train.head_lr and train.layer_decay."""
    lr = train_cfg.lr
    decay = train_cfg.layer_decay or 1.0
    if role.role == "head":
        return train_cfg.head_lr or lr
    if role.role == "layer":
        return lr * decay ** (num_layers - 1 - role.index)
    if role.role == "embeddings":
        return lr * decay**num_layers
    return lr  # top, prompt


def _group_order(role: ParamRole, num_layers: int) -> tuple:
    order = {"embeddings": -1, "layer": 0, "top": num_layers, "prompt": num_layers + 1, "head": num_layers + 2}
    return (order[role.role] + (role.index or 0),)


def build_param_groups(model: nn.Module, train_cfg: TrainConfig, per_layer: bool | None = None) -> list[dict[str, Any]]:
    """Param groups for torch.optim.AdamW over the trainable parameters of `model`.

    per_layer: one group per block (default: only when train.layer_decay is set; without
    decay the blocks, embeddings and top share one "backbone" group per decay kind).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("build_param_groups: the model has no trainable parameters")
    if per_layer is None:
        per_layer = train_cfg.layer_decay is not None
    n_layers = num_blocks(model, (n for n, _ in named))
    groups: dict[str, dict[str, Any]] = {}
    sort_keys: dict[str, tuple] = {}
    for name, param in named:
        role = param_role(name, n_layers)
        if not per_layer and role.role in ("layer", "embeddings", "top"):
            label, lr = "backbone", train_cfg.lr
        else:
            label, lr = role.label, role_lr(role, train_cfg, n_layers)
        no_decay = is_no_decay_param(name, param)
        key = f"{label}/{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            weight_decay = 0.0 if no_decay else train_cfg.weight_decay
            groups[key] = {"name": key, "params": [], "lr": lr, "weight_decay": weight_decay}
            sort_keys[key] = (_group_order(role, n_layers) if label != "backbone" else (0,), no_decay)
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups, key=lambda k: sort_keys[k])]


def describe_param_groups(groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group for logs: name, lr, weight_decay, tensors, elements."""
    return [
        {
            "name": g.get("name", f"group{i}"),
            "lr": g["lr"],
            "weight_decay": g.get("weight_decay", 0.0),
            "tensors": len(g["params"]),
            "elements": int(sum(p.numel() for p in g["params"])),
        }
        for i, g in enumerate(groups)
    ]
