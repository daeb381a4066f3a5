"""Optional MLflow tracking of training runs, offline by default.

MLflow is an optional extra (``pip install 'adapterkit[mlflow]'``); nothing else in the
package imports it. The default store is a file store inside the run folder
(``<run_dir>/mlruns``), so tracking works without a server or network; set
``MLFLOW_TRACKING_URI`` (or pass ``tracking_uri``, e.g. ``sqlite:///mlflow.db`` or a
server URL) to send runs elsewhere. Browse with ``mlflow ui --backend-store-uri <run_dir>/mlruns``.

Two ways in:
- ``log_run_folder(run_dir)`` after training: imports what the run folder already holds
  (config.yaml -> params, metrics.jsonl -> metric history, summary.json -> final metrics,
  run_info.json -> tags, small JSON/YAML files -> artifacts). No change to the loop needed.
- ``MlflowTracker`` for logging live from code (params, metrics per step, artifacts).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapters.errors import ConfigError

INSTALL_HINT = "pip install 'adapterkit[mlflow]'  (or: pip install mlflow)"
# MLflow's limits (mlflow.utils.validation): key length, param value length, batch sizes.
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_TAGS_PER_BATCH = 100
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")
RUN_FILES = ("config.yaml", "run_info.json", "summary.json", "data_report.json", "adapter/manifest.json")


def require_mlflow():
    """The mlflow module, or a ConfigError saying how to install it."""
    try:  # mlflow is an optional extra: imported only here and in MlflowTracker, once asked for
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"MLflow tracking needs the optional package mlflow, which is not installed ({err}); "
            f"install it with: {INSTALL_HINT} - or train without MLflow (TensorBoard events and "
            "metrics.jsonl are always written to the run folder)"
        ) from None
    return mlflow


def sanitize_key(key: str) -> str:
    """A metric/param key MLflow accepts: letters, digits, _ - . space /; at most 250 chars."""
    key = _KEY_BAD.sub("_", str(key)).strip("/") or "_"
    return key[:MAX_KEY]


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "0.0002", ...}: dotted keys, string values (lists as JSON),
    values cut to MLflow's 6000-character limit."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, f"{name}."))
            continue
        if isinstance(value, Mapping):
            text = "{}"
        elif isinstance(value, (list, tuple)):
            text = json.dumps(list(value), default=str)
        else:
            text = str(value)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - 3] + "..."
        out[sanitize_key(name)] = text
    return out


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics -> {"test.accuracy": 0.9, ...}: finite numbers only (lists, strings,
    None, NaN and booleans are not metrics)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[sanitize_key(name)] = float(value)
    return out


def default_tracking_uri(run_dir: str | os.PathLike) -> str:
    """$MLFLOW_TRACKING_URI, else a file store in the run folder (offline)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir).resolve() / "mlruns").as_uri()


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class MlflowTracker:
    """One MLflow run, through ``MlflowClient`` (no global active-run state, safe in servers)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        experiment: str = "adapterkit",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ):
        require_mlflow()
        from mlflow.tracking import MlflowClient  # optional extra, present once require_mlflow() passed

        self.run_dir = Path(run_dir)
        self.tracking_uri = tracking_uri or default_tracking_uri(self.run_dir)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            kwargs = {}
            if self.tracking_uri.startswith("sqlite:"):
                # A database store would put artifacts under ./mlruns of whatever the cwd is.
                kwargs["artifact_location"] = (self.run_dir.resolve() / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(experiment, **kwargs)
        run = self.client.create_run(
            experiment_id, run_name=run_name or self.run_dir.name, tags={k: str(v) for k, v in (tags or {}).items()}
        )
        self.run_id = run.info.run_id
        self.experiment_id = experiment_id
        self._finished = False

    def log_params(self, config: Mapping[str, Any]) -> None:
        """Log a nested config as flattened params (flatten_params), in MLflow-sized batches."""
        from mlflow.entities import Param  # optional extra (see __init__)

        params = [Param(k, v) for k, v in flatten_params(config).items()]
        for chunk in _chunks(params, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, timestamp: float | None = None) -> None:
        """Log nested metrics (flatten_metrics) at `step`; timestamp in Unix seconds (default now)."""
        from mlflow.entities import Metric  # optional extra (see __init__)

        ts = int((timestamp if timestamp is not None else time.time()) * 1000)
        rows = [Metric(k, v, ts, step or 0) for k, v in flatten_metrics(metrics).items()]
        for chunk in _chunks(rows, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (None values skipped, values cut to MLflow's limit)."""
        from mlflow.entities import RunTag  # optional extra (see __init__)

        rows = [RunTag(sanitize_key(k), str(v)[:MAX_PARAM_VALUE]) for k, v in tags.items() if v is not None]
        for chunk in _chunks(rows, MAX_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file into the run's artifacts (under `artifact_path`)."""
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED, FAILED, KILLED); idempotent."""
        if not self._finished:
            self.client.set_terminated(self.run_id, status=status)
            self._finished = True

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FAILED" if exc_type is not None else "FINISHED")


@dataclass
class RunRecord:
    """What a finished run folder says about itself, in MLflow's terms."""

    params: dict[str, str]
    history: list[tuple[int, float, dict[str, float]]]  # (step, time, metrics)
    final_metrics: dict[str, float]
    tags: dict[str, str]
    artifacts: list[Path] = field(default_factory=list)


