"""One training step and what happens around it: the epoch's batches grouped into optimizer steps,
the step itself (forward, loss, backward, gradient accumulation, clipping, optimizer and LR
schedule), gradual unfreezing, the periodic log line, and the time budget.

Loss normalization. An optimizer step trains on a window of train.grad_accum micro-batches on each
of the W processes. Its loss is the cross-entropy summed over every target of that global batch
(response tokens for causal-lm, rows for classification) divided by their number::

    loss_step = sum over processes, micro-batches and targets of CE / N_targets(global batch)

so every target weighs the same whatever the micro-batch size, accumulation or process count. This
is transformers' fix of late 2024 (Trainer's ``num_items_in_batch``, v4.46; "Fixing Gradient
Accumulation", huggingface.co/blog/gradient_accumulation): the loop counts the window's targets
before its first forward pass (``global_target_count``, a sum over processes), and each micro-batch
back-propagates its summed loss / N_targets, multiplied back by what the launcher divides by: the
gradient average over the W processes (DDP, DeepSpeed) and accelerate's division by the
accumulation steps (``backward_factor``). Non-final micro-batches run under ``accelerator.no_sync``; the optimizer and
the schedule step after the window's last one.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from adapters.config import RunConfig
from adapters.modeling.losses import causal_lm_response_loss, classification_loss, response_target_count
from adapters.training.setup import TrainingRun
from adapters.training.state import TrainState


@dataclass
class StepOutput:
    """One micro-batch. loss: its share of the optimizer step's loss on this process (its summed loss
    / the step's global target count: the shares of all micro-batches and processes add up to the
    step's loss); tokens and samples: its real (non-padding) tokens and rows; synced: whether it was
    the last micro-batch of its window (the optimizer stepped); grad_norm: on that last one, the
    step's global L2 gradient norm before clipping (None on the others)."""

    loss: float
    tokens: int
    samples: int
    synced: bool
    grad_norm: float | None = None


def compute_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: RunConfig, objective=None
) -> torch.Tensor:
    """The summed training loss of a batch (input_ids/attention_mask of shape (batch, seq), plus
    labels), in nats: cross-entropy summed over response tokens for causal LMs, over rows (with
    train.label_smoothing) for classifiers (adapters.modeling.losses); with a train.objective other
    than sft, that `objective`'s loss summed over its items (pairs, completions: adapters.training.objectives).
    target_count gives the number of terms."""
    if objective is not None:
        return objective.loss(model, batch)
    if cfg.task == "causal-lm":
        return causal_lm_response_loss(model, batch, reduction="sum")[0]
    return classification_loss(model, batch, cfg.train.label_smoothing, reduction="sum")[0]


def target_count(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: RunConfig, objective=None) -> int:
    """How many terms compute_loss sums: predicted response tokens (causal-lm; virtual prompt
    tokens included in the shift, see response_target_count), rows (classification), or the
    `objective`'s items (preference pairs, GRPO completions)."""
    if objective is not None:
        return objective.count(model, batch)
    if cfg.task == "causal-lm":
        return response_target_count(model, batch["labels"])
    return int(batch["labels"].shape[0])


def global_target_count(
    accelerator: Accelerator,
    model: torch.nn.Module,
    window: list[dict[str, torch.Tensor]],
    cfg: RunConfig,
    objective=None,
) -> int:
    """The targets of one optimizer step's global batch: this process's window of micro-batches,
    summed over all processes (a collective when distributed; every process gets the same count)."""
    count = sum(target_count(model, batch, cfg, objective) for batch in window)
    if accelerator.num_processes > 1:
        total = torch.tensor(count, device=accelerator.device, dtype=torch.int64)
        count = int(accelerator.reduce(total, reduction="sum").item())
    return count


