"""Resumable checkpoints that hold only what training changes (adapter weights, optimizer, schedule).

The frozen base is never written: a SmolLM2 checkpoint is a few MB instead of 540 MB.
Written atomically (temp folder + rename), read back without unpickling (safetensors and
torch.load(weights_only=True)).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters.distributed import gathered

STATE_FILE = "trainer_state.json"


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


def save_checkpoint(folder: Path, accelerator, model, optimizer, scheduler, state: dict) -> None:
    """Write a resumable checkpoint into `folder`: trainable weights, optimizer, schedule, torch RNG
    and the JSON trainer `state` (step, epoch, early stopping). Every process must call it."""
    folder = Path(folder)
    if accelerator.distributed_type.value == "DEEPSPEED":
        # DeepSpeed shards optimizer state across ranks: only its own checkpointing can save it.
        # The frozen base stays out of it here too (it is reloaded from the model, not the checkpoint).
        accelerator.save_state(str(folder), exclude_frozen_parameters=True)
        if accelerator.is_main_process:
            (folder / STATE_FILE).write_text(json.dumps(state))
        accelerator.wait_for_everyone()
        return
    if accelerator.is_main_process:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state_dict(accelerator.unwrap_model(model)), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "python_rng": random.getstate()[1][:1]}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()


def read_checkpoint_state(folder: Path) -> dict:
    """Step, epoch and early-stopping state of a checkpoint, without loading any tensors."""
    return json.loads((Path(folder) / STATE_FILE).read_text())


def load_checkpoint(folder: Path, accelerator, model, optimizer, scheduler) -> dict:
    """Load a checkpoint written by save_checkpoint into model/optimizer/scheduler (and the torch
    RNG); returns its trainer state."""
    folder = Path(folder)
    state = read_checkpoint_state(folder)
    if accelerator.distributed_type.value == "DEEPSPEED":
        accelerator.load_state(str(folder), load_module_strict=False)  # frozen weights are not in it
        return state
    load_trainable_state_dict(accelerator.unwrap_model(model), load_file(str(folder / "trainable.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    torch.set_rng_state(torch.load(folder / "rng.pt", weights_only=True)["torch"])
    return state


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step under <run_dir>/checkpoints, or None."""
    ckpts = sorted(
        (p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return ckpts[-1] if ckpts else None
