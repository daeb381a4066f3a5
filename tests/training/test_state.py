"""Early stopping and the loop's counters (adapters.training.state), without a model; and the
train script's start-up staying free of the training stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from adapters.config import EarlyStoppingConfig
from adapters.training.state import EarlyStopping, TrainState, is_improvement

REPO = Path(__file__).resolve().parents[2]


def test_is_improvement_respects_mode_and_min_delta():
    assert is_improvement(1.0, None, "min", 0.0)
    assert not is_improvement(None, 1.0, "min", 0.0)
    assert is_improvement(0.8, 1.0, "min", 0.1) and not is_improvement(0.95, 1.0, "min", 0.1)
    assert is_improvement(0.7, 0.5, "max", 0.1) and not is_improvement(0.55, 0.5, "max", 0.1)
    assert not is_improvement(1.0, 1.0, "min", 0.0)  # equal is not better


def test_early_stopping_keeps_the_best_and_stops_after_patience():
    stopper = EarlyStopping.from_config(EarlyStoppingConfig(metric="eval_accuracy", mode="max", patience=2))
    snapshots = []

    def snap():
        snapshots.append(len(snapshots))
        return {"w": len(snapshots)}

    assert stopper.update({"eval_accuracy": 0.5}, 3, snap) and not stopper.should_stop
    assert not stopper.update({"eval_accuracy": 0.4}, 6, snap) and not stopper.should_stop
    assert stopper.update({"eval_accuracy": 0.6}, 9, snap) and stopper.bad_evals == 0
    assert not stopper.update({"eval_accuracy": 0.6}, 12, snap)
    assert not stopper.update({}, 15, snap)  # a missing metric counts as no improvement
    assert stopper.should_stop
    assert (stopper.best_value, stopper.best_step, stopper.best_state) == (0.6, 9, {"w": 2})
    assert snapshots == [0, 1], "weights are copied only on improvement"


def test_without_a_config_the_lowest_eval_loss_is_kept_and_training_never_stops():
    stopper = EarlyStopping.from_config(None)
    stopper.update({"eval_loss": 2.0}, 1, dict)
    for step in range(2, 50):
        stopper.update({"eval_loss": 3.0}, step, dict)
    assert not stopper.should_stop and (stopper.best_value, stopper.best_step) == (2.0, 1)


def test_checkpoint_state_round_trips_counters_and_early_stopping():
    stopper = EarlyStopping(patience=3)
    stopper.update({"eval_loss": 1.5}, 4, dict)
    stopper.update({"eval_loss": 1.7}, 8, dict)
    state = TrainState(
        step=8,
        epoch=1,
        batches_done=5,
        history=[{"step": 8, "loss": 1.2}],
        tokens_seen=900,
        samples_seen=40,
        running_loss=2.5,
        running_n=2,
    )
    saved = json.loads(json.dumps(state.checkpoint_state(stopper)))  # as a checkpoint stores it
    assert list(saved) == [
        "step",
        "epoch",
        "batches_done",
        "best_value",
        "best_step",
        "bad_evals",
        "history",
        "tokens_seen",
        "samples_seen",
        "running_loss",
        "running_n",
    ]
    state2, stopper2 = TrainState(), EarlyStopping(patience=3)
    state2.restore(saved)
    stopper2.restore(saved, best_state={"w": 1})
    assert (state2.step, state2.epoch, state2.batches_done, state2.history) == (8, 1, 5, state.history)
    # the loss since the last log line and the token counts continue, so the next log line and the summary match
    assert (state2.tokens_seen, state2.samples_seen, state2.running_loss, state2.running_n) == (900, 40, 2.5, 2)
    assert (stopper2.best_value, stopper2.best_step, stopper2.bad_evals, stopper2.best_state) == (1.5, 4, 1, {"w": 1})


def test_record_counts_micro_batches_and_the_running_loss():
    # Two optimizer steps of two micro-batches; each micro-batch's loss is its share of its step's loss.
    state = TrainState()
    for loss, synced, norm in ((1.0, False, None), (3.0, True, 0.7), (0.5, False, None), (1.5, True, 0.2)):
        state.record(SimpleNamespace(loss=loss, tokens=10, samples=2, synced=synced, grad_norm=norm))
    assert (state.batches_done, state.tokens_seen, state.samples_seen) == (4, 40, 8)
    assert state.running_n == 2 and state.running_loss / state.running_n == 3.0
    assert state.grad_norm == 0.2  # the last optimizer step's


def test_train_script_check_does_not_load_the_training_stack(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: causal-lm\nmodel: {name: x}\ndata: {name: trec}\n")
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['scripts/train.py', '--config', {str(cfg)!r}, '--check']\n"
        "try:\n    runpy.run_path('scripts/train.py', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "heavy = ('adapters.training', 'accelerate', 'transformers', 'datasets', 'peft', 'deepspeed', 'bitsandbytes')\n"
        "print(code, sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stdout + proc.stderr
