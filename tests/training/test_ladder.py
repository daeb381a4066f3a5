"""The ladder: stage order, warm start from the best stage, stopping when a stage does not improve."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adapters.config import load_config
from adapters.errors import ConfigError
from adapters.training.ladder import (
    LadderConfig,
    LadderStageConfig,
    apply_init_state,
    canonical_name,
    load_ladder_config,
    run_ladder,
    stage_config,
)

REPO = Path(__file__).resolve().parents[2]


def run_cfg(model_dir, run_dir, **train):
    return load_config(
        raw={
            "task": "sequence-classification",
            "model": {"name": str(model_dir)},
            "data": {
                "name": "trec",
                "max_length": 32,
                "max_train_samples": 64,
                "max_eval_samples": 32,
                "max_test_samples": 32,
            },
            "method": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0},
            "train": {
                "lr": 5e-3,
                "batch_size": 8,
                "eval_batch_size": 32,
                "max_steps": 4,
                "log_every": 2,
                "seed": 1,
                **train,
            },
            "output": {"run_dir": str(run_dir), "name": "tiny-ladder"},
        }
    )


class FakeTrain:
    """Stands in for adapters.training.loop.train: returns preset validation losses, saves a head."""

    def __init__(self, tmp_path, losses):
        self.tmp_path, self.losses, self.calls = tmp_path, list(losses), []

    def __call__(self, cfg, on_model_ready=None):
        from safetensors.torch import save_file

        model = torch.nn.Module()
        model.classifier = torch.nn.Linear(2, 2)
        if on_model_ready is not None:
            on_model_ready(model)
        self.calls.append(
            (cfg.method.name, dict(cfg.method.options), cfg.train.lr, model.classifier.weight.detach().clone())
        )
        adapter = Path(cfg.output.run_dir) / "adapter"
        adapter.mkdir(parents=True)
        with torch.no_grad():
            model.classifier.weight.fill_(float(len(self.calls)))  # "training" changes the head
        save_file(
            {"classifier.weight": model.classifier.weight.detach().clone()}, str(adapter / "adapter_model.safetensors")
        )
        loss = self.losses[len(self.calls) - 1]
        return SimpleNamespace(
            run_dir=adapter.parent,
            adapter_dir=adapter,
            trainable_params=6,
            train_seconds=0.1,
            metrics={"validation": {"eval_loss": loss, "eval_accuracy": 1 - loss}, "adapted": {"accuracy": 1 - loss}},
        )


def test_canonical_names_strip_peft_wrappers():
    assert canonical_name("base_model.model.classifier.modules_to_save.default.weight") == "classifier.weight"
    assert (
        canonical_name("base_model.model.bert.encoder.layer.1.attention.self.query.base_layer.weight")
        == "bert.encoder.layer.1.attention.self.query.weight"
    )
    assert canonical_name("bert.encoder.layer.1.output.dense.bias") == "bert.encoder.layer.1.output.dense.bias"


def test_apply_init_state_sets_only_matching_trainable_params():
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(2, 2))
    model.add_module("classifier", torch.nn.Linear(2, 3))
    model.body.weight.requires_grad = False
    state = {"classifier.weight": torch.ones(3, 2), "body.weight": torch.ones(2, 2), "classifier.bias": torch.ones(7)}
    loaded = apply_init_state(model, state)
    assert loaded == ["classifier.weight"]  # frozen body untouched, wrong-shaped bias skipped
    assert torch.equal(model.classifier.weight, torch.ones(3, 2)) and not torch.equal(
        model.body.weight, torch.ones(2, 2)
    )


def test_ladder_runs_every_stage_while_each_improves(tmp_path, tiny_bert_dir):
    fake = FakeTrain(tmp_path, [0.9, 0.7, 0.5])
    result = run_ladder(run_cfg(tiny_bert_dir, tmp_path / "ladder"), LadderConfig(), train_fn=fake)
    assert [c[0] for c in fake.calls] == ["head-only", "partial", "lora"]
    assert fake.calls[1][1] == {"blocks": 2} and fake.calls[2][1]["r"] == 2
    assert [s.improved for s in result.stages] == [True, True, True]
    assert result.best == "chosen" and result.stopped_early is None
    # Each stage starts from the previous best: the head the previous stage saved.
    assert torch.all(fake.calls[1][3] == 1.0) and torch.all(fake.calls[2][3] == 2.0)
    assert [s.warm_started_tensors for s in result.stages] == [0, 1, 1]
    report = json.loads((tmp_path / "ladder" / "ladder_report.json").read_text())
    assert report["best"] == "chosen" and len(report["stages"]) == 3
    md = (tmp_path / "ladder" / "ladder_report.md").read_text()
    assert "| chosen (best) | lora |" in md


def test_ladder_stops_when_a_stage_does_not_beat_the_previous(tmp_path, tiny_bert_dir):
    fake = FakeTrain(tmp_path, [0.6, 0.59, 0.1])
    ladder = LadderConfig(min_delta=0.05)
    result = run_ladder(run_cfg(tiny_bert_dir, tmp_path / "ladder"), ladder, train_fn=fake)
    assert len(fake.calls) == 2  # the chosen method never trained
    assert result.best == "head-only" and [s.improved for s in result.stages] == [True, False]
    assert "did not beat stage 'head-only'" in result.stopped_early and "skipped chosen" in result.stopped_early


def test_ladder_max_mode_and_unknown_metric(tmp_path, tiny_bert_dir):
    fake = FakeTrain(tmp_path, [0.9, 0.5])
    ladder = LadderConfig(
        metric="eval_accuracy",
        mode="max",
        stages=[
            LadderStageConfig(name="head", method="head-only", train={"lr": 1e-2}),
            LadderStageConfig(name="top", method={"name": "partial", "blocks": 1}),
        ],
    )
    result = run_ladder(run_cfg(tiny_bert_dir, tmp_path / "a"), ladder, train_fn=fake)
    assert result.best == "top" and fake.calls[0][2] == 1e-2 and fake.calls[1][2] == 5e-3
    with pytest.raises(ConfigError, match="ladder.metric 'eval_f1'.*eval_accuracy, eval_loss"):
        run_ladder(
            run_cfg(tiny_bert_dir, tmp_path / "b"), LadderConfig(metric="eval_f1"), train_fn=FakeTrain(tmp_path, [0.5])
        )


def test_stage_configs_validate_before_training(tiny_bert_dir, tmp_path):
    cfg = run_cfg(tiny_bert_dir, tmp_path)
    with pytest.raises(ConfigError, match="ladder stage 'x'.*unknown method 'nope'"):
        stage_config(cfg, LadderStageConfig(name="x", method="nope"))
    staged = stage_config(cfg, LadderStageConfig(name="head only!", method="head-only"), tmp_path / "s1")
    assert staged.output.name == "tiny-ladder-head-only" and staged.output.publish is False
    assert staged.output.run_dir == str(tmp_path / "s1")


def test_shipped_ladder_config_loads():
    cfg, ladder = load_ladder_config(REPO / "configs" / "ladder.yaml", ["ladder.min_delta=0.02"])
    assert [s.name for s in ladder.stages] == ["head-only", "partial", "chosen"]
    assert ladder.min_delta == 0.02 and ladder.mode == "max" and cfg.task == "sequence-classification"


def test_ladder_config_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ladder: {patience: 2}\ntask: sequence-classification\n")
    with pytest.raises(ConfigError, match="ladder.patience"):
        load_ladder_config(bad)


def test_ladder_with_the_real_training_loop(tmp_path, tiny_bert_dir):
    """head-only -> partial on a tiny BERT: partial starts from head-only's trained head."""
    from safetensors.torch import load_file

    ladder = LadderConfig(
        metric="eval_loss",
        mode="min",
        min_delta=0.0,
        stages=[
            LadderStageConfig(name="head-only", method="head-only", train={"lr": 5e-2}),
            # An LR too small to move anything: the saved head is (nearly) the warm-start head.
            LadderStageConfig(name="partial", method={"name": "partial", "blocks": 1}, train={"lr": 1e-9}),
        ],
    )
    result = run_ladder(run_cfg(tiny_bert_dir, tmp_path / "ladder"), ladder)
    assert [s.name for s in result.stages] == ["head-only", "partial"]
    assert result.stages[1].warm_started_from == "head-only" and result.stages[1].warm_started_tensors == 2
    head = load_file(str(Path(result.stages[0].adapter_dir) / "adapter_model.safetensors"))
    partial = load_file(str(Path(result.stages[1].adapter_dir) / "adapter_model.safetensors"))
    assert torch.allclose(partial["classifier.weight"], head["classifier.weight"], atol=1e-6)
    assert result.stages[1].trainable_params > result.stages[0].trainable_params
    assert (tmp_path / "ladder" / "ladder_report.md").is_file()
