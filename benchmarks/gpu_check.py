#!/usr/bin/env python3
"""GPU check: a 1B-class Llama (random weights) trained with LoRA (bf16) and QLoRA (4-bit NF4), ours vs
TRL's SFTTrainer + peft, side by side: real tokens/s, peak GPU memory and model FLOP utilisation (MFU)
against the GPU's dense bf16 peak, measured with a matmul in each run's process.

One command on a machine with one NVIDIA GPU and no internet (wheels and tokenizer from
benchmarks/gpu_wheels.sh), about 6-8 minutes on an H100/H200:

    python3 benchmarks/gpu_check.py --wheels .whl --out benchmarks/results/gpu_check.json

--dry-run runs the same code on a CPU with a tiny Llama (2 layers, hidden 64), 2 steps, float32, in
this process (no timings worth reading), so the script is known to work before GPU time is spent.

The model: Llama-3.2-1B's shape (hidden 2048, 16 blocks, 32 heads, 8 key/value heads, MLP 8192, tied
embeddings) with SmolLM2's tokenizer (vocabulary 49,152): 1.07B parameters, built with random weights
once and saved (real weights cannot travel; speed and memory depend on shapes, not values). The data:
synthetic prompt/response rows of --seq-len tokens at most (words drawn with a fixed seed; 70-85% prompt),
the loss on the response only, as both do for prompt-completion data. Both sides get the same rows,
LoRA (r=16, alpha 32, no dropout, every attention and MLP projection), batch, steps, learning rate and
schedule; each runs in its own process (fresh CUDA memory statistics), TRL first, then ours.
TRL keeps SFTConfig's defaults otherwise (gradient checkpointing on in TRL 1.x; --trl-gradient-checkpointing
off turns it off), and ours its config defaults (no gradient checkpointing; --gradient-checkpointing on).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# torch, transformers and adapters are imported inside functions: main() first installs the carried
# wheels and sets the offline and cache variables that those packages read when they are imported.

VARIANTS = {"lora-bf16": False, "qlora-4bit": True}  # name: quantized
SIDES = ("trl", "ours")
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}
TINY = {**LLAMA_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY["num_key_value_heads"] = 2
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "pydantic")
REQUIRED = {"transformers": "5.23.0", "peft": "0.21.", "trl": "1.16."}
SITE_ENV = "ADAPTERKIT_GPU_CHECK_SITE"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be or has had not but "
    "what all when who will more if no out so said can there their one about would up them into time only new some "
    "could these two may first then do any like my now over such our man me even most made after also did many off "
    "before must well back through years much where your way down should because each just those people how too "
    "little state good very make world still own see men work long get here between both life being under never day "
    "same another know while last might us great old year since against go came right used take three question answer"
).split()


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
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    subprocess.run([*pip, "--upgrade", "--target", str(site), *wheels], check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env[SITE_ENV] = str(site)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


# ---------------------------------------------------------------- model and data (parent)
def tokenizer_folder(wheel_dir: Path) -> Path:
    """SmolLM2's tokenizer: carried in .whl/ for the GPU machine, else the built-in's folder here."""
    carried = wheel_dir / "smollm2-135m-instruct-config"
    if (carried / "tokenizer.json").is_file():
        return carried
    try:
        from adapters.modeling.builtins import resolve_model

        return Path(resolve_model("smollm2-135m-instruct"))
    except Exception as err:  # noqa: BLE001 - any failure means: no tokenizer here
        raise SystemExit(f"no tokenizer: {carried} is missing (run benchmarks/gpu_wheels.sh) and {err}") from err


def build_model(work: Path, tok_dir: Path, dry_run: bool) -> tuple[Path, dict]:
    """Save a random-weight Llama of LLAMA_1B's shape (TINY for a dry run) with SmolLM2's tokenizer;
    returns (folder, {"params", "shape"}). Built on the GPU when there is one (seconds, not minutes)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = TINY if dry_run else LLAMA_1B
    out = work / ("llama-tiny-random" if dry_run else "llama-1b-random")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    if not (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").is_file():
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.float32 if dry_run else torch.bfloat16)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        del model
    params = sum(
        p
        for p in (
            config.vocab_size * config.hidden_size,
            config.num_hidden_layers
            * (
                2 * config.hidden_size * config.hidden_size
                + 2 * config.hidden_size * config.hidden_size * config.num_key_value_heads // config.num_attention_heads
                + 3 * config.hidden_size * config.intermediate_size
            ),
        )
    )
    return out, {"params_without_norms": params, "shape": shape, "vocab_size": config.vocab_size}


