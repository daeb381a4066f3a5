"""Optional MLflow tracking: the no-mlflow message, key/value flattening, reading a run folder,
and the calls made to MLflow's client (checked against a recording stand-in that enforces
MLflow's batch limits, so these tests need no mlflow install)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import yaml

from adapters.errors import ConfigError
from adapters.training import tracking
from adapters.training.tracking import (
    collect_run,
    flatten_metrics,
    flatten_params,
    log_run_folder,
    require_mlflow,
    sanitize_key,
)


def test_missing_mlflow_gives_install_instructions(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError, installed or not
    with pytest.raises(ConfigError, match=r"adapterkit\[mlflow\]") as err:
        require_mlflow()
    assert "metrics.jsonl" in str(err.value)
    _write_run(tmp_path)
    with pytest.raises(ConfigError, match="optional package mlflow"):
        log_run_folder(tmp_path)


def test_flatten_params():
    cfg = {
        "train": {"lr": 2e-4, "early_stopping": None, "tags": ["a", "b"]},
        "method": {"name": "lora", "options": {}},
        "data": {"label_names": {"LOC": "location"}},
        "note": "x" * 7000,
        "weird key!": 1,
    }
    flat = flatten_params(cfg)
    assert flat["train.lr"] == "0.0002" and flat["train.early_stopping"] == "None"
    assert flat["train.tags"] == '["a", "b"]' and flat["method.options"] == "{}"
    assert flat["data.label_names.LOC"] == "location"
    assert len(flat["note"]) == 6000 and flat["note"].endswith("...")
    assert flat["weird key_"] == "1"


def test_flatten_metrics_keeps_finite_numbers_only():
    metrics = {
        "test": {"accuracy": 0.9, "f1": 1, "examples": [{"a": 1}], "nan": float("nan"), "ok": True},
        "base": None,
        "loss": 0.5,
        "name": "x",
    }
    assert flatten_metrics(metrics) == {"test.accuracy": 0.9, "test.f1": 1.0, "loss": 0.5}
    assert sanitize_key("eval/acc@1 (top)") == "eval/acc_1 _top_"
    assert len(sanitize_key("k" * 400)) == 250


def _write_run(run_dir):
    (run_dir / "adapter").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"task": "sequence-classification", "train": {"lr": 0.001, "seed": 3}})
    )
    (run_dir / "run_info.json").write_text(
        json.dumps(
            {
                "command": ["scripts/train.py", "--config", "c.yaml"],
                "device": "cpu",
                "num_processes": 1,
                "code_revision": "abc123",
                "versions": {"torch": "2.13.0", "peft": "0.21.2"},
            }
        )
    )
    rows = [{"step": 0, "time": 1.0, "event": "param_groups", "groups": [{"lr": 0.1}]}]
    rows += [{"step": s, "time": 1.0 + s, "loss": 1.0 / s, "lr": 0.001} for s in range(1, 151)]
    rows += [{"step": 150, "time": 200.0, "eval_loss": 0.2, "eval_accuracy": 0.8}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "steps": 150,
                "train_seconds": 12.5,
                "metrics": {"adapted": {"accuracy": 0.8, "examples": []}, "base": None},
            }
        )
    )
    (run_dir / "adapter" / "manifest.json").write_text("{}")


def test_collect_run_reads_a_run_folder(tmp_path):
    _write_run(tmp_path)
    record = collect_run(tmp_path)
    assert record.params == {"task": "sequence-classification", "train.lr": "0.001", "train.seed": "3"}
    assert len(record.history) == 151  # the param_groups event has no scalar metric
    assert record.history[0] == (1, 2.0, {"loss": 1.0, "lr": 0.001})
    assert record.history[-1][2] == {"eval_loss": 0.2, "eval_accuracy": 0.8}
    assert record.final_metrics == {"adapted.accuracy": 0.8, "steps": 150.0, "train_seconds": 12.5}
    assert record.tags["mlflow.source.git.commit"] == "abc123" and record.tags["version.peft"] == "0.21.2"
    assert record.tags["command"] == "scripts/train.py --config c.yaml"
    assert [p.name for p in record.artifacts] == ["config.yaml", "run_info.json", "summary.json", "manifest.json"]
    with pytest.raises(ConfigError, match="no config.yaml"):
        collect_run(tmp_path / "adapter")


class _RecordingClient:
    """Stand-in for mlflow.tracking.MlflowClient that enforces MLflow's per-batch limits."""

    instances: list = []

    def __init__(self, tracking_uri=None):
        self.tracking_uri = tracking_uri
        self.params, self.metrics, self.tags, self.artifacts, self.status = {}, [], {}, [], None
        self.experiments = {}
        _RecordingClient.instances.append(self)

    def get_experiment_by_name(self, name):
        return self.experiments.get(name)

    def create_experiment(self, name, artifact_location=None):
        self.experiments[name] = types.SimpleNamespace(experiment_id="1", artifact_location=artifact_location)
        return "1"

    def create_run(self, experiment_id, run_name=None, tags=None):
        self.run_name, self.tags = run_name, dict(tags or {})
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="run-1"))

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        assert len(metrics) <= 1000 and len(params) <= 100 and len(tags) <= 100
        for p in params:
            assert p.key not in self.params, "MLflow refuses to change a logged param"
            self.params[p.key] = p.value
        self.metrics += list(metrics)
        self.tags.update({t.key: t.value for t in tags})

    def log_artifact(self, run_id, local_path, artifact_path=None):
        self.artifacts.append((local_path, artifact_path))

    def set_terminated(self, run_id, status=None):
        self.status = status


