"""Opt-in record of the training rows each process saw: set ADAPTERKIT_BATCH_TRACE=<folder>.

A distributed run must shard its data: every rank trains on rows of its own, and together the
ranks cover what one process with the same global batch would. With the variable set, each rank
appends one JSON line per micro-batch to <folder>/rank-<N>.jsonl: the optimizer step the batch
counts towards and a short hash of each row's tokens (padding dropped, so the hash does not
depend on how the row was padded). Off by default: nothing is computed or written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ENV_VAR = "ADAPTERKIT_BATCH_TRACE"


def row_key(input_ids, attention_mask) -> str:
    """16-hex-digit SHA-1 of one row's real tokens (input_ids and attention_mask of shape (seq,))."""
    tokens = [int(t) for t, m in zip(input_ids.tolist(), attention_mask.tolist()) if m]
    return hashlib.sha1(json.dumps(tokens).encode()).hexdigest()[:16]


class BatchTrace:
    """Appends each micro-batch's row keys to <folder>/rank-<rank>.jsonl (see the module doc)."""

    def __init__(self, folder: str | Path, rank: int):
        self.path = Path(folder) / f"rank-{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls, rank: int) -> BatchTrace | None:
        """A trace into $ADAPTERKIT_BATCH_TRACE, or None when the variable is unset."""
        folder = os.environ.get(ENV_VAR)
        return cls(folder, rank) if folder else None

    def record(self, step: int, batch: dict) -> None:
        """One line for a micro-batch (input_ids/attention_mask of shape (batch, seq)) that counts
        towards optimizer step `step`."""
        rows = [row_key(ids, mask) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, "rows": rows}) + "\n")


def read_trace(folder: str | Path) -> dict[int, list[dict]]:
    """{rank: [{"step", "rows"}, ...]} for every rank file in `folder`."""
    out = {}
    for path in sorted(Path(folder).glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        out[rank] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out