def collect_run(run_dir: str | os.PathLike) -> RunRecord:
    """Read a run folder written by adapters.training.loop.train (no MLflow needed).

    Raises ConfigError if the folder has no config.yaml.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder: it has no config.yaml")
    params = flatten_params(yaml.safe_load(config_path.read_text()) or {})

    history = []
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            values = flatten_metrics({k: v for k, v in row.items() if k not in ("step", "time", "event")})
            if values:
                history.append((int(row.get("step", 0)), float(row.get("time", 0.0)), values))

    final: dict[str, float] = {}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        final = flatten_metrics(summary.get("metrics") or {})
        for key in ("steps", "train_seconds", "tokens_per_second", "trainable_params", "total_params"):
            if isinstance(summary.get(key), (int, float)):
                final[key] = float(summary[key])

    tags: dict[str, str] = {}
    info_path = run_dir / "run_info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        keys = ("device", "num_processes", "distributed_type", "mixed_precision", "python", "platform", "code_revision")
        for key in keys:
            if info.get(key) is not None:
                tags[key] = str(info[key])
        if info.get("code_revision"):
            tags["mlflow.source.git.commit"] = str(info["code_revision"])
        if info.get("command"):
            tags["command"] = " ".join(map(str, info["command"]))
        for lib, version in (info.get("versions") or {}).items():
            if version:
                tags[f"version.{lib}"] = str(version)
    artifacts = [run_dir / rel for rel in RUN_FILES if (run_dir / rel).is_file()]
    return RunRecord(params, history, final, tags, artifacts)


def log_run_folder(
    run_dir: str | os.PathLike,
    experiment: str = "adapterkit",
    tracking_uri: str | None = None,
    run_name: str | None = None,
) -> str:
    """Log a finished run folder as one MLflow run; returns the MLflow run id.

    Raises ConfigError for a folder that is not a run folder, or when mlflow is not installed.
    """
    record = collect_run(run_dir)  # read (and fail on a bad folder) before touching MLflow
    with MlflowTracker(run_dir, experiment, run_name, tracking_uri, tags=record.tags) as tracker:
        tracker.log_params(record.params)
        for step, ts, values in record.history:
            tracker.log_metrics(values, step=step, timestamp=ts or None)
        if record.final_metrics:
            tracker.log_metrics(record.final_metrics, step=max((s for s, _, _ in record.history), default=0))
        for path in record.artifacts:
            tracker.log_artifact(path, "run" if path.parent == Path(run_dir) else f"run/{path.parent.name}")
        return tracker.run_id
