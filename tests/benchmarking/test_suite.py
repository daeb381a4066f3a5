"""The compare matrix on tiny models: cells, baselines, measurements, resumability, report files."""

from __future__ import annotations

import random

import pytest
import torch

from adapters.benchmarking.report import ArmSummary, flag_negative_transfer, markdown_table, summarize
from adapters.benchmarking.suite import (
    TargetSpec,
    load_suite,
    plan_cells,
    read_results,
    run_suite,
    time_to_target,
)
from adapters.config import ModelConfig
from adapters.errors import ConfigError
from adapters.modeling.backbone import load_backbone

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices gain nothing from a second thread, and on a busy 2-core machine they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def question_csv(tmp_path_factory):
    """Two classes a bag of words separates: 'who ...' questions and 'how many ...' questions."""
    rng = random.Random(0)
    nouns = [
        "river",
        "king",
        "planet",
        "song",
        "city",
        "painter",
        "bridge",
        "island",
        "war",
        "novel",
        "team",
        "mountain",
    ]
    rows = []
    for i in range(160):
        noun, other = rng.choice(nouns), rng.choice(nouns)
        if i % 2:
            rows.append((f"who founded the {noun} near the {other} number {i}", "human"))
        else:
            rows.append((f"how many {noun}s are in the {other} number {i}", "number"))
    path = tmp_path_factory.mktemp("data") / "questions.csv"
    path.write_text("text,label\n" + "\n".join(f"{text},{label}" for text, label in rows) + "\n")
    return path


def suite_raw(model_dir, data_path, **extra) -> dict:
    raw = {
        "name": "tiny",
        "budget": {"steps": 6},
        "seeds": [0, 1],
        "train": {
            "batch_size": 8,
            "eval_batch_size": 32,
            "log_every": 2,
            "eval_every": 3,
            "lr": 5e-3,
            "scheduler": "constant",
        },
        "methods": [{"name": "lora", "options": {"r": 4}}, {"name": "ia3", "label": "ia3-default"}],
        "tasks": [
            {
                "name": "questions",
                "task": "sequence-classification",
                "model": {"name": str(model_dir), "pooling": "mean"},
                "data": {
                    "name": str(data_path),
                    "max_length": 24,
                    "split": {"kind": "stratified", "validation": 0.2, "test": 0.25},
                },
                "target": {"metric": "eval_accuracy", "value": 0.0},
            }
        ],
    }
    raw.update(extra)
    return raw


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_bert_dir, question_csv):
    root = tmp_path_factory.mktemp("compare")
    raw = suite_raw(tiny_bert_dir, question_csv)
    raw["tasks"][0]["methods"] = ["lora"]  # ia3 is defined but not run on this task
    suite = load_suite(raw=raw)
    result = run_suite(suite, root / "out", root / "work", command="pytest matrix", progress=False)
    return suite, root, result


def test_matrix_runs_every_cell_with_measurements(matrix):
    suite, root, result = matrix
    assert result.failed == [] and result.skipped == []
    records = read_results(root / "out")
    keys = [r["key"] for r in records]
    expected = {f"questions/{arm}/seed={s}" for arm in ("base", "scratch", "classic", "lora") for s in (0, 1)}
    assert set(keys) == expected and len(keys) == len(expected)
    by = {r["key"]: r for r in records}
    for rec in records:
        assert rec["status"] == "ok"
        assert 0.0 <= rec["metric"] <= 1.0
        assert rec["peak_memory_bytes"] >= rec["memory_before_bytes"] > 0
        assert rec["environment"]["versions"]["torch"] and len(rec["environment"]["load_average"]) == 3
        assert rec["config"]  # the full config travels with the line
    lora, scratch, base = by["questions/lora/seed=0"], by["questions/scratch/seed=0"], by["questions/base/seed=0"]
    for rec in (lora, scratch, base):
        assert rec["steps"] == 6 and rec["samples"] == 6 * 8
        assert rec["tokens"] > rec["samples"] and rec["tokens_per_second"] > 0 and rec["samples_per_second"] > 0
        assert rec["adapter_bytes"] > rec["adapter_weights_bytes"] > 0 and rec["train_seconds"] > 0
        assert [s for s, _ in rec["loss_curve"]] == [2, 4, 6]
        assert rec["steps_to_target"] == 3 and rec["seconds_to_target"] > 0  # target 0.0: reached at the first eval
    # the scratch baseline trains every weight of a randomly initialised copy; LoRA a small fraction
    assert scratch["config"]["model"]["init"] == "random" and scratch["method"]["name"] == "full"
    # the resolved config: defaults filled in
    assert lora["config"]["train"]["max_grad_norm"] == 1.0 and lora["config"]["train"]["max_steps"] == 6
    assert (
        scratch["trainable_params"] == scratch["total_params"] > lora["trainable_params"] > base["trainable_params"] > 0
    )
    assert scratch["adapter_weights_bytes"] > lora["adapter_weights_bytes"] > base["adapter_weights_bytes"]
    # fp32 weights: at least 4 bytes per trained parameter, and not much more
    assert 4 * lora["trainable_params"] <= lora["adapter_weights_bytes"] < 4 * lora["trainable_params"] + 100_000
    assert base["method"]["name"] == "head-only"
    classic = by["questions/classic/seed=0"]
    assert classic["metric"] > 0.9  # the classes are separable by words
    assert classic["trainable_params"] > 0 and classic["tokens_per_second"] is None
    # each seed carves its own split and trains its own way
    assert by["questions/lora/seed=0"]["config"]["train"]["seed"] == 0
    assert by["questions/lora/seed=1"]["config"]["train"]["seed"] == 1