def backward_factor(accelerator: Accelerator) -> tuple[float, dict[str, Any]]:
    """(factor, keyword arguments of accelerator.backward) that undo what the launcher does to a loss,
    so that the gradient is that of the loss given to backward, summed over micro-batches and processes.

    Every data-parallel launcher averages gradients over the W processes (DDP's all-reduce; DeepSpeed
    ZeRO's reduce with gradient_average), hence x W. Outside DeepSpeed, accelerator.backward divides
    the loss by gradient_accumulation_steps, hence x that; DeepSpeed's engine.backward would divide by
    its own accumulation steps too, which scale_wrt_gas=False turns off (as transformers' Trainer does).
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return float(accelerator.num_processes), {"scale_wrt_gas": False}
    return float(accelerator.num_processes * accelerator.gradient_accumulation_steps), {}


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    batch: dict[str, torch.Tensor],
    cfg: RunConfig,
    global_count: int,
    last: bool,
    objective=None,
) -> StepOutput:
    """Forward and backward on one micro-batch of an optimizer step whose global batch has
    `global_count` targets (global_target_count); gradients add up over the window.

    On the `last` micro-batch of the window, gradients are reduced across processes, the global
    gradient norm is measured and clipped to train.max_grad_norm (when set), the optimizer steps and
    (unless the step was skipped, e.g. an fp16 overflow) the LR schedule, and gradients are zeroed;
    before it, no_sync keeps DDP from reducing and accelerate (DeepSpeed) from stepping. A window
    without targets (global_count 0) gives zero gradients.
    """
    accelerator.sync_gradients = last  # DeepSpeed reduces and steps at this boundary only
    factor, backward_kwargs = backward_factor(accelerator)
    with contextlib.nullcontext() if last else accelerator.no_sync(model):
        loss_sum = compute_loss(model, batch, cfg, objective)
        accelerator.backward(loss_sum * (factor / max(global_count, 1)), **backward_kwargs)
    grad_norm = None
    if last:
        # An infinite limit measures without clipping; under DeepSpeed the engine clipped in its step
        # and accelerate returns the norm it measured there.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf)
        grad_norm = None if grad_norm is None else float(grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return StepOutput(
        loss=loss_sum.detach().float().item() / max(global_count, 1),
        tokens=int(batch["attention_mask"].sum()),
        samples=int(batch["attention_mask"].shape[0]),
        synced=last,
        grad_norm=grad_norm,
    )


def train_window(run: TrainingRun, state: TrainState, window: list[dict[str, torch.Tensor]]) -> None:
    """One optimizer step over `window` (this process's micro-batches of the step, see
    accumulation_windows): its global target count first, then train_step on each micro-batch,
    recorded in `state` (and in the batch trace, when on), then the objective's measurements of the
    step (preference accuracy, rewards) to metrics.jsonl. Does not advance state.step."""
    accelerator, cfg, objective = run.accelerator, run.cfg, run.objective
    global_count = global_target_count(accelerator, run.model, window, cfg, objective)
    for i, batch in enumerate(window):
        if run.batch_trace is not None:
            run.batch_trace.record(state.step + 1, batch)
        last = i == len(window) - 1
        state.record(
            train_step(accelerator, run.model, run.optimizer, run.scheduler, batch, cfg, global_count, last, objective)
        )
    if objective is not None:
        run.metrics_log.write(state.step + 1, {"event": "objective", **objective.step_stats()})


def accumulation_windows(
    batches: Iterable[dict[str, torch.Tensor]], size: int
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Consecutive lists of `size` micro-batches (train.grad_accum), one per optimizer step; the last
    of an epoch may be shorter. Fetched ahead so that the step's targets are counted before its
    first backward pass."""
    batches = iter(batches)
    while window := list(itertools.islice(batches, size)):
        yield window


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

    Returns {"loss": the mean over the optimizer steps since the last line of each step's loss (its
    global batch's summed cross-entropy / its target count, see the module doc: the same value for
    one process, DDP or DeepSpeed), "lr": the first group's current LR, "epoch", "tokens_per_second":
    real tokens of all processes per second since the loop started, "grad_norm": the last step's global
    gradient norm before clipping, when measured}. A collective when distributed.
    """
    accelerator = run.accelerator
    elapsed = state.elapsed()
    step_losses = state.running_loss  # this process's shares of the steps' losses, summed
    if accelerator.num_processes > 1:
        step_losses = accelerator.reduce(torch.tensor(step_losses, device=accelerator.device), reduction="sum").item()
    row = {
        "loss": step_losses / state.running_n,
        "lr": run.scheduler.get_last_lr()[0],
        "epoch": state.epoch,
        "tokens_per_second": state.tokens_seen * accelerator.num_processes / max(elapsed, 1e-9),
    }
    if state.grad_norm is not None:
        row["grad_norm"] = state.grad_norm
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
