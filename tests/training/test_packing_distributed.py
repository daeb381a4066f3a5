"""Packed training (train.packing) on 2 processes equals 1 process with the same global batch, under DDP (gloo).

Every rank packs the same training split the same way (best-fit decreasing is deterministic), then
accelerate shards the packed rows: rank r takes micro-batches r, r + 2, ... of the one sampler order,
so per optimizer step the 2 ranks together see the packed rows one process sees in its batch of 4
(checked on the batch trace). Packed rows hold different numbers of targets (answers of 1 or ~25
words), so a rank that averaged its own shard would weigh its tokens differently from the other's:
the loss is the global batch's summed cross-entropy over its global target count
(adapters.training.step), and the logged losses, gradient norms and saved adapter must equal the
one-process run's. One launch trains `2 x batch 2` and `2 x batch 1 x accum 2`; the reference is the
one-process `batch 4 x accum 1` run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training.test_distributed import launch, write_config
from tests.training.test_loss_normalization import STEPS, assert_same_training, causal_lm_config, qa_rows, write_jsonl

pytestmark = pytest.mark.multiprocess

LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
GLOBAL_BATCH = 4  # packed rows per optimizer step
RUNS = {"b2": (2, 1), "b1-a2": (1, 2)}  # run name -> (per-process batch, accumulation), on 2 processes


def packed_config(model_dir: Path, data: Path, run: Path, batch: int, accum: int) -> dict:
    raw = causal_lm_config(model_dir, data, run, batch, accum, LORA)
    # 24 rows of 49 to 78 tokens in packed rows of up to 128 (data.max_length): the 5 short rows share
    # a packed row with a long one, 19 packed rows in all, enough for STEPS whole global batches (accelerate
    # would repeat rows to even out a short last one).
    raw["train"]["packing"] = True
    return raw


def packing_event(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r.get("event") == "packing")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packing-distributed")


@pytest.fixture(scope="module")
def runs(work, tiny_llama_dir) -> dict[str, Path]:
    from tests.training.test_distributed import train_here

    data = write_jsonl(work / "qa.jsonl", qa_rows())
    reference = work / "single"
    train_here(packed_config(tiny_llama_dir, data, reference, GLOBAL_BATCH, 1), work / "trace-single")
    out = {"single": reference}
    configs = []
    for name, (batch, accum) in RUNS.items():
        out[name] = work / "ddp" / name
        configs.append(
            write_config(work / f"{name}.yaml", packed_config(tiny_llama_dir, data, out[name], batch, accum))
        )
    more = [arg for config in configs[1:] for arg in ("--config", str(config))]
    launch("multi-cpu.yaml", "tests/helpers/distributed_runs.py", configs[0], *more, trace=work / "trace-ddp")
    return out


def test_packed_ddp_equals_one_process_with_the_same_global_batch(runs):
    event = packing_event(runs["single"])
    assert event["packed_rows"] >= STEPS * GLOBAL_BATCH and event["packed_rows"] < event["rows"], event
    for name in RUNS:
        info = json.loads((runs[name] / "run_info.json").read_text())
        assert info["num_processes"] == 2, info
        # Packing does not depend on the batch (the padding shares, measured per micro-batch, do).
        same = ("rows", "packed_rows", "tokens", "max_length")
        got = packing_event(runs[name])
        assert {k: got[k] for k in same} == {k: event[k] for k in same}, "packed differently from one process"
        assert_same_training(runs[name], runs["single"])


def test_packed_rows_are_sharded_across_ranks(runs, work):
    from adapters.training.batch_trace import read_trace

    reference = {e["step"]: e["rows"] for e in read_trace(work / "trace-single")[0]}
    ranks = read_trace(work / "trace-ddp")
    assert sorted(ranks) == [0, 1]
    # The launch trained RUNS one after the other: each rank's lines are STEPS x accumulation per run.
    for rank, entries in ranks.items():
        start = 0
        for batch, accum in RUNS.values():
            mine = entries[start : start + STEPS * accum]
            start += STEPS * accum
            for step in range(1, STEPS + 1):
                rows = [row for e in mine if e["step"] == step for row in e["rows"]]
                assert len(rows) == batch * accum, (rank, step, rows)
                other = [
                    row
                    for e in ranks[1 - rank][start - STEPS * accum : start]
                    if e["step"] == step
                    for row in e["rows"]
                ]
                assert not set(rows) & set(other), f"step {step}: both ranks trained on the same packed rows"
                assert sorted(rows + other) == sorted(reference[step]), f"step {step}: not one process's batch"
