"""The speed benchmarks run end to end on tiny settings (their speed is not checked here), and the
helpers they share count what they claim to count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters.benchmarking.sidebyside import CountingCollator, median_run

ROOT = Path(__file__).resolve().parents[2]


def run_script(*args: str, timeout: int = 1500) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_counting_collator_counts_mask_ones_or_every_position():
    def padded(features):
        width = max(len(f) for f in features)
        ids = torch.zeros((len(features), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            ids[i, : len(f)] = torch.tensor(f)
            mask[i, : len(f)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    counter = CountingCollator(padded)
    counter([[1, 2, 3], [4]])
    assert (counter.real, counter.computed, counter.rows) == (4, 6, 2)
    flat = CountingCollator(lambda fs: {"input_ids": torch.tensor([sum(fs, [])])})
    flat([[1, 2, 3], [4]])
    assert (flat.real, flat.computed) == (4, 4)
    assert median_run([{"real_tokens_per_second": v} for v in (3, 1, 2)])["real_tokens_per_second"] == 2


def check_sft_side(report: dict) -> None:
    ours, trl = report["ours"], report["trl"]
    assert report["settings"]["repeats_done"] == 1 and len(report["ratios_per_repeat"]) == 1
    assert report["ratio"] == pytest.approx(ours["real_tokens_per_second"] / trl["real_tokens_per_second"])
    for run in (ours, trl):
        assert run["real_tokens"] > 0 and 0 <= run["exact_match"] <= 1
        assert 0 < run["mfu"] < 2 and run["peak_memory"]["rss_high_water_bytes"] > 100 * 2**20
        assert run["trainable_params"] == ours["trainable_params"]  # the same LoRA on both sides
    # our FLOP count of TRL's peft model and of ours agree (the same LoRA on the same backbone); TRL's
    # gradient checkpointing adds input gradients below the lowest LoRA layer, a small share
    assert trl["flops_per_token"]["total"] == pytest.approx(ours["flops_per_token"]["total"], rel=0.02)
    assert report["load_average_start"] and report["command"].startswith(".venv/bin/python benchmarks/")


TINY_SFT = ("--steps", "1", "--repeats", "1", "--train-rows", "16", "--test-rows", "2", "--batch-size", "2")
TINY_SFT += ("--max-new-tokens", "1", "--threads", "1")


@pytest.mark.real_model
@pytest.mark.multiprocess
def test_sft_throughput_end_to_end(tmp_path):
    run_script("benchmarks/sft_throughput.py", *TINY_SFT, "--out", str(tmp_path / "sft"))
    report = json.loads((tmp_path / "sft.json").read_text())
    assert set(report) == {"padded"}
    check_sft_side(report["padded"])
    assert "Ratio (ours / TRL" in (tmp_path / "sft.md").read_text()


@pytest.mark.real_model
@pytest.mark.multiprocess
def test_sft_throughput_packing_keeps_the_other_section(tmp_path):
    (tmp_path / "sft.json").write_text(json.dumps({"padded": {"kept": True}, "stray": 1}))
    run_script("benchmarks/sft_throughput.py", *TINY_SFT, "--packing", "--out", str(tmp_path / "sft"))
    report = json.loads((tmp_path / "sft.json").read_text())
    assert report["padded"] == {"kept": True} and "stray" not in report
    check_sft_side(report["packed"])
    assert "packing=True" in report["packed"]["trl"]["how"]


@pytest.mark.real_model
def test_classification_throughput_end_to_end(tmp_path):
    args = ("--steps", "2", "--repeats", "1", "--batch-size", "4", "--max-length", "16", "--threads", "1")
    run_script("benchmarks/throughput.py", *args, "--out", str(tmp_path / "t"))
    report = json.loads((tmp_path / "t.json").read_text())
    for side in ("ours", "plain"):
        run = report[side]
        assert 0 < run["mfu"] < 2 and run["peak_memory"]["bytes"] > 50 * 2**20
        assert run["peak_flops"]["threads"] == 1
    assert "MFU" in (tmp_path / "t.md").read_text()


@pytest.mark.real_model
def test_gpu_check_dry_run(tmp_path):
    run_script(
        "benchmarks/gpu_check.py", "--dry-run", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "g.json")
    )
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["dry_run"] and set(report["comparison"]) == {"lora-bf16", "qlora-4bit"}
    for variant in report["variants"].values():
        assert set(variant) == {"trl", "ours"}
        for run in variant.values():
            assert "error" not in run and run["real_tokens"] > 0 and 0 < run["mfu"] < 2
        # both sides train the same LoRA on the same model: the same trainable parameters
        assert variant["trl"]["trainable_params"] == variant["ours"]["trainable_params"]


@pytest.mark.real_model
def test_server_latency_end_to_end_with_think_time(tmp_path):
    args = ("--clients", "2", "--requests", "1", "--max-tokens", "2", "--think-seconds", "0.05", "--only", "0", "3")
    run_script("benchmarks/server_latency.py", *args, "--out", str(tmp_path / "s"))
    report = json.loads((tmp_path / "s.json").read_text())
    rows = report["workloads"]
    assert [(w["batching"], w["think_seconds"]) for w in rows] == [
        ("continuous", 0.0),
        ("window", 0.0),
        ("continuous", 0.05),
        ("window", 0.05),
    ]
    assert all(w["failures"] == 0 and w["requests"] == 2 and w["tokens_per_s"] > 0 for w in rows)
    md = (tmp_path / "s.md").read_text()
    assert "think time 0.05 s" in md and "{" not in md.splitlines()[0]  # the title is filled in
