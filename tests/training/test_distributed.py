"""Several processes through `accelerate launch` on this CPU: DDP over gloo, DeepSpeed ZeRO-2/3, QLoRA.

Every run trains the same tiny classifier for 6 steps on a global batch of 8 rows: one process
with batch 8 (in this process, the reference) or 2 processes with batch 4 each. Data-parallel
training is then the same computation, so the loss curves and the saved adapters must agree with
the reference up to float noise. ADAPTERKIT_BATCH_TRACE records the rows each rank saw.

Launches cost ~30-45 s each (imports) and the first DeepSpeed start on a machine compiles a
shared-memory op (~130 s, cached under TORCH_EXTENSIONS_DIR), so there are as few as possible:
DDP (interrupted at step 3 and resumed in the same processes), ZeRO-2, ZeRO-3 (interrupted at
step 3, then resumed by a second launch that publishes to a store), QLoRA under ZeRO-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
DEEPSPEED_CONFIGS = REPO / "configs" / "deepspeed"
STEPS, STOP_AT = 6, 3
LOSS_TOLERANCE = dict(rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------- runs (module fixtures, built on demand)
def run_config(model_dir: Path, run_dir: Path, **extra) -> dict:
    raw = {
        "task": "sequence-classification",
        "model": {"name": str(model_dir)},
        "data": {
            "name": "trec",
            "max_length": 48,
            "max_train_samples": 96,
            "max_eval_samples": 16,
            "max_test_samples": 16,
        },
        # No dropout anywhere, rows not regrouped by length: 2 x 4 rows is then exactly 1 x 8 rows.
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        # Evaluated every 2 steps, watching accuracy: the best step's weights (copied, under ZeRO-3
        # gathered from the shards) are restored at the end unless the last step is strictly better.
        "train": {
            "lr": 5e-3,
            "batch_size": 4,
            "max_steps": STEPS,
            "log_every": 1,
            "seed": 1,
            "eval_batch_size": 16,
            "group_by_length": False,
            "save_every": STOP_AT,
            "eval_every": 2,
            "early_stopping": {"metric": "eval_accuracy", "mode": "max", "patience": 10},
        },
        "eval": {"baseline": False},
        "output": {"name": "tiny-dist", "run_dir": str(run_dir)},
    }
    for key, value in extra.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def launch(accelerate_yaml: str, script: str, config: Path, *args: str, trace: Path) -> None:
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",  # 2 ranks on 2 cores; DeepSpeed steps are ~30x slower without it
            "DS_ACCELERATOR": "cpu",
            "TOKENIZERS_PARALLELISM": "false",
            "ADAPTERKIT_BATCH_TRACE": str(trace),
        }
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "adapterkit" / "torch_extensions"))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / accelerate_yaml),
        script,
        "--config",
        str(config),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[3:])} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")


def train_here(raw: dict, trace: Path):
    """The one-process reference, trained in this process."""
    from adapters.config import load_config
    from adapters.training.loop import train

    os.environ["ADAPTERKIT_BATCH_TRACE"] = str(trace)
    try:
        return train(load_config(raw=raw)).run_dir
    finally:
        del os.environ["ADAPTERKIT_BATCH_TRACE"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def single(work, tiny_llama_dir) -> dict:
    run = work / "single"
    train_here(run_config(tiny_llama_dir, run, **{"train.batch_size": 8}), work / "trace-single")
    return {"run": run, "trace": work / "trace-single"}


@pytest.fixture(scope="module")
def ddp(work, tiny_llama_dir) -> dict:
    run, trace = work / "ddp", work / "trace-ddp"
    config = write_config(work / "ddp.yaml", run_config(tiny_llama_dir, run))
    launch(
        "multi-cpu.yaml",
        "tests/helpers/distributed_train.py",
        config,
        "--stop-after",
        str(STOP_AT),
        "--resume",
        trace=trace,
    )
    return {"run": run, "trace": trace}


@pytest.fixture(scope="module")
def zero2(work, tiny_llama_dir) -> dict:
    run, trace = work / "zero2", work / "trace-zero2"
    config = write_config(work / "zero2.yaml", run_config(tiny_llama_dir, run))
    launch("deepspeed-zero2.yaml", "scripts/train.py", config, trace=trace)
    return {"run": run, "trace": trace}


@pytest.fixture(scope="module")
def zero3(work, tiny_llama_dir) -> dict:
    """Interrupted at step 3; a second launch (the user's `scripts/train.py --resume`) finishes and publishes."""
    run, trace, store = work / "zero3", work / "trace-zero3", work / "store"
    config = write_config(work / "zero3.yaml", run_config(tiny_llama_dir, run))
    launch(
        "deepspeed-zero3.yaml", "tests/helpers/distributed_train.py", config, "--stop-after", str(STOP_AT), trace=trace
    )
    checkpoint = sorted(p.name for p in (run / "checkpoints").iterdir())
    launch(
        "deepspeed-zero3.yaml",
        "scripts/train.py",
        config,
        "--resume",
        "--trust-checkpoint",  # DeepSpeed's loader unpickles: allowed for this test's own checkpoint
        "--set",
        "output.publish=true",
        "--set",
        f"output.store={store}",
        trace=trace,
    )
    return {"run": run, "trace": trace, "store": store, "checkpoints_after_interruption": checkpoint}


@pytest.fixture(scope="module")
def zero3_offload(work, tiny_llama_dir) -> dict:
    """Parameters and optimizer state offloaded to host memory (on this CPU: the same memory, other code paths)."""
    run, trace = work / "zero3-offload", work / "trace-zero3-offload"
    config = write_config(work / "zero3-offload.yaml", run_config(tiny_llama_dir, run))
    launch("deepspeed-zero3-offload.yaml", "scripts/train.py", config, trace=trace)
    return {"run": run, "trace": trace}


def qlora_config(model_dir, run, **extra):
    # Evaluated every 2 steps like the others: an eval pass must not change the later training
    # steps (bitsandbytes' CPU repacking used to drop gradients after one; see allow_cpu_4bit_packing).
    return run_config(model_dir, run, **{"model.quantization": {"bits": 4}, "train.save_every": None, **extra})


@pytest.fixture(scope="module")
def qlora_single(work, tiny_llama64_dir) -> dict:
    run = work / "qlora-single"
    train_here(qlora_config(tiny_llama64_dir, run, **{"train.batch_size": 8}), work / "trace-qlora-single")
    return {"run": run, "trace": work / "trace-qlora-single"}


@pytest.fixture(scope="module")
def qlora_zero3(work, tiny_llama64_dir) -> dict:
    run, trace = work / "qlora-zero3", work / "trace-qlora-zero3"
    config = write_config(work / "qlora-zero3.yaml", qlora_config(tiny_llama64_dir, run))
    launch("deepspeed-zero3.yaml", "scripts/train.py", config, trace=trace)
    return {"run": run, "trace": trace}


# ---------------------------------------------------------------- readers
def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    # A resumed run continues the log; one that silently started over would log steps twice.
    assert steps == list(range(1, STEPS + 1)), f"{run.name}: loss logged at steps {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_same_curve(run: Path, reference: Path) -> None:
    got, want = losses(run), losses(reference)
    assert got == {step: pytest.approx(value, **LOSS_TOLERANCE) for step, value in want.items()}


def assert_same_adapter(run: Path, reference: Path, atol: float = 1e-5) -> None:
    got, want = adapter_weights(run), adapter_weights(reference)
    assert got.keys() == want.keys() and got, (sorted(got), sorted(want))
    for name, tensor in want.items():
        assert got[name].numel() > 0 and got[name].shape == tensor.shape, (name, got[name].shape, tensor.shape)
        torch.testing.assert_close(got[name], tensor, atol=atol, rtol=1e-4, msg=name)


def assert_sharded_like(run_trace: Path, reference_trace: Path) -> None:
    """Per optimizer step: the 2 ranks saw disjoint rows which together are the reference's rows."""
    from adapters.training.batch_trace import read_trace

    ranks, reference = read_trace(run_trace), read_trace(reference_trace)
    assert sorted(ranks) == [0, 1], f"expected traces of 2 ranks, got {sorted(ranks)}"
    per_step = {r: {e["step"]: e["rows"] for e in entries} for r, entries in ranks.items()}
    for r, entries in ranks.items():
        assert [e["step"] for e in entries] == list(range(1, STEPS + 1)), (
            f"rank {r} steps {[e['step'] for e in entries]}"
        )
    for entry in reference[0]:
        step = entry["step"]
        a, b = per_step[0][step], per_step[1][step]
        assert len(a) == len(b) == 4
        assert not set(a) & set(b), f"step {step}: both ranks trained on {set(a) & set(b)}"
        assert sorted(a + b) == sorted(entry["rows"]), f"step {step}: the ranks' rows differ from one process's batch"


# ---------------------------------------------------------------- configs (no launch)
def test_deepspeed_json_takes_batch_accumulation_and_precision_from_our_config():
    for name in ("zero2", "zero3", "zero3-offload"):
        cfg = json.loads((DEEPSPEED_CONFIGS / f"{name}.json").read_text())
        for key in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "gradient_clipping",
        ):
            assert cfg[key] == "auto", (name, key)
        assert cfg["bf16"]["enabled"] == "auto" and cfg["fp16"]["enabled"] == "auto", name
        assert cfg["zero_allow_untested_optimizer"] is True, name
        assert cfg["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)
        if name != "zero2":
            assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True, name
    offload = json.loads((DEEPSPEED_CONFIGS / "zero3-offload.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == offload["offload_param"]["device"] == "cpu"


def test_accelerate_configs_load_and_point_at_existing_deepspeed_files():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {
        "single": "NO",
        "multi-cpu": "MULTI_GPU",
        "multi-gpu": "MULTI_GPU",
        "deepspeed-zero2": "DEEPSPEED",
        "deepspeed-zero3": "DEEPSPEED",
        "deepspeed-zero3-offload": "DEEPSPEED",
    }
    assert sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")) == sorted(expected)
    for stem, kind in expected.items():
        path = ACCELERATE_CONFIGS / f"{stem}.yaml"
        raw = yaml.safe_load(path.read_text())
        loaded = load_config_from_file(str(path))
        assert str(loaded.distributed_type).split(".")[-1] == kind, stem
        if kind == "DEEPSPEED":
            # accelerate refuses mixed_precision next to a DeepSpeed JSON; precision comes from the JSON's "auto".
            assert "mixed_precision" not in raw, stem
            assert (REPO / raw["deepspeed_config"]["deepspeed_config_file"]).is_file(), stem
            assert raw["num_processes"] == 2


def test_qlora_storage_dtype_matches_compute_dtype(tiny_llama64_dir):
    """ZeRO-3 shards the packed 4-bit weights with everything else: their storage dtype must be the compute dtype."""
    import bitsandbytes as bnb

    from adapters.config import ModelConfig
    from adapters.modeling.backbone import load_backbone, quantization_config

    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        cfg = ModelConfig(name=str(tiny_llama64_dir), quantization={"bits": 4, "compute_dtype": dtype_name})
        q = quantization_config(cfg)
        assert q.bnb_4bit_quant_storage == q.bnb_4bit_compute_dtype == dtype
        assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    model = load_backbone(ModelConfig(name=str(tiny_llama64_dir), quantization={"bits": 4}), "causal-lm")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and {m.weight.dtype for m in quantized} == {torch.float32}
    assert {m.weight.quant_state.dtype for m in quantized} == {torch.float32}


# ---------------------------------------------------------------- DDP over gloo
def test_ddp_loss_curve_matches_one_process_with_the_same_global_batch(ddp, single):
    assert_same_curve(ddp["run"], single["run"])
    info = json.loads((ddp["run"] / "run_info.json").read_text())
    assert info["num_processes"] == 2 and "MULTI_CPU" in info["distributed_type"]


def test_ddp_shards_the_data_across_ranks(ddp, single):
    assert_sharded_like(ddp["trace"], single["trace"])


def test_ddp_resumed_run_saves_the_uninterrupted_adapter(ddp, single):
    assert (ddp["run"] / "checkpoints" / f"step-{STOP_AT}" / "trainable.safetensors").is_file()
    losses(ddp["run"])  # logged steps 1-3, then 4-6 after the resume
    assert_same_adapter(ddp["run"], single["run"])


# ---------------------------------------------------------------- DeepSpeed
def test_zero2_matches_ddp_and_shards_the_data(zero2, ddp, single):
    assert "DEEPSPEED" in json.loads((zero2["run"] / "run_info.json").read_text())["distributed_type"]
    assert_same_curve(zero2["run"], ddp["run"])
    assert_sharded_like(zero2["trace"], single["trace"])
    assert_same_adapter(zero2["run"], single["run"])


def test_zero3_resumes_from_its_checkpoint_and_matches_ddp(zero3, ddp, single):
    assert zero3["checkpoints_after_interruption"] == [f"step-{STOP_AT}"]
    assert_same_curve(zero3["run"], ddp["run"])
    assert_sharded_like(zero3["trace"], single["trace"])
    # The checkpoint holds what training changes, not the frozen base (a DeepSpeed checkpoint would by default).
    checkpoint = zero3["run"] / "checkpoints" / f"step-{STOP_AT}"
    written = sum(f.stat().st_size for f in checkpoint.rglob("*.pt"))
    model_dir = Path(yaml.safe_load((zero3["run"] / "config.yaml").read_text())["model"]["name"])
    model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    assert 0 < written < model_bytes / 5, (written, model_bytes)


def test_zero3_adapter_is_gathered_complete_and_equals_one_process(zero3, single):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    assert_same_adapter(zero3["run"], single["run"])
    # Counting parameters must see through ZeRO-3's empty placeholders too.
    assert summary(zero3["run"])["total_params"] == summary(single["run"])["total_params"]
    assert summary(zero3["run"])["trainable_params"] == summary(single["run"])["trainable_params"]
    manifest = json.loads((zero3["run"] / "adapter" / "manifest.json").read_text())
    base_dir = manifest["base_model"]["path"]
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(manifest["labels"]))
    model = PeftModel.from_pretrained(base, str(zero3["run"] / "adapter")).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        with model.disable_adapter():
            untouched = model(input_ids=ids).logits
    assert not torch.allclose(trained, untouched), "the ZeRO-3 adapter changes nothing"


def test_zero3_with_cpu_offload_matches_one_process(zero3_offload, ddp, single):
    assert_same_curve(zero3_offload["run"], ddp["run"])
    assert_sharded_like(zero3_offload["trace"], single["trace"])
    assert_same_adapter(zero3_offload["run"], single["run"])


def test_zero3_only_the_main_process_publishes(zero3):
    from adapters.store.store import AdapterStore

    store = AdapterStore(zero3["store"])
    assert store.names() == ["tiny-dist"]
    assert store.versions("tiny-dist") == [1], "each rank published its own copy"
    assert store.verify("tiny-dist@1") == {"tiny-dist@1": []}


def test_best_step_is_restored_under_every_launcher(single, ddp, zero2, zero3):
    """The adapters above equal the reference's, which restored an earlier step: so did every run."""
    rows = [json.loads(line) for line in (single["run"] / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval_accuracy" in r}
    best_step = max(evals, key=lambda step: (evals[step]["eval_accuracy"], -step))
    assert best_step < STEPS, f"the reference run has nothing to restore (evaluations: {evals})"
    for run in (single, ddp, zero2, zero3):
        final = summary(run["run"])["metrics"]["validation"]["eval_loss"]
        assert final == pytest.approx(evals[best_step]["eval_loss"], rel=1e-4), run["run"].name


def test_qlora_under_zero3_trains_and_saves_like_one_process(qlora_zero3, qlora_single):
    assert_same_curve(qlora_zero3["run"], qlora_single["run"])
    assert_sharded_like(qlora_zero3["trace"], qlora_single["trace"])
    assert_same_adapter(qlora_zero3["run"], qlora_single["run"])
    manifest = json.loads((qlora_zero3["run"] / "adapter" / "manifest.json").read_text())
    assert manifest["base_model"]["quantization"]["bits"] == 4
