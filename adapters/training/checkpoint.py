"""Resumable checkpoints: everything the next optimizer step depends on, written so that a crash never
leaves a checkpoint that looks complete and is not.

``<run_dir>/checkpoints/step-N/`` holds

- ``trainable.safetensors``: the trainable weights. The frozen base is never written (a SmolLM2
  checkpoint is a few MB instead of 540 MB).
- ``best.safetensors``: early stopping's best weights so far, unless they are the current ones.
- ``optimizer.pt``, ``scheduler.pt``: their state dicts (tensors and numbers only).
- ``rng-<rank>.safetensors``: each process's Python, NumPy, torch CPU (and CUDA) random states.
- ``trainer_state.json``: counters, early stopping, the data position (epoch, micro-batches done,
  the shuffle seed: the order of an epoch is a function of seed + epoch), the metrics.jsonl length.
- ``manifest.json``: the sha256 of every other file, written last.

Under DeepSpeed, accelerate's ``save_state`` writes the weights, optimizer and schedule instead (its
optimizer state is sharded across ranks). A checkpoint is assembled in ``step-N.tmp`` (every file
fsynced, the manifest last) and renamed into place. Resuming considers only folders named
``step-<digits>`` that have a manifest, verifies their checksums before anything loads, and skips a
damaged one for the newest intact one (``resume_point``). Reads never unpickle: safetensors and
``torch.load(weights_only=True)`` -- except DeepSpeed's own loader, which unpickles its files
(``torch.load(weights_only=False)``: a crafted checkpoint runs code). Resuming under DeepSpeed is
therefore refused unless the user says the checkpoint is trusted (``train.resume_trust_pickle`` /
``--trust-checkpoint``; ``check_resume_trust``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from adapters.constants import MANIFEST
from adapters.distributed import gathered
from adapters.errors import AdapterkitError
from adapters.paths import fsync_dir
from adapters.store.fingerprint import sha256_file
from adapters.store.manifest import file_checksums, safe_relative, write_json_atomic

if TYPE_CHECKING:  # setup imports this module: a run-time import would be circular
    from adapters.training.setup import TrainingRun
    from adapters.training.state import EarlyStopping, TrainState

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
BEST_FILE = "best.safetensors"
FORMAT = "adapterkit.checkpoint/1"
_STEP_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(AdapterkitError):
    """A checkpoint that cannot be resumed from (damaged, incomplete, or not written for this run)."""


@dataclass
class Checkpoint:
    """What a loaded checkpoint hands to the loop besides the weights already copied in: the trainer
    state (trainer_state.json), the best weights ({name: CPU tensor} or None) and this process's
    random states (rng_state's dict, or None when the checkpoint has none for this rank)."""

    state: dict[str, Any]
    best_state: dict[str, torch.Tensor] | None
    rng: dict[str, Any] | None


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """{name: CPU copy} of the trainable weights. Under ZeRO-3 every rank must call it (a gather)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered([p for _, p in trainable]):
        return {n: p.detach().cpu().clone().contiguous() for n, p in trainable}


def load_trainable_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Copy weights in by name (cast to each parameter's device and dtype). Under ZeRO-3 every rank
    must call it (gather, write, re-shard). Raises KeyError for names the model lacks."""
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise KeyError(f"checkpoint has parameters the model lacks: {missing[:5]}")
    with gathered([params[n] for n in state], modifier_rank=0), torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


# ---------------------------------------------------------------- random states
def rng_state() -> dict[str, Any]:
    """This process's random states: {"tensors": {name: tensor}, "metadata": {name: JSON string}}.

    Python's Mersenne Twister (625 state words + the cached Gaussian), NumPy's legacy global generator
    (624 words, position, cached Gaussian), torch's CPU generator and each CUDA device's generator.
    """
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "python": torch.tensor(words, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    metadata = {"python": json.dumps([version, gauss]), "numpy": json.dumps([kind, int(pos), int(has_gauss), cached])}
    return {"tensors": tensors, "metadata": metadata}


def set_rng_state(saved: dict[str, Any]) -> None:
    """Put back the random states rng_state returned (CUDA only where this process has CUDA devices)."""
    tensors, metadata = saved["tensors"], saved["metadata"]
    version, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(int(w) for w in tensors["python"].tolist()), gauss))
    kind, pos, has_gauss, cached = json.loads(metadata["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def restored_on_start(batches: Iterable, rng: dict[str, Any] | None) -> Iterator:
    """`batches`, with the random states `rng` put back once their iterator has started.

    Starting a DataLoader iterator draws a seed from torch's global generator; the uninterrupted run
    drew it at the start of the epoch, before the checkpoint, so a resumed run restores the states
    only after its own (skipping) iterator has drawn. Fetching batches draws nothing (the samplers
    use their own seeded generators), so the states then line up exactly.
    """
    iterator = iter(batches)
    if rng is None:
        yield from iterator
        return
    try:
        first = next(iterator)
    except StopIteration:  # the checkpoint was taken at the epoch's last batch
        set_rng_state(rng)
        return
    set_rng_state(rng)
    yield first
    yield from iterator


def _read_rng(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return {"tensors": {k: f.get_tensor(k) for k in f.keys()}, "metadata": f.metadata()}


# ---------------------------------------------------------------- writing
def save_run_checkpoint(run: TrainingRun, state: TrainState, stopper: EarlyStopping) -> Path:
    """Write ``<run_dir>/checkpoints/step-<state.step>`` for `run` (see the module doc); returns it.

    Every process must call it, at an optimizer-step boundary (no gradients pending).
    """
    accelerator = run.accelerator
    trainer = {
        **state.checkpoint_state(stopper),
        "shuffle_seed": run.cfg.train.seed,
        "log_bytes": run.metrics_log.path.stat().st_size if run.metrics_log.path.exists() else 0,
    }
    folder = run.run_dir / CHECKPOINTS / f"step-{state.step}"
    save_checkpoint(
        folder,
        accelerator,
        run.model,
        run.optimizer,
        run.scheduler,
        trainer,
        stopper.best_state,
        best_is_current=stopper.best_step == state.step,
    )
    return folder


def save_checkpoint(
    folder: Path,
    accelerator,
    model,
    optimizer,
    scheduler,
    trainer: dict[str, Any],
    best_state: dict[str, torch.Tensor] | None = None,
    best_is_current: bool = False,
) -> None:
    """Write a checkpoint into `folder` atomically: assembled in ``<folder>.tmp``, checksummed, renamed.

    trainer: the JSON trainer state; best_state: early stopping's best weights ({name: tensor}) or None;
    best_is_current: they are the current trainable weights (then only referenced, not written twice).
    Every process must call it (each writes its own random states; DeepSpeed saves collectively).
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    state = rng_state()
    save_file(state["tensors"], str(tmp / f"rng-{accelerator.process_index}.safetensors"), metadata=state["metadata"])
    if deepspeed:
        # DeepSpeed shards optimizer state across ranks: only its own checkpointing can save it.
        # The frozen base stays out of it (it is reloaded from the model, not the checkpoint).
        accelerator.save_state(str(tmp), exclude_frozen_parameters=True)
    elif accelerator.is_main_process:
        save_file(trainable_state_dict(accelerator.unwrap_model(model)), str(tmp / WEIGHTS_FILE))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        best = None
        if best_state is not None:
            best = "current" if best_is_current and not deepspeed else BEST_FILE
            if best == BEST_FILE:
                save_file({k: v.contiguous() for k, v in best_state.items()}, str(tmp / BEST_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({**trainer, "best_weights": best}))
        _seal(tmp, folder)
    accelerator.wait_for_everyone()


def _seal(tmp: Path, folder: Path) -> None:
    """fsync every file of `tmp`, write its manifest last, and rename it to `folder` (replacing an older one)."""
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    step = _STEP_NAME.match(folder.name)
    write_json_atomic(
        tmp / MANIFEST, {"format": FORMAT, "step": int(step.group(1)) if step else None, "files": file_checksums(tmp)}
    )
    replace_folder(tmp, folder)  # folder exists when a step is written again after resuming from an earlier one


def replace_folder(new: Path, folder: Path) -> None:
    """Rename the finished folder `new` to `folder`, replacing what is there, and make the rename durable.

    An existing `folder` is first renamed to ``<folder>.old`` (removed at the end): a crash leaves the
    old folder, the new one, or neither under the name, never a mix of both.
    """
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.rename(folder, old)
    os.replace(new, folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- verifying and choosing
def checkpoint_problems(folder: Path) -> list[str]:
    """What makes `folder` unusable as a checkpoint (empty when intact): no or unreadable manifest,
    listed files missing or with another sha256 than the manifest says, no trainer state."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return [f"no {MANIFEST} (written incompletely, or before checkpoints were checksummed)"]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r} is not {FORMAT!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [f"unreadable {MANIFEST} ({err})"]
    if STATE_FILE not in files:
        return [f"{STATE_FILE} is not listed in {MANIFEST}"]
    problems = []
    for rel, expected in sorted(files.items()):
        target = folder / rel
        if not safe_relative(rel) or not target.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(target) != expected:
            problems.append(f"{rel}: checksum mismatch")
    return problems


def checkpoint_step(folder: Path) -> int | None:
    """N for a folder named step-N, else None (step-N.tmp and other leftovers are not checkpoints)."""
    match = _STEP_NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def resume_point(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint under ``<run_dir>/checkpoints`` (None if there is none) and one
    line per damaged checkpoint skipped on the way. Leftovers of interrupted writes (``*.tmp``,
    ``*.old``) are removed. Call it on one process."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None, []
    for leftover in root.glob("step-*"):
        if leftover.is_dir() and leftover.suffix in (".tmp", ".old"):
            shutil.rmtree(leftover, ignore_errors=True)
    found = sorted(
        (p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None), key=checkpoint_step, reverse=True
    )
    notes = []
    for folder in found:
        problems = checkpoint_problems(folder)
        if not problems:
            return folder, notes
        notes.append(f"checkpoint {folder.name} is damaged ({'; '.join(problems[:3])}); skipping it")
    return None, notes


# ---------------------------------------------------------------- reading
def read_checkpoint_state(folder: Path) -> dict:
    """Step, epoch, early-stopping state and data position of a checkpoint, without loading any tensors."""
    return json.loads((Path(folder) / STATE_FILE).read_text())


def check_resume_trust(trusted: bool, deepspeed: bool | None = None) -> None:
    """Raise CheckpointError when a resume would go through DeepSpeed's loader, which unpickles
    (``torch.load(weights_only=False)`` runs whatever code the files hold), and the user has not said
    the checkpoint is trusted. deepspeed: whether the run uses DeepSpeed (None: what `accelerate
    launch` set up, ACCELERATE_USE_DEEPSPEED)."""
    if deepspeed is None:
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and not trusted:
        raise CheckpointError(
            "--resume: a DeepSpeed checkpoint is loaded by DeepSpeed's loader, which unpickles it (a crafted "
            "checkpoint runs code); resume only checkpoints you wrote, with --trust-checkpoint "
            "(or train.resume_trust_pickle: true)"
        )


def load_checkpoint(folder: Path, accelerator, model, optimizer, scheduler, trust_pickle: bool = False) -> Checkpoint:
    """Load a verified checkpoint written by save_checkpoint into model, optimizer and scheduler.

    Returns its trainer state, best weights and this rank's random states (restore them with
    restored_on_start, at the point the loop resumes). trust_pickle: allow DeepSpeed's unpickling
    loader (check_resume_trust). Raises CheckpointError when the files do not fit this run (e.g.
    written for another method or model), or for an untrusted DeepSpeed checkpoint.
    """
    folder = Path(folder)
    deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
    check_resume_trust(trust_pickle, deepspeed)  # before anything is read
    try:
        state = read_checkpoint_state(folder)
        if deepspeed:
            accelerator.load_state(str(folder), load_module_strict=False)  # frozen weights are not in it
        else:
            load_trainable_state_dict(accelerator.unwrap_model(model), load_file(str(folder / WEIGHTS_FILE)))
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
            scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        best = state.get("best_weights")
        best_state = None
        if best == BEST_FILE:
            best_state = load_file(str(folder / BEST_FILE))
        elif best == "current":
            best_state = load_file(str(folder / WEIGHTS_FILE))
        rng = _read_rng(folder / f"rng-{accelerator.process_index}.safetensors")
    except (KeyError, ValueError, RuntimeError, OSError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint {folder} does not fit this run ({type(err).__name__}: {err})") from err
    return Checkpoint(state, best_state, rng)
