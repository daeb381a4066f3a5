"""What a run folder records about its run, so that resuming never repeats finished work: the run's
identity (``run.json``), whether it finished (``summary.json``, written last) and where its adapter
was published (``published.json``).

A resumed run keeps the identity of the run it continues; the store then recognises a second
publish of the same run and returns the first version (AdapterStore.publish's run_id), which
covers a kill between the store's rename and ``published.json``.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate.utils import broadcast_object_list

from adapters.constants import MANIFEST
from adapters.store.manifest import write_json_atomic
from adapters.store.store import AdapterStore

if TYPE_CHECKING:  # setup builds the run; this module only reads it
    from adapters.training.setup import TrainingRun

RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
PUBLISHED_FILE = "published.json"


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def run_identity(run_dir: Path, accelerator, resume: bool | str | Path) -> str:
    """The run's id (32 hex digits), the same on every process: the one in ``run.json`` when resuming
    (a run killed before anything else was written included), a new one otherwise."""
    chosen: list[Any] = [None]
    if accelerator.is_main_process:
        path = Path(run_dir) / RUN_FILE
        known = read_json(path).get("run_id") if resume else None
        chosen = [known or uuid.uuid4().hex]
        if known is None:
            write_json_atomic(path, {"run_id": chosen[0]})
    return broadcast_object_list(chosen)[0]


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json of the run in `run_dir` if that run finished (its loop ended on its own, not by
    stop_after) and wrote its adapter; None otherwise (or for a summary of an earlier run there)."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / SUMMARY_FILE)
    run_id = read_json(run_dir / RUN_FILE).get("run_id")
    if not (summary.get("finished") and run_id and summary.get("run_id") == run_id):
        return None
    return summary if (Path(summary.get("adapter_dir", "")) / MANIFEST).is_file() else None


def publish_once(run: TrainingRun, adapter_dir: Path) -> str:
    """Publish the run's adapter to output.store as output.name unless this run did already; returns
    the ``name@version``. Main process only. Raises StoreError when the store refuses the adapter."""
    store = AdapterStore(run.cfg.output.store)
    record = read_json(run.run_dir / PUBLISHED_FILE)
    if record.get("run_id") == run.run_id and record.get("store") == str(store.root) and record.get("ref"):
        return str(record["ref"])
    ref = str(store.publish(adapter_dir, run.cfg.output.name, parent=run.parent, run_id=run.run_id))
    write_json_atomic(run.run_dir / PUBLISHED_FILE, {"run_id": run.run_id, "store": str(store.root), "ref": ref})
    return ref
