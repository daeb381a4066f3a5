"""Honest baselines in a classification run: the frozen backbone with a trained head and TF-IDF + logistic
regression on the same held-out split, next to the adapter, with the compare suite's negative-transfer flag."""

from __future__ import annotations

import json
from types import SimpleNamespace

from adapters.config import load_config, validation_metrics
from adapters.evaluation.baselines import negative_transfer
from adapters.training.baselines import HEAD_ONLY_DIR, head_only_baseline
from adapters.training.report import baseline_lines, format_result


def test_negative_transfer_is_scoring_below_a_reference_that_never_saw_the_pretrained_weights():
    assert negative_transfer(0.5, {"classic": 0.6, "scratch": 0.4}) == ["classic"]
    assert negative_transfer(0.7, {"classic": 0.6, "scratch": 0.7}) == []  # equal is not below
    assert negative_transfer(0.1, {"base": 0.9, "classic": None}) == []  # base is no reference; None is no score
    assert negative_transfer(None, {"classic": 0.6}) == []
    lines = baseline_lines(
        {
            "adapted": {"accuracy": 0.5},
            "base": {"accuracy": 0.55},
            "classic": {"accuracy": 0.6},
            "negative_transfer": ["classic"],
        },
        "sequence-classification",
    )
    assert lines[-1].endswith("0.500   negative transfer: below TF-IDF + logreg")
    assert [line.split()[-1] for line in lines[:2]] == ["0.550", "0.600"]


def test_suite_report_flags_with_the_same_rule():
    from adapters.benchmarking.report import ArmSummary, flag_negative_transfer

    def arm(name, value):
        return ArmSummary("t", "sequence-classification", name, "method", "accuracy", [1], value, 0.0)

    arms = [arm("classic", 0.6), arm("scratch", 0.4), arm("lora", 0.5), arm("base", 0.7)]
    flag_negative_transfer(arms)
    assert [a.negative_transfer for a in arms] == [[], [], ["classic"], []]


def test_classification_run_scores_both_baselines_on_the_same_test_split(tiny_bert_dir, tmp_path, one_torch_thread):
    from adapters.training.loop import train

    cfg = load_config(
        raw={
            "task": "sequence-classification",
            "model": {"name": str(tiny_bert_dir)},
            "data": {
                "name": "trec",
                "max_length": 32,
                "max_train_samples": 96,
                "max_eval_samples": 24,
                "max_test_samples": 24,
            },
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 6, "eval_every": 3, "log_every": 2, "seed": 1},
            "eval": {"baseline": True},
            "output": {"run_dir": str(tmp_path / "run"), "name": "tiny"},
        }
    )
    result = train(cfg)
    metrics = result.metrics
    assert set(metrics) == {"validation", "adapted", "base", "classic", "negative_transfer"}
    # validation reports exactly what early stopping may watch
    numeric = {k for k, v in metrics["validation"].items() if isinstance(v, float)}
    assert numeric == set(validation_metrics("sequence-classification"))

    folder = result.run_dir / HEAD_ONLY_DIR
    head_only = json.loads((folder / "summary.json").read_text())
    assert head_only["steps"] == result.steps == 6
    assert json.loads((folder / "adapter" / "manifest.json").read_text())["method"]["name"] == "head-only"
    assert head_only["metrics"]["adapted"] == metrics["base"]
    assert head_only["trainable_params"] < result.trainable_params  # the head alone
    assert not list(folder.glob(f"{HEAD_ONLY_DIR}*")), "the baseline has no baselines of its own"
    assert 0.0 <= metrics["classic"]["accuracy"] <= 1.0
    assert metrics["negative_transfer"] == negative_transfer(
        metrics["adapted"]["accuracy"], {"classic": metrics["classic"]["accuracy"]}
    )

    summary = json.loads((result.run_dir / "summary.json").read_text())["metrics"]
    assert summary["base"] == metrics["base"] and summary["classic"] == metrics["classic"]
    assert summary["negative_transfer"] == metrics["negative_transfer"]
    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())["metrics"]
    assert manifest["base"]["accuracy"] == metrics["base"]["accuracy"]
    assert manifest["classic"]["accuracy"] == metrics["classic"]["accuracy"]
    assert manifest["negative_transfer"] == metrics["negative_transfer"]

    text = format_result(result, cfg)
    assert "(not evaluated)" not in text
    assert f"frozen backbone + head   {metrics['base']['accuracy']:.3f}" in text
    assert f"TF-IDF + logreg          {metrics['classic']['accuracy']:.3f}" in text
    assert ("negative transfer: below TF-IDF + logreg" in text) == bool(metrics["negative_transfer"])

    # a resumed run finishing again reuses the finished baseline instead of training it twice
    run = SimpleNamespace(run_dir=result.run_dir, accelerator=None, cfg=cfg)
    assert head_only_baseline(run) == metrics["base"]


def test_without_eval_baseline_a_classification_run_has_none(tiny_bert_dir, tmp_path, one_torch_thread):
    from adapters.training.loop import train

    cfg = load_config(
        raw={
            "task": "sequence-classification",
            "model": {"name": str(tiny_bert_dir)},
            "data": {
                "name": "trec",
                "max_length": 32,
                "max_train_samples": 48,
                "max_eval_samples": 16,
                "max_test_samples": 16,
            },
            "method": {"name": "lora", "r": 4},
            "train": {"batch_size": 8, "max_steps": 2},
            "eval": {"baseline": False},
            "output": {"run_dir": str(tmp_path / "run")},
        }
    )
    result = train(cfg)
    assert result.metrics["base"] is None and "classic" not in result.metrics
    assert not (result.run_dir / HEAD_ONLY_DIR).exists()
    assert "frozen backbone + head   (not evaluated)" in format_result(result, cfg)


def test_causal_lm_validation_reports_what_early_stopping_may_watch(tiny_llama_dir, one_torch_thread):
    from adapters.data.loading import prepare_splits, tokenize_splits
    from adapters.evaluation.evaluator import evaluate_causal_lm
    from adapters.modeling.backbone import load_backbone, load_tokenizer

    task = "causal-lm"
    cfg = load_config(
        raw={
            "task": task,
            "model": {"name": str(tiny_llama_dir)},
            "data": {
                "name": "trec",
                "max_length": 48,
                "max_train_samples": 8,
                "max_eval_samples": 4,
                "max_test_samples": 4,
            },
            "eval": {"max_new_tokens": 2},
        }
    )
    prepared = prepare_splits(cfg)
    tokenizer = load_tokenizer(cfg.model)
    split = tokenize_splits(prepared, cfg, tokenizer)["validation"]
    metrics = evaluate_causal_lm(
        load_backbone(cfg.model, task), split, tokenizer, SimpleNamespace(device="cpu"), 4, 2, generate=True
    )
    assert {f"eval_{k}" for k, v in metrics.items() if isinstance(v, float)} == set(validation_metrics(task))
