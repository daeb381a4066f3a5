"""The training loop on tiny models: loss falls, the adapter reloads exactly, resume continues, errors are clear."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters.config import load_config
from adapters.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def tiny_cfg(model_dir, run_dir, task="causal-lm", **overrides):
    raw = {
        "task": task,
        "model": {"name": str(model_dir)},
        "data": {
            "name": "trec",
            "max_length": 48,
            "max_train_samples": 96,
            "max_eval_samples": 24,
            "max_test_samples": 24,
        },
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"lr": 5e-3, "batch_size": 8, "max_steps": 12, "log_every": 2, "seed": 1, "eval_batch_size": 16},
        "eval": {"max_new_tokens": 3},
        "output": {"run_dir": str(run_dir), "name": "tiny"},
    }
    for key, value in overrides.items():
        node = raw
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return load_config(raw=raw)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_causal_lm_trains_saves_and_reloads(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters.training.loop import train

    result = train(tiny_cfg(tiny_llama_dir, tmp_path / "run", train__lr=1e-2, train__max_steps=16))
    curve = losses(result.run_dir)
    assert curve[-1] < curve[0], curve
    adapter = result.adapter_dir
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "manifest.json").is_file()
    assert not list(adapter.glob("model*.safetensors")), "base weights must not be in the adapter folder"
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["task"] == "causal-lm" and manifest["method"]["name"] == "lora"
    assert manifest["base_model"]["fingerprint"].startswith("sha256:")
    assert "exact_match" in result.metrics["adapted"] and result.metrics["base"] is not None
    # drift reference: the test answers' mix (TREC answers come from 6 words) and their confidences
    reference = manifest["reference"]
    n_test = sum(reference["labels"]["counts"].values())
    assert reference["labels"]["source"] == "predictions" and reference["confidence"]["num"] == n_test > 0

    # Plain peft loads it and reproduces the trained model's logits.
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits
    assert not torch.allclose(logits, base_logits), "the adapter changed nothing"
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["adapter_dir"] == str(adapter)
    assert (result.run_dir / "config.yaml").is_file() and (result.run_dir / "run_info.json").is_file()
    assert list(result.run_dir.rglob("events.out.tfevents*")), "TensorBoard events missing"


def test_classification_with_early_stopping_restores_best(tiny_bert_dir, tmp_path):
    from adapters.training.loop import train

    cfg = tiny_cfg(
        tiny_bert_dir,
        tmp_path / "run",
        task="sequence-classification",
        train__max_steps=30,
        train__eval_every=3,
        train__lr=2e-2,
        train__early_stopping={"metric": "eval_loss", "mode": "min", "patience": 2},
    )
    result = train(cfg)
    rows = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert evals, "no evaluation was logged"
    best = min(r["eval_loss"] for r in evals)
    # After restoring the best checkpoint, the final validation loss is the best one seen.
    assert result.metrics["validation"]["eval_loss"] == pytest.approx(best, rel=1e-4, abs=1e-5)
    assert set(result.metrics["adapted"]) >= {"accuracy", "f1_macro", "loss"}
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["labels"] == sorted(manifest["labels"]) and len(manifest["labels"]) >= 2


def test_resume_continues_from_checkpoint_and_matches_uninterrupted_run(tiny_llama_dir, tmp_path):
    from adapters.training.loop import train

    full = train(
        tiny_cfg(tiny_llama_dir, tmp_path / "full", train__max_steps=8, train__save_every=4, eval__baseline=False)
    )
    # Same run, "crashing" after step 4: train to 4, then resume to 8 from the checkpoint.
    part = tiny_cfg(tiny_llama_dir, tmp_path / "part", train__max_steps=8, train__save_every=4, eval__baseline=False)
    train(part, stop_after=4)
    assert (tmp_path / "part" / "checkpoints" / "step-4").is_dir()
    resumed = train(part, resume=True)
    assert resumed.steps == 8
    from safetensors.torch import load_file

    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_config_errors_name_the_key_and_choices(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: causal-lm\nmodel: {name: x}\ndata: {name: trec}\ntrain: {lr: 1e-3, shedule: cosine}\n")
    with pytest.raises(ConfigError, match=r"train\.shedule.*valid keys.*scheduler"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"unknown method 'lorra'; valid methods: .*lora"):
        load_config(raw={"task": "causal-lm", "model": {"name": "x"}, "data": {"name": "trec"}, "method": "lorra"})
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(
            raw={"task": "causal-lm", "model": {"name": "x"}, "data": {"name": "trec"}},
            overrides=["train.batch_size=many"],
        )
    with pytest.raises(ConfigError, match=r"task"):
        load_config(raw={"task": "translation", "model": {"name": "x"}, "data": {"name": "trec"}})


def test_train_script_reports_config_errors_before_loading_a_model(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: causal-lm\nmodel: {name: x}\ndata: {name: trec}\n")
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", str(cfg), "--set", "method.rank=8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "method.rank" in proc.stderr and "valid options" in proc.stderr


def test_gradual_unfreezing_opens_blocks_from_the_top_during_training(tiny_bert_dir, tmp_path):
    from adapters.training.loop import train

    cfg = tiny_cfg(
        tiny_bert_dir,
        tmp_path / "run",
        task="sequence-classification",
        method="full",
        train__max_steps=9,
        train__unfreeze_every=3,
        train__unfreeze_unit="step",
        train__lr=1e-3,
        train__layer_decay=0.5,
    )
    result = train(cfg)
    rows = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    opened = [(r["step"], r["stages"]) for r in rows if r.get("event") == "unfreeze"]
    assert opened[:2] == [(3, ["layer.1"]), (6, ["layer.0"])], opened
    assert opened[-1][1] == ["embeddings"]
    groups = next(r["groups"] for r in rows if r.get("event") == "param_groups")
    assert {g["name"].split("/")[0] for g in groups} == {"head"}, "training starts with the head alone"


def test_kfold_cross_validation_reports_mean_and_std_with_a_fixed_test_split(tiny_bert_dir, tmp_path):
    from adapters.training.crossval import cross_validate

    cfg = tiny_cfg(
        tiny_bert_dir,
        tmp_path / "cv",
        task="sequence-classification",
        train__max_steps=3,
        data__split={"kind": "stratified", "validation": 0.1, "test": 0.2, "folds": 3},
    )
    cv = cross_validate(cfg)
    assert len(cv.folds) == 3
    acc = cv.test["accuracy"]
    assert len(acc["values"]) == 3 and acc["std"] >= 0
    assert abs(acc["mean"] - sum(acc["values"]) / 3) < 1e-9
    report = json.loads((cv.run_dir / "crossval.json").read_text())
    assert report["folds"] == 3 and "eval_accuracy" in report["validation"]
    # Each fold validates on different rows; the test rows never enter any fold.
    fingerprints = {json.loads((r.adapter_dir / "manifest.json").read_text())["data"]["fingerprint"] for r in cv.folds}
    assert len(fingerprints) == 3


def test_train_script_with_same_config_and_seed_reproduces_metrics(tiny_llama_dir, tmp_path):
    import yaml

    runs = []
    for name in ("a", "b"):
        cfg = tiny_cfg(tiny_llama_dir, tmp_path / name, train__max_steps=6, eval__baseline=False)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        proc = subprocess.run(
            [sys.executable, "scripts/train.py", "--config", str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads((tmp_path / name / "summary.json").read_text()))
    a, b = runs
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert a["metrics"]["adapted"]["loss"] == b["metrics"]["adapted"]["loss"]
    assert a["metrics"]["adapted"]["exact_match"] == b["metrics"]["adapted"]["exact_match"]


def test_model_dropout_overrides_every_dropout_of_the_backbone(tiny_bert_dir, tiny_llama_dir):
    from adapters.config import ModelConfig
    from adapters.modeling.backbone import load_backbone

    bert = load_backbone(ModelConfig(name=str(tiny_bert_dir), dropout=0.3), "sequence-classification", {"a": 0, "b": 1})
    ps = {m.p for m in bert.modules() if isinstance(m, torch.nn.Dropout)}
    assert ps == {0.3}, ps
    llama = load_backbone(ModelConfig(name=str(tiny_llama_dir), dropout=0.2), "causal-lm")
    assert llama.config.attention_dropout == 0.2
    default = load_backbone(ModelConfig(name=str(tiny_bert_dir)), "sequence-classification", {"a": 0, "b": 1})
    assert {m.p for m in default.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
