"""A killed run, resumed, is the uninterrupted run (issue 14, fault 3), on a tiny classifier with dropout on
(backbone and LoRA), fp32 on CPU, two micro-batches per optimizer step, crossing an epoch boundary.

The run is killed in this process by raising from a patched function (then accelerate's process-wide
state is reset, as a new process would start), at five points: between the two micro-batches of a
step, while a checkpoint is written, after the last step, while the adapter is written, and while it
is published; once for real, with SIGKILL, through scripts/train.py. Every resumed run must save the
uninterrupted run's adapter bit for bit (torch.equal), log the same losses once each, and leave exactly
one version in the store. Damaged checkpoints (truncated weights or optimizer state, broken state JSON,
one flipped bit) are named in one line and skipped for the previous intact one, never loaded.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from adapters.config import load_config
from adapters.store.store import AdapterStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 12, 3  # 96 rows, 2 micro-batches of 8 per step: 6 steps per epoch, 2 epochs


class Killed(Exception):
    """Stands for the process dying at that point."""


def run_config(model_dir: Path, run_dir: Path, store: Path, **train) -> dict:
    return {
        "task": "sequence-classification",
        "model": {"name": str(model_dir), "dropout": 0.1},
        "data": {
            "name": "trec",
            "max_length": 32,
            "max_train_samples": 96,
            "max_eval_samples": 24,
            "max_test_samples": 24,
        },
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "train": {
            "lr": 5e-2,
            "batch_size": 8,
            "grad_accum": 2,
            "max_steps": STEPS,
            "log_every": 1,
            "seed": 1,
            "eval_batch_size": 24,
            "save_every": SAVE_EVERY,
            "eval_every": 3,
            **train,
        },
        "eval": {"baseline": False},
        "output": {"run_dir": str(run_dir), "name": "resumed", "publish": True, "store": str(store)},
    }


def train_fresh(raw: dict, **kwargs):
    """train() as a new process would run it: accelerate's process-wide state starts empty."""
    from accelerate.state import AcceleratorState, GradientState

    from adapters.training.loop import train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return train(load_config(raw=raw), **kwargs)


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(run_dir: Path, reference: Path) -> None:
    got, want = adapter(run_dir), adapter(reference)
    assert got.keys() == want.keys() and got
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, f"{len(different)} of {len(want)} tensors differ, e.g. {different[:3]}"


