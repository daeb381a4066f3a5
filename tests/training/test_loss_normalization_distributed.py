"""The same rows give the same adapter and logged losses on 2 processes as on one, with or without
accumulation, under DDP (gloo) and DeepSpeed ZeRO-2.

Each rank averaged its own shard before: with answers of 1 or ~25 words a rank's mean weighed a
short answer's tokens more than the other rank's. The loop now divides every step's summed loss by
the global batch's target count and multiplies back the launcher's averaging over ranks (and,
outside DeepSpeed, accelerate's division by the accumulation steps; DeepSpeed's own is switched
off): adapters.training.step.backward_factor. A wrong factor for either launcher changes the
update size and fails the adapter comparison.

One launch per launcher (adapters in tests/helpers/distributed_runs.py), each training, in the same
processes: LoRA causal-lm `2 x batch 4` and `2 x batch 2 x accum 2`, prompt tuning and a label-smoothed
classifier `2 x batch 2 x accum 2`; the references are the one-process `batch 8 x accum 1` runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.test_distributed import launch, write_config
from tests.training.test_loss_normalization import (
    assert_same_training,
    causal_lm_config,
    classification_config,
    qa_rows,
    train_run,
    write_jsonl,
)

pytestmark = pytest.mark.multiprocess

LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
PROMPT = {"name": "prompt-tuning", "num_virtual_tokens": 4}
# run name -> (objective, per-process batch, accumulation); 2 processes each: 8 rows per step.
RUNS = {"lora-b4": ("lora", 4, 1), "lora-b2-a2": ("lora", 2, 2), "pt-b2-a2": ("pt", 2, 2), "cls-b2-a2": ("cls", 2, 2)}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loss-normalization-distributed")


@pytest.fixture(scope="module")
def make_raw(work, tiny_llama_dir, tiny_bert_dir):
    data = write_jsonl(work / "qa.jsonl", qa_rows())

    def make(objective: str, run: Path, batch: int, accum: int) -> dict:
        if objective == "cls":
            # 24 rows: every rank gets whole micro-batches (accelerate would repeat rows to even out a short one).
            raw = classification_config(tiny_bert_dir, run, batch, accum)
            raw["data"]["max_train_samples"] = 24
            return raw
        return causal_lm_config(tiny_llama_dir, data, run, batch, accum, LORA if objective == "lora" else PROMPT)

    return make


@pytest.fixture(scope="module")
def references(work, make_raw) -> dict[str, Path]:
    return {
        objective: train_run(make_raw(objective, work / f"single-{objective}", 8, 1))
        for objective in ("lora", "pt", "cls")
    }


def launch_all(work: Path, make_raw, launcher: str, accelerate_yaml: str) -> dict[str, Path]:
    """All RUNS in one launch; returns their run folders."""
    runs = {name: work / launcher / name for name in RUNS}
    configs = [
        write_config(work / f"{launcher}-{name}.yaml", make_raw(objective, runs[name], batch, accum))
        for name, (objective, batch, accum) in RUNS.items()
    ]
    more = [arg for config in configs[1:] for arg in ("--config", str(config))]
    launch(accelerate_yaml, "tests/helpers/distributed_runs.py", configs[0], *more, trace=work / f"trace-{launcher}")
    return runs


@pytest.mark.parametrize("launcher, accelerate_yaml", [("ddp", "multi-cpu.yaml"), ("zero2", "deepspeed-zero2.yaml")])
def test_two_processes_equal_one_whatever_the_batch_split(work, make_raw, references, launcher, accelerate_yaml):
    runs = launch_all(work, make_raw, launcher, accelerate_yaml)
    for name, (objective, _, _) in RUNS.items():
        assert_same_training(runs[name], references[objective])
