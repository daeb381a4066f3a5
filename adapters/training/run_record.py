"""What a run folder records about its run, so that resuming never repeats finished work: the run's
identity (``run.json``: its id and the fingerprint of the config it trains), whether it finished
(``summary.json``, written last) and where its adapter was published (``published.json``).

A resumed run with the same config keeps the identity of the run it continues; the store then
recognises a second publish of the same run and returns the first version (AdapterStore.publish's
run_id), which covers a kill between the store's rename and ``published.json``. A resume with a
changed config (say, more steps) continues from the checkpoint as a new run: it trains, and
publishes a new version.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate.utils import broadcast_object_list

from adapters.config import RunConfig, dump_config
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


def config_fingerprint(cfg: RunConfig) -> str:
    """sha256 hex of the config without its output section: everything that shapes the trained
    adapter and its metrics (where it is written and published does not)."""
    raw = dump_config(cfg)
    raw.pop("output", None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def run_identity(cfg: RunConfig, run_dir: Path, accelerator, resume: bool | str | Path) -> str:
    """The run's id (32 hex digits), the same on every process: when resuming with the config of the
    run in ``run.json``, that run's id (a run killed before anything else was written included);
    otherwise a new one, recorded in ``run.json``."""
    chosen: list[Any] = [None]
    if accelerator.is_main_process:
        path, fingerprint = Path(run_dir) / RUN_FILE, config_fingerprint(cfg)
        known = read_json(path) if resume else {}
        same = known.get("config") == fingerprint and known.get("run_id")
        if resume and known and not same:
            accelerator.print(
                "--resume: the config differs from the one this run started with; "
                "it continues from the checkpoint as a new run (and publishes as one)"
            )
        chosen = [known["run_id"] if same else uuid.uuid4().hex]
        if not same:
            write_json_atomic(path, {"run_id": chosen[0], "config": fingerprint})
    return broadcast_object_list(chosen)[0]


def finished_summary(cfg: RunConfig) -> dict[str, Any] | None:
    """summary.json of the run in output.run_dir if that run finished with this config (its loop ended
    on its own, not by stop_after; its adapter is written) and, when output.publish asks for it, was
    published to output.store; None otherwise (a summary of an earlier run there included)."""
    if not cfg.output.run_dir:
        return None
    run_dir = Path(cfg.output.run_dir)
    summary, record = read_json(run_dir / SUMMARY_FILE), read_json(run_dir / RUN_FILE)
    run_id = record.get("run_id")
    if not (summary.get("finished") and run_id and summary.get("run_id") == run_id):
        return None
    if record.get("config") != config_fingerprint(cfg) or not (run_dir / "adapter" / MANIFEST).is_file():
        return None
    if cfg.output.publish and published_ref(run_dir, run_id, AdapterStore(cfg.output.store)) is None:
        return None
    return summary


def published_ref(run_dir: Path, run_id: str | None, store: AdapterStore) -> str | None:
    """The ``name@version`` that run `run_id` published to `store`, per ``published.json``, or None."""
    record = read_json(Path(run_dir) / PUBLISHED_FILE)
    if record.get("run_id") == run_id and record.get("store") == str(store.root) and record.get("ref"):
        return str(record["ref"])
    return None


def publish_once(run: TrainingRun, adapter_dir: Path) -> str:
    """Publish the run's adapter to output.store as output.name unless this run did already; returns
    the ``name@version``. Main process only. Raises StoreError when the store refuses the adapter."""
    store = AdapterStore(run.cfg.output.store)
    known = published_ref(run.run_dir, run.run_id, store)
    if known is not None:
        return known
    ref = str(store.publish(adapter_dir, run.cfg.output.name, parent=run.parent, run_id=run.run_id))
    write_json_atomic(run.run_dir / PUBLISHED_FILE, {"run_id": run.run_id, "store": str(store.root), "ref": ref})
    return ref