def test_report_files_written(matrix):
    _, root, _ = matrix
    out = root / "out"
    table = (out / "table.md").read_text()
    titles = (
        "base model (frozen, head-only)",
        "from scratch (random init, full)",
        "TF-IDF + logistic regression",
        "| lora |",
    )
    for title in titles:
        assert title in table
    assert "ia3" not in table
    assert "± " in table and "(2)" in table and "pytest matrix" in table
    assert "load average" in table and "summed over the 8 cells" in table
    for name in ("metric_vs_params.png", "metric_vs_time.png", "loss_curves.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        assert (out / name).stat().st_mode & 0o777 == 0o644
    assert (out / "command.txt").read_text().strip() == "pytest matrix"


def test_rerun_skips_finished_cells_and_redoes_changed_ones(matrix, tiny_bert_dir, question_csv):
    suite, root, first = matrix
    lines_before = (root / "out" / "results.jsonl").read_text().splitlines()
    again = run_suite(suite, root / "out", root / "work", progress=False)
    assert again.ran == [] and len(again.skipped) == 8
    assert (root / "out" / "results.jsonl").read_text().splitlines() == lines_before
    # a changed method spec is a new cell; only it runs, only for the method it concerns
    raw = suite_raw(tiny_bert_dir, question_csv, seeds=[0])
    raw["tasks"][0]["methods"] = ["lora"]
    raw["methods"][0]["options"] = {"r": 2}
    changed = run_suite(load_suite(raw=raw), root / "out", root / "work", progress=False)
    assert changed.ran == ["questions/lora/seed=0"]
    assert len(changed.records) == 4


def test_wall_clock_budget_stops_training(tmp_path, tiny_bert_dir, question_csv):
    raw = suite_raw(tiny_bert_dir, question_csv, seeds=[0], budget={"seconds": 0.5, "max_steps": 100000})
    raw["tasks"][0]["baselines"] = []
    raw["methods"] = raw["methods"][:1]
    result = run_suite(load_suite(raw=raw), tmp_path / "out", tmp_path / "work", progress=False)
    (rec,) = result.records
    assert 1 <= rec["steps"] < 100000
    assert 0.5 <= rec["train_seconds"] < 10


def test_causal_lm_gets_zero_shot_and_scratch_but_no_classic(tiny_llama_dir, question_csv):
    raw = suite_raw(tiny_llama_dir, question_csv)
    raw["tasks"][0].update(task="causal-lm", model={"name": str(tiny_llama_dir)})
    cells = plan_cells(load_suite(raw=raw))
    kinds = {(c.arm, c.kind) for c in cells}
    assert kinds == {("base", "zero-shot"), ("scratch", "scratch"), ("lora", "method"), ("ia3-default", "method")}


def test_suite_errors_name_the_key(tiny_bert_dir, question_csv):
    with pytest.raises(ConfigError, match="budget"):
        load_suite(raw=suite_raw(tiny_bert_dir, question_csv, budget={"steps": 5, "seconds": 3}))
    bad = suite_raw(tiny_bert_dir, question_csv)
    bad["methods"].append({"name": "lora"})
    with pytest.raises(ConfigError, match="repeated: lora"):
        load_suite(raw=bad)
    bad = suite_raw(tiny_bert_dir, question_csv)
    bad["methods"][0]["name"] = "lorax"
    with pytest.raises(ConfigError, match="valid methods"):
        load_suite(raw=bad)
    bad = suite_raw(tiny_bert_dir, question_csv)
    bad["tasks"][0]["methods"] = ["dora"]
    with pytest.raises(ConfigError, match="unknown labels"):
        load_suite(raw=bad)
    bad = suite_raw(tiny_bert_dir, question_csv)
    bad["methods"].append({"name": "head-only", "label": "head"})
    bad["tasks"][0].update(task="causal-lm", methods=["lora", "head"])
    with pytest.raises(ConfigError, match="head cannot train a causal-lm task"):
        load_suite(raw=bad)
    with pytest.raises(ConfigError, match="unknown suite key 'sedes'"):
        load_suite(raw=suite_raw(tiny_bert_dir, question_csv, sedes=[1]))


def _record(task, arm, kind, seed, metric):
    return {
        "status": "ok",
        "task": task,
        "task_type": "sequence-classification",
        "arm": arm,
        "kind": kind,
        "seed": seed,
        "metric_name": "accuracy",
        "metric": metric,
        "trainable_params": 10,
        "loss_curve": [[1, 1.0], [2, 0.5]],
    }


def test_negative_transfer_flags_arms_below_scratch_or_classic():
    records = []
    for seed, jitter in ((0, 0.01), (1, -0.01)):
        records += [
            _record("t", "scratch", "scratch", seed, 0.60 + jitter),
            _record("t", "classic", "classic", seed, 0.80 + jitter),
            _record("t", "base", "base", seed, 0.70 + jitter),  # below classic only
            _record("t", "lora", "method", seed, 0.90 + jitter),
            _record("t", "prompt", "method", seed, 0.50 + jitter),  # below both
        ]
    by = {s.arm: s for s in summarize(records)}
    assert by["lora"].negative_transfer == []
    assert by["base"].negative_transfer == ["classic"]
    assert sorted(by["prompt"].negative_transfer) == ["classic", "scratch"]
    assert by["scratch"].negative_transfer == [] and by["classic"].negative_transfer == []
    assert by["lora"].metric_mean == pytest.approx(0.90) and by["lora"].metric_std == pytest.approx(0.01414, abs=1e-4)
    table = markdown_table(records, {"suite": "unit"})
    assert "| prompt | 0.5000 ± 0.0141 (2) |" in table
    prompt_row = next(line for line in table.splitlines() if line.startswith("| prompt |"))
    assert "**yes**" in prompt_row and "from scratch" in prompt_row and "TF-IDF" in prompt_row
    lora_row = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert lora_row.rstrip().endswith("| no |")


def test_negative_transfer_is_per_task():
    summaries = [
        ArmSummary("a", "", "scratch", "scratch", "accuracy", [0], 0.9, 0.0),
        ArmSummary("a", "", "lora", "method", "accuracy", [0], 0.8, 0.0),
        ArmSummary("b", "", "lora", "method", "accuracy", [0], 0.5, 0.0),
    ]
    flag_negative_transfer(summaries)
    assert summaries[1].negative_transfer == ["scratch"] and summaries[2].negative_transfer == []


def test_time_to_target_uses_first_crossing_and_direction():
    curve = [[10, 0.5], [20, 0.8], [30, 0.7], [40, 0.9]]
    assert time_to_target(curve, TargetSpec(metric="eval_accuracy", value=0.75), 0.5) == (20, 10.0)
    assert time_to_target(curve, TargetSpec(metric="eval_accuracy", value=0.95), 0.5) == (None, None)
    loss = [[10, 2.0], [20, 1.2], [30, 0.9]]
    assert time_to_target(loss, TargetSpec(metric="eval_loss", value=1.0, mode="min"), 2.0) == (30, 60.0)


def test_random_init_changes_the_weights_not_the_architecture(tiny_bert_dir):
    labels = {"a": 0, "b": 1}
    pretrained = load_backbone(ModelConfig(name=str(tiny_bert_dir), pooling="mean"), "sequence-classification", labels)
    torch.manual_seed(123)
    scratch_cfg = ModelConfig(name=str(tiny_bert_dir), pooling="mean", init="random")
    scratch = load_backbone(scratch_cfg, "sequence-classification", labels)
    p, s = dict(pretrained.named_parameters()), dict(scratch.named_parameters())
    assert p.keys() == s.keys() and all(p[k].shape == s[k].shape for k in p)
    name = "bert.encoder.layer.0.attention.self.query.weight"  # transformers' own prefix (plain runtimes load it)
    assert not torch.allclose(p[name], s[name])
    with pytest.raises(ConfigError, match="model.init"):
        quantized = ModelConfig(name=str(tiny_bert_dir), init="random", quantization={"bits": 4})
        load_backbone(quantized, "sequence-classification", labels)
