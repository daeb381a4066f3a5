"""Gradual unfreezing: train the head alone first, then open one block at a time from the top.

The schedule of ULMFiT (Howard & Ruder, 2018, section 3.3), combined there, as here, with
discriminative learning rates (adapters.training.param_groups).

The unit of unfreezing is a *stage*, built from the parameters that were trainable when the
unfreezer was created (so it works for full fine-tuning, where that is every parameter, and
for peft methods, where it is the adapter weights plus the head copy):

    head (+ prompt encoders)  ->  layer.N-1 (+ final norm / pooler)  ->  ...  ->  layer.0  ->  embeddings

Roles come from ``adapters.training.param_groups.param_role``, the same rule the discriminative LRs use.
Stage 0 is trainable from the start; stage k opens once ``position >= k * every`` (position =
epoch or optimizer step), as new optimizer param groups at the stage's own LR, which join the
running LR schedule (``adapters.training.schedules.add_param_group``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch.nn as nn

from adapters.config import TrainConfig
from adapters.training.param_groups import is_no_decay_param, num_blocks, param_role
from adapters.training.schedules import add_param_group

log = logging.getLogger(__name__)

_BLOCK_LIST_NAMES = ("layers", "layer", "h", "blocks", "block")


def base_module(model: nn.Module) -> nn.Module:
    """The transformers model under peft's wrappers (MeanPoolingClassifier stays: its blocks are found below)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def transformer_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(index, block) for the transformer blocks of a Llama/BERT/GPT-2-like model, bottom first.

    Finds the nn.ModuleList named layers/layer/h/blocks (model.layers, encoder.layer,
    backbone.encoder.layer of MeanPoolingClassifier, through peft wrappers); when several
    exist, the one whose length matches config.num_hidden_layers wins, then the longest.
    """
    root = base_module(model)
    candidates = [
        (name, module)
        for name, module in root.named_modules()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LIST_NAMES and len(module) > 0
    ]
    if not candidates:
        raise ValueError(
            f"no transformer blocks found in {type(root).__name__} (looked for a ModuleList named {_BLOCK_LIST_NAMES})"
        )
    expected = getattr(getattr(root, "config", None), "num_hidden_layers", None)
    candidates.sort(key=lambda item: (len(item[1]) == expected, len(item[1])), reverse=True)
    return list(enumerate(candidates[0][1]))


def freeze_all_but(model: nn.Module, predicate: Callable[[str], bool]) -> int:
    """Make exactly the parameters whose name satisfies `predicate` trainable; returns their element count."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad = bool(predicate(name))
        if param.requires_grad:
            trainable += param.numel()
    return trainable


def stage_of(name: str, num_layers: int) -> str:
    """The unfreezing stage of parameter `name`: "head", "layer.<i>" or "embeddings"; the
    parameters above the blocks (final norm, pooler) open with the top block."""
    role = param_role(name, num_layers)
    if role.role in ("head", "prompt"):
        return "head"
    if role.role == "top":
        return f"layer.{num_layers - 1}" if num_layers > 0 else "head"
    return role.label  # layer.i | embeddings


