"""Helpers of the side-by-side speed benchmarks (ours vs transformers Trainer / TRL SFTTrainer):
counting the real tokens a Trainer's collator builds, timing Trainer.train, picking the median run,
and running one side in a fresh process. transformers is imported only where a Trainer is timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path


class CountingCollator:
    """Wraps a Trainer's collator; counts the real tokens of every batch it builds: the attention
    mask's ones, or every position of a padding-free batch (no attention mask)."""

    def __init__(self, inner):
        self.inner = inner
        self.real = self.computed = self.batches = self.rows = 0

    def __call__(self, features):
        batch = self.inner(features)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else ids.numel()
        self.computed += ids.numel()
        self.batches += 1
        self.rows += len(features)
        return batch


def train_clock():
    """A transformers TrainerCallback that measures Trainer.train's loop: `.seconds` from
    on_train_begin to on_train_end (wall-clock, CUDA synchronized when available)."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class Clock(TrainerCallback):
        start = seconds = 0.0

        def on_train_begin(self, *args, **kwargs):
            self.start = now()

        def on_train_end(self, *args, **kwargs):
            self.seconds = now() - self.start

    return Clock()


def median_run(runs: list[dict], key: str = "real_tokens_per_second") -> dict:
    """The run with the median `key` (the lower middle one for an even count). Raises ValueError on no runs."""
    if not runs:
        raise ValueError("no runs")
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


def version(name: str) -> str:
    """Installed version of a distribution, or "?"."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def run_in_process(cmd: list[str], result: Path, log: Path, cwd: Path, env=None, timeout: float | None = None) -> dict:
    """Run `cmd` (a worker that writes its result JSON to `result`) in a fresh process; the output
    goes to `log`. Returns the result dict; {"error", "log_tail"} when it fails or times out."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, output = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
    log.write_text(output)
    if code == 0 and result.is_file():
        return json.loads(result.read_text())
    print(output[-3000:], file=sys.stderr)
    return {"error": f"exit {code}", "log": str(log), "log_tail": output[-3000:]}