def build_data(work: Path, model_dir: Path, seq_len: int, rows: int) -> tuple[Path, float]:
    """Synthetic prompt/response rows (JSONL: text, response) that fit seq_len tokens with the chat
    template; returns (path, the attention context sum(L^2)/sum(L) of the rows)."""
    from transformers import AutoTokenizer

    from adapters.benchmarking.flops import effective_seq_len

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(0)
    path, lengths = work / f"synthetic-{seq_len}.jsonl", []
    empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    room = seq_len - len(tokenizer.apply_chat_template(empty, tokenize=True, return_dict=True)["input_ids"])
    with open(path, "w") as fh:
        for _ in range(rows):
            words = max(2, rng.randint(int(0.80 * room), int(0.95 * room)) * 3 // 4)  # ~1.3 tokens per word
            split = int(words * rng.uniform(0.70, 0.85))
            text = " ".join(rng.choice(WORDS) for _ in range(split))
            response = " ".join(rng.choice(WORDS) for _ in range(words - split))
            messages = [{"role": "user", "content": text}, {"role": "assistant", "content": response}]
            n = len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
            if n > seq_len:
                continue
            lengths.append(n)
            fh.write(json.dumps({"text": text, "response": response}) + "\n")
    if not lengths:
        raise SystemExit(f"no synthetic row fits --seq-len {seq_len}")
    return path, effective_seq_len(lengths)


# ---------------------------------------------------------------- one side (worker)
def job_config(job: dict) -> dict:
    """Our run's config for a job (also the source of the shared settings)."""
    dtype = job["dtype"]
    cfg = {
        "task": "causal-lm",
        "model": {"name": job["model"], "dtype": dtype, "gradient_checkpointing": job["gradient_checkpointing"]},
        "data": {
            "name": job["data"],
            "response_field": "response",
            "max_length": job["seq_len"],
            "max_train_samples": job["batch_size"] * job["steps"],
            "max_eval_samples": 4,
            "max_test_samples": 4,
            "dedupe": False,
            "split": {"kind": "random"},
        },
        "method": {"name": "lora", **LORA, "target_modules": "all"},
        "train": {
            "lr": 1e-4,
            "batch_size": job["batch_size"],
            "max_steps": job["steps"],
            "scheduler": "constant",
            "log_every": job["steps"],
            "seed": 42,
            "mixed_precision": "bf16" if dtype == "bfloat16" else "no",
            "eval_batch_size": 4,
        },
        "eval": {"max_new_tokens": 2, "baseline": False},
        "output": {"name": f"gpu-check-{job['variant']}", "run_dir": str(Path(job["work"]) / job["variant"])},
    }
    if job["quantized"]:
        cfg["model"]["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": dtype}
    return cfg


def worker(job: dict) -> dict:
    """Train one side of one variant; returns tokens/s, memory, MFU and the loss of the last step."""
    import torch

    from adapters.benchmarking.flops import measure_peak_flops, peak_memory_bytes

    peak = measure_peak_flops()  # bf16 8192^3 on CUDA, fp32 2048^3 on CPU
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    out = (_train_ours if job["side"] == "ours" else _train_trl)(job)
    memory = peak_memory_bytes()
    out.update(
        side=job["side"],
        variant=job["variant"],
        peak_flops=peak,
        peak_memory=memory,
        peak_memory_bytes=memory.get("cuda_max_allocated_bytes", memory["rss_high_water_bytes"]),
        mfu=out["real_tokens_per_second"] * out["flops_per_token"]["total"] / peak["flops_per_second"],
    )
    return out


def _train_ours(job: dict) -> dict:
    from adapters.benchmarking.flops import count_training_flops
    from adapters.config import load_config
    from adapters.training.loop import train

    seen = {}

    def on_model_ready(model):
        seen["flops"] = count_training_flops(model, job["attention_seq_len"]).to_dict()

    result = train(load_config(raw=job_config(job)), on_model_ready=on_model_ready)
    losses = [h["loss"] for h in result.history if "loss" in h]
    seconds = result.train_seconds - result.eval_seconds
    return {
        "steps": result.steps,
        "train_seconds": seconds,
        "real_tokens": result.tokens_seen,
        "real_tokens_per_second": result.tokens_seen / seconds,
        "trainable_params": result.trainable_params,
        "last_loss": losses[-1] if losses else None,
        "flops_per_token": seen["flops"],
        "how": f"adapters.training.loop.train (gradient_checkpointing={job['gradient_checkpointing']})",
    }


def _train_trl(job: dict) -> dict:
    import tempfile

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from adapters.benchmarking.flops import count_training_flops
    from adapters.benchmarking.sidebyside import CountingCollator, train_clock

    dtype = getattr(torch, job["dtype"])
    rows = load_dataset("json", data_files=job["data"], split="train").select(range(job["batch_size"] * job["steps"]))
    rows = rows.map(
        lambda r: {
            "prompt": [{"role": "user", "content": r["text"]}],
            "completion": [{"role": "assistant", "content": r["response"]}],
        },
        remove_columns=rows.column_names,
    )
    kwargs = {"dtype": dtype}
    if job["quantized"]:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(job["model"], **kwargs)
    clock = train_clock()
    extra = (
        {}
        if job["trl_gradient_checkpointing"] is None
        else {"gradient_checkpointing": job["trl_gradient_checkpointing"]}
    )
    with tempfile.TemporaryDirectory(prefix="gpu-check-trl-") as tmp:
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(
                output_dir=tmp,
                per_device_train_batch_size=job["batch_size"],
                max_steps=job["steps"],
                learning_rate=1e-4,
                lr_scheduler_type="constant",
                seed=42,
                bf16=job["dtype"] == "bfloat16",
                use_cpu=not torch.cuda.is_available(),
                save_strategy="no",
                report_to=[],
                logging_steps=job["steps"],
                disable_tqdm=True,
                max_length=job["seq_len"],
                **extra,
            ),
            train_dataset=rows,
            processing_class=AutoTokenizer.from_pretrained(job["model"]),
            peft_config=LoraConfig(
                r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear"
            ),
            callbacks=[clock],
        )
        flops = count_training_flops(trainer.model, job["attention_seq_len"]).to_dict()
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        output = trainer.train()
    return {
        "steps": job["steps"],
        "train_seconds": clock.seconds,
        "real_tokens": counter.real,
        "real_tokens_per_second": counter.real / clock.seconds,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "last_loss": output.training_loss,
        "flops_per_token": flops,
        "how": f"trl SFTTrainer + peft (gradient_checkpointing={trainer.args.gradient_checkpointing})",
    }


