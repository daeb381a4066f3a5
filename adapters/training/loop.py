"""The training loop on Accelerate: one process, DDP, or DeepSpeed, from the same code.

train(cfg) runs: setup (data -> backbone -> method -> optimizer/schedule, adapters.training.setup)
-> loop (one step: adapters.training.step.train_step; periodic eval and early stopping:
adapters.training.validation / .state; checkpoints) -> finish (restore best, held-out test
base vs adapted, adapter folder + manifest, optional publish: adapters.training.finalize).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from adapters.config import RunConfig
from adapters.training.checkpoint import save_checkpoint
from adapters.training.finalize import TrainResult, finalize
from adapters.training.setup import resume_from_checkpoint, setup_run
from adapters.training.state import EarlyStopping, TrainState
from adapters.training.step import epoch_batches, log_step, out_of_time, train_step, unfreeze_due
from adapters.training.validation import Validator


def train(
    cfg: RunConfig, resume: bool | str | Path = False, command: list[str] | None = None, stop_after: int | None = None,
    on_model_ready: Callable[[Any], None] | None = None, fold: int | None = None,
) -> TrainResult:
    """Run one training job and return its TrainResult (the adapter is in <run_dir>/adapter).

    resume: True continues from the latest checkpoint of the run folder; a path, from that
    checkpoint folder. command: recorded in run_info.json. stop_after: end the loop at that optimizer
    step, as an interruption would (tests). on_model_ready(model): called once the method is
    attached, before the optimizer exists. fold: the cross-validation fold to validate on.
    Raises ConfigError for configs that cannot run (see setup_run).
    """
    run = setup_run(cfg, command=command, fold=fold, on_model_ready=on_model_ready)
    accelerator, model, train_cfg = run.accelerator, run.model, cfg.train
    state, stopper = TrainState(), EarlyStopping.from_config(train_cfg.early_stopping)
    if resume:
        resume_from_checkpoint(run, resume, state, stopper)
    validator = Validator(run, stopper.metric)

    progress = tqdm(total=run.total_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc="training", dynamic_ncols=True)
    model.train()
    state.started = time.perf_counter()
    stop = state.step >= run.total_steps
    while not stop:
        for batch in epoch_batches(run, state):
            if run.batch_trace is not None:
                run.batch_trace.record(state.step + 1, batch)
            out = train_step(accelerator, model, run.optimizer, run.scheduler, batch, cfg)
            state.record(out)
            if not out.synced:
                continue  # more micro-batches to accumulate before the optimizer steps
            state.step += 1
            progress.update(1)
            unfreeze_due(run, state, "step")
            if state.step % train_cfg.log_every == 0 or state.step == run.total_steps:
                row = log_step(run, state)
                progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
            if train_cfg.eval_every and state.step % train_cfg.eval_every == 0 and validator.check(state.step, stopper):
                accelerator.print(f"early stopping at step {state.step}: {stopper.metric} did not improve "
                                  f"for {stopper.bad_evals} evaluations")
                stop = True
            if train_cfg.save_every and state.step % train_cfg.save_every == 0:
                save_checkpoint(run.run_dir / "checkpoints" / f"step-{state.step}", accelerator, model, run.optimizer,
                                run.scheduler, state.checkpoint_state(stopper))
            if state.step >= run.total_steps or (stop_after is not None and state.step >= stop_after):
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
    return finalize(run, state, stopper, validator)