class GradualUnfreezer:
    """Unfreeze one stage every `every` epochs or steps (see the module doc).

    LRs: `lr_for_group(stage_name) -> lr`, or `base_lr` with `decay`: layer.i at
    base_lr x decay^(N-1-i), embeddings at base_lr x decay^N, head at head_lr (default base_lr).
    Creating it freezes every trainable parameter outside the first stage. Raises ValueError for
    a bad `every`/`unit`, no LR rule, or a model without trainable parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int,
        unit: Literal["epoch", "step"] = "epoch",
        lr_for_group: Callable[[str], float] | None = None,
        base_lr: float | None = None,
        decay: float = 1.0,
        head_lr: float | None = None,
        weight_decay: float = 0.0,
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"GradualUnfreezer: every must be a positive integer (got {every!r})")
        if unit not in ("epoch", "step"):
            raise ValueError(f"GradualUnfreezer: unit must be 'epoch' or 'step' (got {unit!r})")
        if lr_for_group is None and base_lr is None:
            raise ValueError("GradualUnfreezer: give lr_for_group or base_lr")
        self.model = model
        self.every = every
        self.unit = unit
        self.weight_decay = weight_decay
        candidates = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not candidates:
            raise ValueError("GradualUnfreezer: the model has no trainable parameters to unfreeze")
        self.num_layers = num_blocks(model, (n for n, _ in candidates))
        stages: dict[str, list[tuple[str, Any]]] = {}
        for name, param in candidates:
            stages.setdefault(stage_of(name, self.num_layers), []).append((name, param))
        wanted = ["head"] + [f"layer.{i}" for i in reversed(range(self.num_layers))] + ["embeddings"]
        unknown = set(stages) - set(wanted)
        if unknown:  # pragma: no cover - stage_of only yields the names above
            raise ValueError(f"GradualUnfreezer: unexpected stages {sorted(unknown)}")
        self._order = [s for s in wanted if s in stages]
        self._params = stages
        if lr_for_group is None:
            n = self.num_layers

            def lr_for_group(stage: str) -> float:
                if stage == "head":
                    return head_lr or base_lr
                if stage == "embeddings":
                    return base_lr * decay**n
                return base_lr * decay ** (n - 1 - int(stage.split(".")[1]))

        self.lr_for_group = lr_for_group
        self.unfrozen: list[str] = [self._order[0]]
        first = {id(p) for _, p in self._params[self._order[0]]}
        for _, param in candidates:
            param.requires_grad = id(param) in first
        log.info("gradual unfreezing (every %d %s(s)): %s", every, unit, " -> ".join(self._order))

    @classmethod
    def from_train_config(
        cls, model: nn.Module, train_cfg: TrainConfig, every: int, unit: Literal["epoch", "step"] = "epoch"
    ) -> GradualUnfreezer:
        """LRs from train.lr / head_lr / layer_decay, weight decay from train.weight_decay."""
        return cls(
            model,
            every,
            unit,
            base_lr=train_cfg.lr,
            decay=train_cfg.layer_decay or 1.0,
            head_lr=train_cfg.head_lr,
            weight_decay=train_cfg.weight_decay,
        )

    def order(self) -> list[str]:
        """Stage names in unfreezing order: head, top block, ..., bottom block, embeddings."""
        return list(self._order)

    def param_names(self, stage: str) -> list[str]:
        """The parameter names of one stage."""
        return [n for n, _ in self._params[stage]]

    def due_stages(self, position: int) -> int:
        """How many stages are open at `position` (epoch or step, counted from 0)."""
        return min(len(self._order), 1 + max(0, position) // self.every)

    def param_groups(self, stage: str) -> list[dict[str, Any]]:
        """Optimizer groups for one stage, split by weight decay; named '<stage>/decay' etc."""
        lr = float(self.lr_for_group(stage))
        groups = []
        for no_decay in (False, True):
            params = [p for n, p in self._params[stage] if is_no_decay_param(n, p) == no_decay]
            if params:
                groups.append(
                    {
                        "name": f"{stage}/{'no_decay' if no_decay else 'decay'}",
                        "params": params,
                        "lr": lr,
                        "weight_decay": 0.0 if no_decay else self.weight_decay,
                    }
                )
        return groups

    def initial_param_groups(self) -> list[dict[str, Any]]:
        """Groups to build the optimizer with: the stages already open (at first, the head)."""
        return [g for stage in self.unfrozen for g in self.param_groups(stage)]

    def step(self, position: int, optimizer: Any, scheduler: Any = None) -> list[str]:
        """Open every stage due at `position`; returns the newly unfrozen stage names.

        Call at the start of each epoch (unit='epoch', position = epoch index) or before
        each optimizer step (unit='step', position = optimizer steps done). Idempotent.
        """
        opened = []
        while len(self.unfrozen) < self.due_stages(position):
            stage = self._order[len(self.unfrozen)]
            for _, param in self._params[stage]:
                param.requires_grad = True
            for group in self.param_groups(stage):
                add_param_group(optimizer, group, scheduler)
            self.unfrozen.append(stage)
            opened.append(stage)
        if opened:
            log.info("%s %d: unfroze %s", self.unit, position, ", ".join(opened))
        return opened

    @property
    def done(self) -> bool:
        """Whether every stage is open."""
        return len(self.unfrozen) == len(self._order)