def run_job(job: dict, work: Path, timeout: int, in_process: bool) -> dict:
    """One side of one variant: in a fresh process (GPU: fresh memory statistics), or here (dry run)."""
    name = f"{job['variant']}-{job['side']}"
    started = time.perf_counter()
    if in_process:
        result = worker(job)
    else:
        from adapters.benchmarking.sidebyside import run_in_process

        (work / f"{name}.job.json").write_text(json.dumps(job))
        result_path = work / f"{name}.result.json"
        result_path.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(work / f"{name}.job.json")]
        cmd += ["--result", str(result_path)]
        result = run_in_process(cmd, result_path, work / f"{name}.log", REPO, timeout=timeout)
    result["wall_seconds"] = time.perf_counter() - started
    if "error" in result:
        print(f"{name:20s} FAILED ({result['error']}) after {result['wall_seconds']:.0f} s", flush=True)
    else:
        print(
            f"{name:20s} {result['real_tokens_per_second']:10.0f} tok/s  peak "
            f"{result['peak_memory_bytes'] / 2**20:8.0f} MiB  MFU {100 * result['mfu']:5.1f}%  "
            f"({result['wall_seconds']:.0f} s)",
            flush=True,
        )
    return result


def compare(variants: dict) -> dict:
    """ours / TRL per variant: tokens/s ratio (goal >= 1.6) and peak memory ratio (goal <= 0.7)."""
    out = {}
    for name, sides in variants.items():
        ours, trl = sides.get("ours", {}), sides.get("trl", {})
        if "real_tokens_per_second" in ours and "real_tokens_per_second" in trl:
            out[name] = {
                "tokens_per_second_ratio": ours["real_tokens_per_second"] / trl["real_tokens_per_second"],
                "peak_memory_ratio": ours["peak_memory_bytes"] / trl["peak_memory_bytes"],
            }
    return out


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--wheels", type=Path, default=REPO / ".whl", help="folder of carried wheels + tokenizer (gpu_wheels.sh)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (dry run: 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step (dry run: 2)")
    parser.add_argument("--seq-len", type=int, default=1536, help="longest row in tokens (dry run: 128)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of trl, ours")
    on_off = {"on": True, "off": False}
    parser.add_argument("--gradient-checkpointing", choices=on_off, default="off", help="ours")
    parser.add_argument(
        "--trl-gradient-checkpointing", choices=on_off, help="TRL's (default: SFTConfig's default, on in TRL 1.x)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/adapterkit-gpu-check"))
    parser.add_argument("--timeout", type=int, default=150, help="seconds per run at most")
    parser.add_argument("--budget", type=int, default=450, help="seconds for the whole check: later runs are skipped")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny Llama, float32, 2 steps, in this process")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        args.result.write_text(json.dumps(worker(json.loads(args.worker.read_text())), indent=2, default=str))
        return 0
    started = time.perf_counter()
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.dry_run:  # a bare machine: a cache of our own (here, the built-in tokenizer's cache is reused)
        os.environ.setdefault("ADAPTERKIT_CACHE", str(args.work / "cache"))
    if SITE_ENV not in os.environ and args.wheels.is_dir() and not args.dry_run:
        install_wheels(args.wheels, args.work / "site")  # re-runs this script when it installs anything

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --dry-run to check the script on a CPU")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for flag, chosen, valid in (("--variants", variants, VARIANTS), ("--sides", sides, SIDES)):
        unknown = [v for v in chosen if v not in valid]
        if unknown:
            raise SystemExit(f"{flag}: unknown {unknown}; valid: {', '.join(valid)}")
    steps, batch, seq_len = (2, 2, 128) if args.dry_run else (args.steps, args.batch_size, args.seq_len)
    model_dir, model_info = build_model(args.work, tokenizer_folder(args.wheels), args.dry_run)
    data, context = build_data(args.work, model_dir, seq_len, rows=max(batch * steps + 16, int(batch * steps * 1.2)))
    report = {
        "command": " ".join(["python3", *(sys.argv if argv is None else ["benchmarks/gpu_check.py", *argv])]),
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "versions": versions(),
        "model": {"path": str(model_dir), "weights": "random (shapes only)", **model_info},
        "data": {"path": str(data), "attention_context_tokens": context, "max_length": seq_len},
        "settings": {"steps": steps, "batch_size": batch, "lora": LORA, "target_modules": "every projection"},
        "variants": {},
    }
    print(f"device: {report['device']}; model {model_info['params_without_norms'] / 1e9:.2f}B parameters", flush=True)
    budget = args.budget if not args.dry_run else 3600
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        for side in sides:
            left = budget - (time.perf_counter() - started)
            slot = report["variants"].setdefault(variant, {})
            if left < 30:
                slot[side] = {"error": f"skipped: the {budget} s budget is spent"}
                continue
            job = {
                "side": side,
                "variant": variant,
                "quantized": VARIANTS[variant],
                "model": str(model_dir),
                "data": str(data),
                "dtype": "float32" if args.dry_run else "bfloat16",
                "seq_len": seq_len,
                "attention_seq_len": context,
                "batch_size": batch,
                "steps": steps,
                "gradient_checkpointing": args.gradient_checkpointing == "on",
                "trl_gradient_checkpointing": None
                if args.trl_gradient_checkpointing is None
                else args.trl_gradient_checkpointing == "on",
                "work": str(args.work),
            }
            slot[side] = run_job(job, args.work, int(min(left, args.timeout)), in_process=args.dry_run)
            report["comparison"] = compare(report["variants"])
            report["total_seconds"] = time.perf_counter() - started
            args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")  # a kill keeps what ran
    print(f"wrote {args.out} ({report['total_seconds']:.0f} s): {json.dumps(report['comparison'])}")
    return 0 if all("error" not in r for v in report["variants"].values() for r in v.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