@pytest.fixture()
def fake_mlflow(monkeypatch):
    entities = types.ModuleType("mlflow.entities")
    entities.Param = lambda key, value: types.SimpleNamespace(key=key, value=value)
    entities.Metric = lambda key, value, timestamp, step: types.SimpleNamespace(
        key=key, value=value, timestamp=timestamp, step=step
    )
    entities.RunTag = lambda key, value: types.SimpleNamespace(key=key, value=value)
    client_mod = types.ModuleType("mlflow.tracking")
    client_mod.MlflowClient = _RecordingClient
    root = types.ModuleType("mlflow")
    root.tracking, root.entities = client_mod, entities
    for name, mod in (("mlflow", root), ("mlflow.tracking", client_mod), ("mlflow.entities", entities)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _RecordingClient.instances.clear()
    return _RecordingClient


def test_log_run_folder_calls(tmp_path, fake_mlflow):
    _write_run(tmp_path)
    assert log_run_folder(tmp_path, run_name="r1") == "run-1"
    client = fake_mlflow.instances[0]
    assert client.tracking_uri == (tmp_path.resolve() / "mlruns").as_uri()  # offline file store in the run folder
    assert client.run_name == "r1" and client.status == "FINISHED"
    assert client.params["train.lr"] == "0.001"
    losses = [(m.step, m.value) for m in client.metrics if m.key == "loss"]
    assert losses[0] == (1, 1.0) and len(losses) == 150
    assert [m.timestamp for m in client.metrics if m.key == "loss"][:2] == [2000, 3000]  # ms
    final = {m.key: (m.step, m.value) for m in client.metrics if m.key in ("adapted.accuracy", "steps")}
    assert final == {"adapted.accuracy": (150, 0.8), "steps": (150, 150.0)}
    assert client.tags["device"] == "cpu"
    assert client.artifacts[-1][1] == "run/adapter" and client.artifacts[0][1] == "run"


def test_tracker_marks_failed_runs_and_batches_params(tmp_path, fake_mlflow, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + str(tmp_path / "m.db"))
    with pytest.raises(RuntimeError):
        with tracking.MlflowTracker(tmp_path, experiment="exp") as tracker:
            tracker.log_params({f"p{i}": i for i in range(250)})  # three batches
            tracker.log_metrics({"a": {"b": 1.5}}, step=7)
            raise RuntimeError("training crashed")
    client = fake_mlflow.instances[0]
    assert client.tracking_uri.startswith("sqlite:///") and client.status == "FAILED"
    assert len(client.params) == 250 and client.metrics[0].key == "a.b" and client.metrics[0].step == 7
    assert client.experiments["exp"].artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
