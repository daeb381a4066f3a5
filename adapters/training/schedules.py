"""Learning-rate schedules: transformers' schedulers plus step decay, all with warmup.

constant / linear / cosine / cosine_with_restarts are transformers' ``get_scheduler`` schedules
(linear warmup, then constant, linear decay to 0, half-cosine decay to 0 (SGDR, Loshchilov &
Hutter, 2017, without restarts) or cosine with hard restarts); "step" is the classic step decay
(x gamma every step_size steps) after the same linear warmup.

Every scheduler here is a ``torch.optim.lr_scheduler.LambdaLR`` (one multiplier function per
param group), so param groups added later, e.g. by gradual unfreezing, can join the same
schedule through ``add_param_group``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from adapters.config import TrainConfig
from adapters.errors import ConfigError

SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "step")
# Our names -> transformers.get_scheduler names.
_TRANSFORMERS_NAMES = {
    "constant": "constant_with_warmup",
    "linear": "linear",
    "cosine": "cosine",
    "cosine_with_restarts": "cosine_with_restarts",
}


def warmup_steps(train_cfg: TrainConfig, num_training_steps: int) -> int:
    """train.warmup_steps when > 0, else ceil(warmup_ratio x steps) (as transformers' Trainer rounds)."""
    if train_cfg.warmup_steps > 0:
        return int(train_cfg.warmup_steps)
    return int(math.ceil(train_cfg.warmup_ratio * num_training_steps))


def step_decay_lambda(num_warmup_steps: int, step_size: int, gamma: float):
    """LambdaLR multiplier of optimizer step `step`: linear warmup from 0 to 1 over
    `num_warmup_steps`, then x gamma every `step_size` steps after warmup."""

    def multiplier(step: int) -> float:
        if step < num_warmup_steps:
            return float(step) / float(max(1, num_warmup_steps))
        return gamma ** ((step - num_warmup_steps) // step_size)

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, num_training_steps: int) -> LambdaLR:
    """The LR scheduler named by train.scheduler over `num_training_steps` optimizer steps (with
    warmup_steps(...) of linear warmup); call .step() once per optimizer step.

    Raises ConfigError for no steps, a warmup that leaves no steps, "step" without
    train.step_size, or an unknown name.
    """
    if num_training_steps < 1:
        raise ConfigError(
            f"cannot schedule {num_training_steps} training steps: the training set is empty or too small"
        )
    name = train_cfg.scheduler
    warmup = warmup_steps(train_cfg, num_training_steps)
    if warmup >= num_training_steps and name != "constant":
        raise ConfigError(
            f"train.warmup_steps/warmup_ratio: {warmup} warmup steps leave none of the {num_training_steps} "
            "training steps for the schedule; lower the warmup"
        )
    if name == "step":
        if train_cfg.step_size is None:
            raise ConfigError("train.step_size is required when train.scheduler is 'step' (steps between LR drops)")
        fn = step_decay_lambda(warmup, train_cfg.step_size, train_cfg.step_gamma)
        return LambdaLR(optimizer, [fn] * len(optimizer.param_groups))
    if name not in _TRANSFORMERS_NAMES:
        raise ConfigError(f"train.scheduler: unknown {name!r}; valid: {', '.join(SCHEDULERS)}")
    extra: dict[str, Any] = {}
    if name == "cosine_with_restarts":
        extra["num_cycles"] = train_cfg.num_cycles
    return get_scheduler(
        _TRANSFORMERS_NAMES[name],
        optimizer=optimizer,
        num_warmup_steps=warmup,
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=extra or None,
    )


def _unwrap_scheduler(scheduler: Any) -> Any:
    # accelerate's AcceleratedScheduler holds the real one at `.scheduler`.
    while not isinstance(scheduler, LambdaLR) and hasattr(scheduler, "scheduler"):
        scheduler = scheduler.scheduler
    return scheduler


def add_param_group(optimizer: Any, group: dict, scheduler: Any = None) -> dict:
    """Add `group` to a (possibly accelerate-wrapped) optimizer; with a LambdaLR `scheduler`, the
    group follows the same schedule from the current step on (its "lr" is its peak LR).

    Returns the optimizer's new group. Raises TypeError for a scheduler that is not a LambdaLR.
    """
    optimizer.add_param_group(group)  # accelerate's AcceleratedOptimizer forwards this
    added = optimizer.param_groups[-1]
    sched = _unwrap_scheduler(scheduler) if scheduler is not None else None
    if sched is not None:
        if not isinstance(sched, LambdaLR):
            raise TypeError(f"add_param_group: cannot extend a {type(sched).__name__}; use a LambdaLR scheduler")
        peak = added["lr"]
        fn = sched.lr_lambdas[0]
        added["initial_lr"] = peak
        sched.base_lrs.append(peak)
        sched.lr_lambdas.append(fn)
        added["lr"] = peak * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in optimizer.param_groups]
    return added
