"""What the training loop carries from step to step: counters, the loss since the last log line,
and early stopping on a validation metric (with the best weights seen, for restoring at the end).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from adapters.config import EarlyStoppingConfig

if TYPE_CHECKING:  # step imports this module: a run-time import would be circular
    from adapters.training.step import StepOutput


def is_improvement(value: float | None, best: float | None, mode: Literal["min", "max"], min_delta: float) -> bool:
    """Whether `value` beats `best` by more than `min_delta` (in the metric's units).

    mode "min": lower is better (losses); "max": higher is better (accuracy). A missing value
    never improves; any value improves on no best yet.
    """
    if value is None:
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@dataclass
class EarlyStopping:
    """Best-so-far tracking of one validation metric, with optional patience.

    As in Keras' ``EarlyStopping`` and transformers' ``EarlyStoppingCallback``: an evaluation
    improves when the metric beats the best by more than ``min_delta``; after ``patience``
    evaluations in a row without improvement, ``should_stop`` turns true. ``patience=None``
    never stops (the loop still keeps the best weights, to restore them at the end).

    metric: key of the validation metrics, e.g. "eval_loss"; mode: "min" or "max".
    """

    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    patience: int | None = None
    min_delta: float = 0.0
    best_value: float | None = None
    best_step: int = 0
    best_state: dict[str, Any] | None = None  # {parameter name: tensor} of the best evaluation, this run only
    bad_evals: int = 0

    @classmethod
    def from_config(cls, config: EarlyStoppingConfig | None) -> EarlyStopping:
        """train.early_stopping, or (None) keep the lowest eval_loss without ever stopping."""
        if config is None:
            return cls()
        return cls(metric=config.metric, mode=config.mode, patience=config.patience, min_delta=config.min_delta)

    def update(self, metrics: dict[str, Any], step: int, snapshot: Callable[[], dict[str, Any]]) -> bool:
        """Record one evaluation at optimizer step `step`; returns whether it improved.

        snapshot: called only on improvement, returns the weights to keep (e.g. the trainable
        state dict; under ZeRO-3 a collective, but every rank sees the same metrics).
        """
        value = metrics.get(self.metric)
        if is_improvement(value, self.best_value, self.mode, self.min_delta):
            self.best_value, self.best_step, self.best_state = value, step, snapshot()
            self.bad_evals = 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        """True once `patience` evaluations in a row did not improve."""
        return self.patience is not None and self.bad_evals >= self.patience

    def restore(self, saved: dict[str, Any], best_state: dict[str, Any] | None = None) -> None:
        """Continue from a checkpoint's trainer state and the best weights saved with it."""
        self.best_value = saved.get("best_value")
        self.best_step = saved.get("best_step", 0)
        self.bad_evals = saved.get("bad_evals", 0)
        self.best_state = best_state


@dataclass
class TrainState:
    """Counters of one run. `step` counts optimizer steps; `batches_done` micro-batches of the
    current epoch (to skip them on resume); tokens/samples are this process's real (non-padding)
    tokens and rows; since the last log line, `running_loss` sums this process's shares of the step
    losses (StepOutput.loss) and `running_n` counts the optimizer steps."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # [{"step", "loss"}] at each log line
    tokens_seen: int = 0
    samples_seen: int = 0
    running_loss: float = 0.0
    running_n: int = 0
    started: float = 0.0  # time.perf_counter() when the loop started
    grad_norm: float | None = None  # the last optimizer step's global gradient norm before clipping
    # A resumed run's random states (checkpoint.rng_state), put back once its first batches start.
    rng: dict[str, Any] | None = None

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from a checkpoint's trainer state (see checkpoint_state)."""
        self.step, self.epoch, self.batches_done = saved["step"], saved["epoch"], saved["batches_done"]
        self.history = saved.get("history", [])
        self.tokens_seen, self.samples_seen = saved.get("tokens_seen", 0), saved.get("samples_seen", 0)
        self.running_loss, self.running_n = saved.get("running_loss", 0.0), saved.get("running_n", 0)

    def record(self, out: StepOutput) -> None:
        """Count one trained micro-batch (see adapters.training.step.train_step)."""
        self.batches_done += 1
        self.tokens_seen += out.tokens
        self.samples_seen += out.samples
        self.running_loss += out.loss
        self.running_n += int(out.synced)  # the window's last micro-batch completes an optimizer step
        if out.synced:
            self.grad_norm = out.grad_norm

    def checkpoint_state(self, stopper: EarlyStopping) -> dict[str, Any]:
        """The JSON-able trainer state a checkpoint stores next to the weights."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "best_value": stopper.best_value,
            "best_step": stopper.best_step,
            "bad_evals": stopper.bad_evals,
            "history": self.history,
            "tokens_seen": self.tokens_seen,
            "samples_seen": self.samples_seen,
            "running_loss": self.running_loss,
            "running_n": self.running_n,
        }

    def elapsed(self) -> float:
        """Seconds since the loop started (evaluation included)."""
        return time.perf_counter() - self.started
