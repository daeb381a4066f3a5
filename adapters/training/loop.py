"""The training loop on Accelerate: one process, DDP, or DeepSpeed, from the same code.

train(cfg) runs: setup (data -> backbone -> method -> optimizer/schedule, adapters.training.setup)
-> loop (one optimizer step per window of train.grad_accum micro-batches, its loss normalized by
the window's global target count: adapters.training.step.train_window; periodic eval and early
stopping: adapters.training.validation / .state; checkpoints) -> finish (restore best, held-out
test base vs adapted, adapter folder + manifest, optional publish: adapters.training.finalize).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import PartialState
from tqdm.auto import tqdm

from adapters.config import RunConfig
from adapters.training.checkpoint import restored_on_start, save_run_checkpoint
from adapters.training.finalize import TrainResult, finalize, finished_result
from adapters.training.objectives import default_stopper
from adapters.training.run_record import run_identity
from adapters.training.setup import resume_from_checkpoint, setup_run
from adapters.training.state import TrainState
from adapters.training.step import (
    accumulation_windows,
    epoch_batches,
    log_step,
    out_of_time,
    train_window,
    unfreeze_due,
)
from adapters.training.validation import Validator


def train(
    cfg: RunConfig,
    resume: bool | str | Path = False,
    command: list[str] | None = None,
    stop_after: int | None = None,
    on_model_ready: Callable[[Any], None] | None = None,
    fold: int | None = None,
) -> TrainResult:
    """Run one training job and return its TrainResult (the adapter is in <run_dir>/adapter).

    resume: True continues from the newest intact checkpoint of the run folder; a path, from that
    checkpoint folder; a run folder whose run finished returns its result without training again.
    command: recorded in run_info.json. stop_after: end the loop at that optimizer step, as an
    interruption would (tests): the run stays unfinished and unpublished, for a resume to continue.
    on_model_ready(model): called once the method is attached, before the optimizer exists.
    fold: the cross-validation fold to validate on.
    Raises ConfigError for configs that cannot run (see setup_run), CheckpointError for a
    checkpoint that cannot be resumed from (see resume_from_checkpoint).
    """
    if resume:
        done = finished_result(cfg)
        if done is not None:
            PartialState().print(f"--resume: {done.run_dir} holds a finished run; nothing left to train")
            return done
    run = setup_run(cfg, command=command, fold=fold, on_model_ready=on_model_ready)
    accelerator, model, train_cfg = run.accelerator, run.model, cfg.train
    run.run_id = run_identity(cfg, run.run_dir, accelerator, resume)
    state, stopper = TrainState(), default_stopper(cfg)  # train.early_stopping, or the objective's metric
    if resume:
        resume_from_checkpoint(run, resume, state, stopper)
    validator = Validator(run, stopper.metric)

    progress = tqdm(
        total=run.total_steps,
        initial=state.step,
        disable=not accelerator.is_local_main_process,
        desc="training",
        dynamic_ncols=True,
    )
    model.train()
    state.started = time.perf_counter()
    stop, interrupted = state.step >= run.total_steps, False
    while not stop:
        batches = restored_on_start(epoch_batches(run, state), state.rng)  # a resumed run's random states
        state.rng = None
        for window in accumulation_windows(batches, train_cfg.grad_accum):
            train_window(run, state, window)
            state.step += 1
            progress.update(1)
            unfreeze_due(run, state, "step")
            if state.step % train_cfg.log_every == 0 or state.step == run.total_steps:
                row = log_step(run, state)
                progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
            if train_cfg.eval_every and state.step % train_cfg.eval_every == 0 and validator.check(state.step, stopper):
                accelerator.print(
                    f"early stopping at step {state.step}: {stopper.metric} did not improve "
                    f"for {stopper.bad_evals} evaluations"
                )
                stop = True
            if train_cfg.save_every and state.step % train_cfg.save_every == 0:
                save_run_checkpoint(run, state, stopper)
            interrupted = not stop and stop_after is not None and stop_after <= state.step < run.total_steps
            if state.step >= run.total_steps or interrupted:
                stop = True
            training_seconds = state.elapsed() - validator.seconds  # a max_seconds budget does not count evaluation
            if train_cfg.max_seconds and out_of_time(accelerator, training_seconds, train_cfg.max_seconds):
                stop = True
            if stop:
                break
        else:  # the epoch ran out: validate at its end unless validation runs every eval_every steps
            state.epoch, state.batches_done = state.epoch + 1, 0
            if not train_cfg.eval_every:
                stop = validator.check(state.step, stopper)
    progress.close()
    return finalize(run, state, stopper, validator, finished=not interrupted)