def logged(run_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def assert_one_version(store: Path) -> None:
    store = AdapterStore(store)
    assert store.versions("resumed") == [1]
    assert store.tags("resumed") == {"latest": 1}
    assert store.verify() == {"resumed@1": []}


def assert_resumed_like(run_dir: Path, reference: dict) -> None:
    assert_same_adapter(run_dir, reference["run"])
    assert logged(run_dir) == logged(reference["run"])  # each step once, same loss: the log continues
    assert logged(run_dir, "eval_loss") == logged(reference["run"], "eval_loss")
    assert_one_version(run_dir.parent / "store")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["adapted"] == reference["summary"]["metrics"]["adapted"]
    assert summary["samples_seen"] == reference["summary"]["samples_seen"]


@pytest.fixture(scope="module")
def reference(tiny_bert_dir, tmp_path_factory) -> dict:
    """The uninterrupted run (its best validation loss is its last step's: the final adapter is the
    last step's weights, so every step's dropout masks shape it)."""
    work = tmp_path_factory.mktemp("reference")
    raw = run_config(tiny_bert_dir, work / "run", work / "store")
    train_fresh(raw)
    evals = logged(work / "run", "eval_loss")
    assert min(evals, key=lambda e: e[1])[0] == STEPS, evals
    return {
        "run": work / "run",
        "store": work / "store",
        "raw": raw,
        "summary": json.loads((work / "run" / "summary.json").read_text()),
    }


def kill_between_micro_batches(step: int):
    """on_model_ready hook: dies in the second micro-batch of optimizer step `step` (its first one is
    already back-propagated), counting training forwards only."""

    def ready(model):
        calls = itertools.count(1)

        def hook(module, args, kwargs):
            if module.training and next(calls) == 2 * step:
                raise Killed(f"between the micro-batches of step {step}")

        model.register_forward_pre_hook(hook, with_kwargs=True)

    return ready


def arm(point: str, monkeypatch) -> dict:
    """Patch the code so that the run dies at `point`; returns train()'s extra arguments."""
    import adapters.store.store as store_module
    import adapters.training.checkpoint as checkpoint
    import adapters.training.finalize as finalize_module
    import adapters.training.loop as loop

    if point == "mid-step":
        return {"on_model_ready": kill_between_micro_batches(SAVE_EVERY * 3 + 2)}
    if point == "mid-checkpoint-write":
        real_seal = checkpoint._seal

        def seal(tmp, folder):
            if folder.name == f"step-{SAVE_EVERY * 3}":  # every file written, one half on disk, no manifest
                optimizer = tmp / "optimizer.pt"
                optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
                raise Killed("while writing a checkpoint")
            real_seal(tmp, folder)

        monkeypatch.setattr(checkpoint, "_seal", seal)
    elif point == "after-last-step":
        monkeypatch.setattr(loop, "finalize", lambda *a, **k: (_ for _ in ()).throw(Killed("before finalize")))
    elif point == "during-adapter-write":
        real_save = finalize_module.save_adapter

        def save_adapter(accelerator, model, method, folder):
            real_save(accelerator, model, method, folder)
            raise Killed("while writing the adapter")

        monkeypatch.setattr(finalize_module, "save_adapter", save_adapter)
    elif point == "during-publish":
        real_place = store_module._place_version

        def place_version(staged, final):  # the version is in place, its tags not yet written
            real_place(staged, final)
            raise Killed("while publishing")

        monkeypatch.setattr(store_module, "_place_version", place_version)
    return {}


@pytest.mark.parametrize(
    "point", ["mid-step", "mid-checkpoint-write", "after-last-step", "during-adapter-write", "during-publish"]
)
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_adapter(
    point, reference, tiny_bert_dir, tmp_path, monkeypatch
):
    raw = run_config(tiny_bert_dir, tmp_path / "run", tmp_path / "store")
    with monkeypatch.context() as patched:
        extra = arm(point, patched)
        with pytest.raises(Killed):
            train_fresh(raw, **extra)
    assert not (tmp_path / "run" / "summary.json").exists()
    train_fresh(raw, resume=True)
    assert_resumed_like(tmp_path / "run", reference)
    checkpoints = {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert checkpoints == {f"step-{s}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)}  # no leftovers


def test_resuming_a_finished_run_neither_trains_nor_publishes_again(reference, tiny_bert_dir, tmp_path, capsys):
    shutil.copytree(reference["run"], tmp_path / "run")  # moved since: the run is where its folder is now
    shutil.copytree(reference["store"], tmp_path / "store")
    published = tmp_path / "run" / "published.json"
    published.write_text(json.dumps({**json.loads(published.read_text()), "store": str(tmp_path / "store")}))
    raw = run_config(tiny_bert_dir, tmp_path / "run", tmp_path / "store")
    log_before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    result = train_fresh(raw, resume=True)
    assert "holds a finished run" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == log_before
    assert result.adapter_ref == "resumed@1" and result.steps == STEPS
    assert result.adapter_dir == tmp_path / "run" / "adapter" and result.metrics == reference["summary"]["metrics"]
    assert AdapterStore(tmp_path / "store").versions("resumed") == [1]

    # With a changed config (3 more steps) the run continues from its last checkpoint as a new run.
    raw["train"]["max_steps"] = STEPS + 3
    result = train_fresh(raw, resume=True)
    assert result.steps == STEPS + 3 and result.adapter_ref == "resumed@2"
    assert [step for step, _ in logged(tmp_path / "run")] == list(range(1, STEPS + 4))


def test_a_resumed_run_keeps_the_best_weights_it_had_before_the_interruption(tiny_bert_dir, tmp_path):
    """Early stopping on accuracy (it peaks at the first evaluation): the final adapter is step 3's
    weights, which a run resumed from step 9 knows only from its checkpoint."""
    watch = {"early_stopping": {"metric": "eval_accuracy", "mode": "max", "patience": 10}}
    uninterrupted = run_config(tiny_bert_dir, tmp_path / "full", tmp_path / "full-store", **watch)
    train_fresh(uninterrupted)
    accuracy = logged(tmp_path / "full", "eval_accuracy")
    best = max(accuracy, key=lambda e: (e[1], -e[0]))[0]
    assert best <= SAVE_EVERY * 2, f"the best step must come before the resumed checkpoint: {accuracy}"

    raw = run_config(tiny_bert_dir, tmp_path / "run", tmp_path / "store", **watch)
    with pytest.raises(Killed):
        train_fresh(raw, on_model_ready=kill_between_micro_batches(SAVE_EVERY * 3 + 2))
    train_fresh(raw, resume=True)
    assert_same_adapter(tmp_path / "run", tmp_path / "full")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["validation"]["eval_accuracy"] == dict(accuracy)[best]


# ---------------------------------------------------------------- damaged checkpoints
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_one_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x10  # inside the last tensor's data: safetensors would load it silently
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": ("trainable.safetensors", _truncate),
    "truncated optimizer state": ("optimizer.pt", _truncate),
    "broken state JSON": ("trainer_state.json", lambda p: p.write_text(p.read_text()[:-20] + "}{")),
    "one flipped bit": ("trainable.safetensors", _flip_one_bit),
}


@pytest.fixture(scope="module")
def interrupted(tiny_bert_dir, tmp_path_factory) -> Path:
    """A run ended by stop_after at step 9 (checkpoints at 3, 6 and 9), unfinished and unpublished."""
    work = tmp_path_factory.mktemp("interrupted")
    train_fresh(run_config(tiny_bert_dir, work / "run", work / "store"), stop_after=SAVE_EVERY * 3)
    assert json.loads((work / "run" / "summary.json").read_text())["finished"] is False
    assert not (work / "store" / "resumed").exists(), "an interrupted run must not publish"
    return work / "run"


def _copy_run(interrupted: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    return run


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_named_and_skipped_for_the_previous_one(
    damage, interrupted, reference, tiny_bert_dir, tmp_path, capsys
):
    run = _copy_run(interrupted, tmp_path)
    name, spoil = DAMAGE[damage]
    spoil(run / "checkpoints" / f"step-{SAVE_EVERY * 3}" / name)
    capsys.readouterr()
    train_fresh(run_config(tiny_bert_dir, run, tmp_path / "store"), resume=True)
    out = capsys.readouterr().out.splitlines()
    notes = [line for line in out if "is damaged" in line]
    assert len(notes) == 1 and f"step-{SAVE_EVERY * 3}" in notes[0] and name in notes[0], out
    assert any(f"resumed from {run / 'checkpoints' / f'step-{SAVE_EVERY * 2}'}" in line for line in out), out
    assert_resumed_like(run, reference)


def test_resume_picks_only_complete_checkpoints_and_says_which_it_skipped(interrupted, tmp_path):
    from adapters.training.checkpoint import checkpoint_problems, resume_point

    run = _copy_run(interrupted, tmp_path)
    root = run / "checkpoints"
    assert resume_point(run) == (root / "step-9", [])
    shutil.copytree(root / "step-9", root / "step-12.tmp")  # a write that died before its rename
    (root / "step-10").mkdir()  # a folder without a manifest (written before checksums, or by hand)
    (root / "notes").mkdir()
    (root / "step-9" / "manifest.json").write_text("{")  # the manifest itself damaged
    found, notes = resume_point(run)
    assert found == root / "step-6"
    assert len(notes) == 2, notes
    assert notes[0] == (
        "checkpoint step-10 is damaged (no manifest.json (written incompletely, or before "
        "checkpoints were checksummed)); skipping it"
    )
    assert notes[1].startswith("checkpoint step-9 is damaged (unreadable manifest.json (") and "\n" not in notes[1]
    assert not (root / "step-12.tmp").exists(), "leftovers of interrupted writes are removed"
    (root / "step-6" / "rng-0.safetensors").unlink()
    assert checkpoint_problems(root / "step-6") == ["rng-0.safetensors: missing"]


def test_a_damaged_checkpoint_given_explicitly_is_an_error_and_none_intact_starts_over(
    interrupted, reference, tiny_bert_dir, tmp_path, capsys
):
    from adapters.training.checkpoint import CheckpointError

    run = _copy_run(interrupted, tmp_path)
    raw = run_config(tiny_bert_dir, run, tmp_path / "store")
    for step in (3, 6, 9):
        _flip_one_bit(run / "checkpoints" / f"step-{step}" / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"step-9: the checkpoint is damaged \(optimizer.pt: checksum mismatch\)"):
        train_fresh(raw, resume=run / "checkpoints" / "step-9")
    capsys.readouterr()
    train_fresh(raw, resume=True)
    out = capsys.readouterr().out
    assert out.count("is damaged") == 3 and "no intact checkpoint" in out and "starting over" in out
    assert_same_adapter(run, reference["run"])  # started over: the same run again
    assert_one_version(tmp_path / "store")


# ---------------------------------------------------------------- a real kill
def test_sigkill_during_training_then_resume_through_the_train_script(reference, tiny_bert_dir, tmp_path):
    raw = run_config(tiny_bert_dir, tmp_path / "run", tmp_path / "store")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "scripts/train.py", "--config", str(config)]
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    first = tmp_path / "run" / "checkpoints" / f"step-{SAVE_EVERY}" / "manifest.json"
    try:
        deadline = time.time() + 240
        while not first.exists():
            assert proc.poll() is None, errors.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "summary.json").exists(), "the run finished before it was killed"
    done = subprocess.run([*command, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    assert_resumed_like(tmp_path / "run", reference)
