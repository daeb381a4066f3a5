"""One training step and what happens around it: the epoch's batches, the step itself (forward,
loss, backward, gradient accumulation, clipping, optimizer and LR schedule), gradual unfreezing,
the periodic log line, and the time budget.

train_step works on one micro-batch inside ``accelerator.accumulate``: gradients add up over
train.grad_accum micro-batches and the optimizer and schedule advance only on the last one
(``accelerator.sync_gradients``), as in accelerate's gradient-accumulation guide.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from accelerate import Accelerator

from adapters.config import RunConfig
from adapters.modeling.losses import causal_lm_response_loss, classification_loss
from adapters.training.setup import TrainingRun
from adapters.training.state import TrainState


@dataclass
class StepOutput:
    """One micro-batch: its mean loss on this process, its real (non-padding) tokens and rows, and
    whether it completed an optimizer step (the last micro-batch of an accumulation)."""

    loss: float
    tokens: int
    samples: int
    synced: bool


def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: RunConfig) -> torch.Tensor:
    """The scalar training loss of a batch (input_ids/attention_mask of shape (batch, seq), plus
    labels): mean cross-entropy over response tokens for causal LMs, over rows (with
    train.label_smoothing) for classifiers (adapters.modeling.losses)."""
    if cfg.task == "causal-lm":
        return causal_lm_response_loss(model, batch)[0]
    return classification_loss(model, batch, cfg.train.label_smoothing)[0]


def train_step(
    accelerator: Accelerator, model: torch.nn.Module, optimizer, scheduler, batch: dict[str, torch.Tensor],
    cfg: RunConfig,
) -> StepOutput:
    """Forward and backward on one micro-batch; on the last micro-batch of an accumulation also
    clip the global gradient norm to train.max_grad_norm, step the optimizer and (unless the
    step was skipped, e.g. an fp16 overflow) the LR schedule. Gradients are zeroed after each
    optimizer step (accelerate makes step/zero_grad no-ops in between)."""
    with accelerator.accumulate(model):
        loss = compute_loss(model, batch, cfg)
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.train.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return StepOutput(
        loss=loss.detach().float().item(),
        tokens=int(batch["attention_mask"].sum()),
        samples=int(batch["attention_mask"].shape[0]),
        synced=accelerator.sync_gradients,
    )


def epoch_batches(run: TrainingRun, state: TrainState) -> Iterable[dict[str, torch.Tensor]]:
    """The batches of epoch `state.epoch`: reshuffled per epoch, without the `state.batches_done`
    already trained (a resumed run), after opening the stages due this epoch (unfreeze_unit "epoch")."""
    train_dl = run.train_dl
    if hasattr(train_dl, "set_epoch"):
        train_dl.set_epoch(state.epoch)
    batches = run.accelerator.skip_first_batches(train_dl, state.batches_done) if state.batches_done else train_dl
    unfreeze_due(run, state, "epoch")
    return batches


def unfreeze_due(run: TrainingRun, state: TrainState, unit: Literal["epoch", "step"]) -> None:
    """Gradual unfreezing (ULMFiT, Howard & Ruder, 2018): open the stages due at this epoch or
    step, when train.unfreeze_unit is `unit`, and log them."""
    if run.unfreezer is None or run.cfg.train.unfreeze_unit != unit:
        return
    stages = run.unfreezer.step(state.epoch if unit == "epoch" else state.step, run.optimizer, run.scheduler)
    if stages:
        run.metrics_log.write(state.step, {"event": "unfreeze", "stages": stages})


def log_step(run: TrainingRun, state: TrainState) -> dict[str, float]:
    """Write the log line of the steps since the last one and start a new one.

    Returns {"loss": mean micro-batch loss (over all processes, as one process with the global
    batch would see it), "lr": the first group's current LR, "epoch", "tokens_per_second": real
    tokens of all processes per second since the loop started}.
    """
    accelerator = run.accelerator
    elapsed = state.elapsed()
    mean_loss = state.running_loss / state.running_n
    if accelerator.num_processes > 1:
        # Each rank saw its own shard: log the whole global batch's loss, as one process would.
        mean_loss = accelerator.reduce(torch.tensor(mean_loss, device=accelerator.device), reduction="mean").item()
    row = {"loss": mean_loss, "lr": run.scheduler.get_last_lr()[0], "epoch": state.epoch,
           "tokens_per_second": state.tokens_seen * accelerator.num_processes / max(elapsed, 1e-9)}
    run.metrics_log.write(state.step, row)
    state.history.append({"step": state.step, "loss": row["loss"]})
    state.running_loss, state.running_n = 0.0, 0
    return row


def out_of_time(accelerator: Accelerator, elapsed: float, budget: float) -> bool:
    """Whether `elapsed` training seconds reached the train.max_seconds `budget`; every process
    stops at the same step (the slowest rank decides). A collective when distributed."""
    over = elapsed >= budget
    if accelerator.num_processes > 1:
        over = bool(accelerator.reduce(torch.tensor(float(over), device=accelerator.device), reduction="sum").item())
    return over
