#!/usr/bin/env python
"""SFT training speed, ours vs TRL's SFTTrainer + peft, on the same model, LoRA, data, batch and steps.

    .venv/bin/python benchmarks/sft_throughput.py [--steps 30] [--repeats 3] [--packing]

Both train SmolLM2-135M-Instruct (the built-in smollm2-135m-instruct, fp32) with LoRA r=8, alpha 16,
dropout 0.1 on q_proj and v_proj of every block, on the same 1,000 TREC training rows (question ->
question-type word, the system prompt "Classify the question type."), batch 8, the same learning rate,
linear schedule, clipping, seed and torch threads:

(a) ours: adapters.training.loop.train from a config (what scripts/train.py runs);
(b) TRL: trl.SFTTrainer with peft_config, the rows as a conversational prompt-completion dataset
    (loss on the completion only, TRL's default for such data), SFTConfig defaults otherwise.

With --packing, both pack rows: ours train.packing: true, TRL packing=True (its default "bfd"
strategy, padding-free). Each run is its own process (fresh memory high-water mark, no warm caches
shared), and runs alternate (TRL, ours, TRL, ours ...) since a shared machine's load drifts.

Reported per side: real (non-padding) tokens per second of training (model loading, tokenization and
evaluation outside the timed region), model FLOP utilisation against a fp32 matmul peak measured in
the same process (adapters.benchmarking.flops; the same model FLOPs per token for both), the peak
memory (RSS high-water mark; CUDA max allocated on a GPU), and exact match of greedy answers on the
same 200 held-out test rows after the fixed budget of steps. Also: per-repeat ratios, the load
average before and after, the command and the date. Results: benchmarks/results/sft_throughput.{json,md}
(one section per mode, padded or packed; a run of one mode keeps the other's section).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SYSTEM_PROMPT = "Classify the question type."
MODEL = "smollm2-135m-instruct"
SIDES = ("trl", "ours")


def run_config(args, run_dir: str):
    """Our run's config; also the source of both sides' splits (same rows, same seed)."""
    from adapters.config import load_config

    return load_config(
        raw={
            "task": "causal-lm",
            "model": {"name": MODEL, "dtype": "float32"},
            "data": {
                "name": "trec",
                "system_prompt": SYSTEM_PROMPT,
                "max_length": args.max_length,
                "max_train_samples": args.train_rows,
                "max_eval_samples": 16,
                "max_test_samples": args.test_rows,
            },
            "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
            "train": {
                "batch_size": args.batch_size,
                "max_steps": args.steps,
                "lr": args.lr,
                "scheduler": "linear",
                "warmup_ratio": 0.0,
                "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                "seed": args.seed,
                "log_every": args.steps,
                "eval_batch_size": 32,
                "packing": args.packing,
            },
            "eval": {"max_new_tokens": args.max_new_tokens, "baseline": False},
            "output": {"run_dir": run_dir, "name": "sft-throughput-ours"},
        }
    )


def splits(args):
    """(config, prepared splits, tokenized splits, our tokenizer), as our loop makes them."""
    from adapters.data.loading import prepare_splits, tokenize_splits
    from adapters.modeling.backbone import load_tokenizer

    cfg = run_config(args, tempfile.gettempdir())
    prepared = prepare_splits(cfg)
    tokenizer = load_tokenizer(cfg.model)
    return cfg, prepared, tokenize_splits(prepared, cfg, tokenizer), tokenizer


# ---------------------------------------------------------------- one side, in its own process
def worker(args) -> dict:
    import torch

    from adapters.benchmarking.flops import effective_seq_len, measure_peak_flops

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    peak = measure_peak_flops()
    cfg, prepared, tokenized, tokenizer = splits(args)
    seq_len = effective_seq_len(tokenized["train"]["length"])
    started = time.perf_counter()
    out = (_worker_ours if args.worker == "ours" else _worker_trl)(args, cfg, prepared, tokenized, tokenizer, seq_len)
    out.update(
        side=args.worker,
        peak_flops=peak,
        attention_seq_len=seq_len,
        mfu=out["real_tokens_per_second"] * out["flops_per_token"]["total"] / peak["flops_per_second"],
        torch_threads=torch.get_num_threads(),
        worker_wall_seconds=time.perf_counter() - started,
        load_average_start=[round(x, 2) for x in load_start],
        load_average_end=[round(x, 2) for x in os.getloadavg()],
    )
    return out


def _memory() -> dict:
    from adapters.benchmarking.flops import peak_memory_bytes

    return peak_memory_bytes()


def _worker_ours(args, cfg, prepared, tokenized, tokenizer, seq_len) -> dict:
    from adapters.benchmarking.flops import count_training_flops
    from adapters.training.loop import train

    seen = {}

    def on_model_ready(model):
        seen["flops"] = count_training_flops(model, seq_len).to_dict()

    with tempfile.TemporaryDirectory(prefix="sft-throughput-ours-") as tmp:
        cfg = run_config(args, tmp)
        result = train(cfg, command=["benchmarks/sft_throughput.py"], on_model_ready=on_model_ready)
        memory = _memory()  # the high-water mark includes the final evaluation, as TRL's below does
    seconds = result.train_seconds - result.eval_seconds
    return {
        "steps": result.steps,
        "train_seconds": seconds,
        "real_tokens": result.tokens_seen,
        "samples": result.samples_seen,
        "real_tokens_per_second": result.tokens_seen / seconds,
        "exact_match": result.metrics["adapted"]["exact_match"],
        "trainable_params": result.trainable_params,
        "flops_per_token": seen["flops"],
        "peak_memory": memory,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "how": f"adapters.training.loop.train (model.gradient_checkpointing: {cfg.model.gradient_checkpointing}"
        + (", train.packing: true)" if args.packing else ")"),
    }


def _worker_trl(args, cfg, prepared, tokenized, tokenizer, seq_len) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from adapters.benchmarking.flops import count_training_flops
    from adapters.benchmarking.sidebyside import CountingCollator, train_clock, version
    from adapters.evaluation.evaluator import generate_scored_answers
    from adapters.evaluation.metrics import exact_match
    from adapters.modeling.builtins import resolve_model

    texts, targets = prepared.splits["train"]["text"], tokenized["train"]["target"]
    if len(texts) != len(targets):
        raise SystemExit(f"tokenizing dropped rows ({len(texts)} -> {len(targets)}): raise --max-length")
    rows = Dataset.from_list(
        [
            {
                "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}],
                "completion": [{"role": "assistant", "content": target}],
            }
            for text, target in zip(texts, targets)
        ]
    )
    path = resolve_model(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    clock = train_clock()
    with tempfile.TemporaryDirectory(prefix="sft-throughput-trl-") as tmp:
        sft_args = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=args.seed,
            use_cpu=not torch.cuda.is_available(),
            save_strategy="no",
            report_to=[],
            logging_steps=args.steps,
            disable_tqdm=True,
            dataloader_num_workers=0,
            max_length=args.max_length,
            packing=args.packing,
            # None keeps SFTConfig's default (on in TRL 1.x: recomputes the forward in backward)
            **(
                {}
                if args.trl_gradient_checkpointing is None
                else {"gradient_checkpointing": args.trl_gradient_checkpointing}
            ),
        )
        peft_config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
        trainer = SFTTrainer(
            model=model,
            args=sft_args,
            train_dataset=rows,
            processing_class=AutoTokenizer.from_pretrained(path),
            peft_config=peft_config,
            callbacks=[clock],
        )
        flops = count_training_flops(trainer.model, seq_len).to_dict()
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        trainer.train()
        trained = trainer.model
        trained.eval()
        predictions, _ = generate_scored_answers(
            trained,
            tokenizer,
            list(tokenized["test"]["prompt_ids"]),
            trained.device,
            cfg.train.eval_batch_size,
            args.max_new_tokens,
        )
        memory = _memory()
    return {
        "steps": args.steps,
        "train_seconds": clock.seconds,
        "real_tokens": counter.real,
        "computed_tokens": counter.computed,
        "samples": counter.rows,
        "real_tokens_per_second": counter.real / clock.seconds,
        "exact_match": exact_match(predictions, list(tokenized["test"]["target"])),
        "trainable_params": sum(p.numel() for p in trained.parameters() if p.requires_grad),
        "flops_per_token": flops,
        "peak_memory": memory,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "how": f"trl {version('trl')} SFTTrainer + peft_config (SFTConfig defaults but the shared settings: "
        f"gradient_checkpointing={trainer.args.gradient_checkpointing}, packing={args.packing}, "
        f"padding_free={trainer.args.padding_free or args.packing}, attention "
        f"{getattr(trained.config, '_attn_implementation', '?')})",
    }


# ---------------------------------------------------------------- the alternating runs
def run_side(side: str, args, argv: list[str], work: Path, index: int) -> dict:
    """Run one side in a fresh process; returns its result dict, or exits with the log's tail."""
    result = work / f"{side}-{index}.json"
    if result.is_file():  # --work of an interrupted run: the same settings (the folder is per settings)
        return json.loads(result.read_text())
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", side, "--result", str(result)]
    cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (work / f"{side}-{index}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result.is_file():
        print((proc.stdout + proc.stderr)[-4000:], file=sys.stderr)
        raise SystemExit(f"{side} run {index + 1} failed (exit {proc.returncode}); log: {work / f'{side}-{index}.log'}")
    return json.loads(result.read_text())


def summarize(args, runs: dict[str, list[dict]], load_start, command: str) -> dict:
    from adapters.benchmarking.flops import load_average
    from adapters.benchmarking.sidebyside import median_run
    from adapters.benchmarking.suite import environment

    # MFU counts model FLOPs (Chowdhery et al. 2022): what the model needs, not what an implementation
    # does. TRL's gradient checkpointing makes the embeddings' output require a gradient (its probe sees
    # input gradients below the lowest LoRA layer); the smaller, necessary count serves both sides.
    model_flops = min(r["flops_per_token"]["total"] for side in SIDES for r in runs[side])
    for run in (r for side in SIDES for r in runs[side]):
        run["mfu"] = run["real_tokens_per_second"] * model_flops / run["peak_flops"]["flops_per_second"]
        run["model_flops_per_token"] = model_flops
    ours, trl = median_run(runs["ours"]), median_run(runs["trl"])
    tps = {side: statistics.median(r["real_tokens_per_second"] for r in runs[side]) for side in SIDES}
    return {
        "settings": {
            "model": MODEL,
            "dtype": "float32",
            "method": "lora r=8 alpha=16 dropout=0.1 on q_proj,v_proj of every block",
            "data": f"trec, {args.train_rows} training rows, {args.test_rows} test rows",
            "packing": args.packing,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "lr": args.lr,
            "seed": args.seed,
            "repeats": args.repeats,
            "threads": args.threads,
            "trl_gradient_checkpointing": "SFTConfig default"
            if args.trl_gradient_checkpointing is None
            else args.trl_gradient_checkpointing,
        },
        "ratio": tps["ours"] / tps["trl"],
        "ratios_per_repeat": [
            o["real_tokens_per_second"] / t["real_tokens_per_second"] for o, t in zip(runs["ours"], runs["trl"])
        ],
        "real_tokens_per_second_median": tps,
        "ours": ours,
        "trl": trl,
        "runs": runs,
        "environment": environment(),
        # the first run's start and the last one's end (the workers' own, when a --work folder was reused)
        "load_average_start": runs["trl"][0].get("load_average_start", load_start),
        "load_average_end": runs["ours"][-1].get("load_average_end", load_average()),
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _mib(memory: dict) -> str:
    value = memory.get("cuda_max_allocated_bytes") or memory["rss_high_water_bytes"]
    return f"{value / 2**20:.0f} MiB"


def _flops_line(run: dict) -> str:
    f = run["flops_per_token"]
    return (
        f"{f['total'] / 1e6:.1f} M (matmuls: forward {f['forward'] / 1e6:.1f} M, input gradients "
        f"{f['input_grad'] / 1e6:.1f} M, weight gradients {f['weight_grad'] / 1e6:.2f} M; attention "
        f"{(f['attention_forward'] + f['attention_backward']) / 1e6:.2f} M over a context of "
        f"{run['attention_seq_len']:.1f} tokens)"
    )


def markdown(report: dict) -> str:
    from adapters.benchmarking.sidebyside import version

    lines = ["# SFT throughput: adapterkit vs TRL SFTTrainer + peft", ""]
    for mode in ("padded", "packed"):
        if "settings" not in report.get(mode, {}):
            continue  # absent, or a section this script did not write
        r = report[mode]
        s, o, t = r["settings"], r["ours"], r["trl"]
        peak = o["peak_flops"]
        lines += [
            f"## {'Packing on for both' if s['packing'] else 'Padded batches (no packing)'}",
            "",
            f"SmolLM2-135M-Instruct ({s['dtype']}) + {s['method']}; {s['data']}; batch {s['batch_size']}, "
            f"max length {s['max_length']}, {s['steps']} optimizer steps, lr {s['lr']} linear, seed {s['seed']}, "
            f"{s['threads']} torch threads. Median of {s.get('repeats_done', s['repeats'])} alternating runs per side, each its own "
            "process. Real tokens = non-padding tokens; model loading, tokenization and evaluation are outside "
            "the timed region. Exact match: greedy answers on the same held-out test rows after the fixed budget.",
            "",
            "| | real tokens/s | MFU | model GFLOP/s | peak memory (RSS high-water) | train time | held-out exact match |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, run in (("TRL SFTTrainer + peft", t), ("ours (adapters.training.loop.train)", o)):
            achieved = run["real_tokens_per_second"] * run["model_flops_per_token"]
            lines.append(
                f"| {name} | {run['real_tokens_per_second']:.0f} | {100 * run['mfu']:.1f}% | {achieved / 1e9:.1f} | "
                f"{_mib(run['peak_memory'])} | {run['train_seconds']:.1f} s | {run['exact_match']:.3f} |"
            )
        lines += [
            "",
            f"**Ratio (ours / TRL, median real tokens/s): {r['ratio']:.2f}x.** Per-repeat ratios: "
            + ", ".join(f"{x:.2f}" for x in r["ratios_per_repeat"])
            + ".",
            "",
            f"- model FLOPs per trained token: {_flops_line(o)}; {o['flops_per_token']['formula']}",
            f"- peak: {peak['flops_per_second'] / 1e9:.0f} GFLOP/s ({peak['dtype']} {peak['size']}x{peak['size']} "
            f"matmul, {peak['threads']} threads, best of {peak['repeats']}, measured in each run's process; "
            f"TRL's runs measured {t['peak_flops']['flops_per_second'] / 1e9:.0f})",
            f"- TRL: {t['how']}; ours: {o['how']}",
            f"- machine: {r['environment']['cpu']} ({r['environment']['cpu_count']} cores), torch "
            f"{r['environment']['versions'].get('torch')}, transformers {r['environment']['versions'].get('transformers')}, "
            f"peft {r['environment']['versions'].get('peft')}, trl {version('trl')}",
            f"- load average (1, 5, 15 min): {r['load_average_start']} before, {r['load_average_end']} after",
            f"- command: `{r['command']}` ({r['date']})",
            "",
        ]
    return "\n".join(lines)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--test-rows", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=3, help="the longest label word is 3 tokens")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; medians reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of both sides")
    parser.add_argument("--packing", action="store_true", help="both pack rows (TRL packing=True, ours train.packing)")
    parser.add_argument(
        "--trl-gradient-checkpointing",
        type=lambda v: {"on": True, "off": False}[v],
        metavar="{on,off}",
        help="TRL's gradient_checkpointing (default: SFTConfig's default, on in TRL 1.x)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sft_throughput"))
    parser.add_argument(
        "--work",
        type=Path,
        help="folder for the runs' results and logs (default: a new temporary one); a folder holding "
        "SIDE-I.json from an interrupted run of the same settings reuses them",
    )
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.worker:
        args.result.write_text(json.dumps(worker(args), indent=2, default=str))
        return 0
    from adapters.benchmarking.flops import load_average

    command = shlex.join([".venv/bin/python", "benchmarks/sft_throughput.py", *argv])
    load_start = load_average()
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    work = args.work or Path(tempfile.mkdtemp(prefix="sft-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"worker results and logs: {work}", flush=True)
    for i in range(args.repeats):
        for side in SIDES:
            runs[side].append(run_side(side, args, _worker_argv(argv), work, i))
            run = runs[side][-1]
            print(
                f"{side:4s} #{i + 1}: {run['real_tokens_per_second']:.0f} real tokens/s, peak "
                f"{run['peak_flops']['flops_per_second'] / 1e9:.0f} GFLOP/s, exact match {run['exact_match']:.3f}",
                flush=True,
            )
        # after every pair, so that a stopped run keeps the repeats it finished
        report = write_report(args, runs, load_start, command)
    print(markdown(report))
    return 0


def _worker_argv(argv: list[str]) -> list[str]:
    """argv without --work/--out (a worker needs neither)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in ("--work", "--out"):
            skip = True
        elif not item.startswith(("--work=", "--out=")):
            out.append(item)
    return out


def write_report(args, runs: dict, load_start, command: str) -> dict:
    """Merge this mode's summary into OUT.json (the other mode's section is kept) and write OUT.md; atomic."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    report = {k: v for k, v in previous.items() if k in ("padded", "packed")}
    summary = summarize(args, runs, load_start, command)
    summary["settings"]["repeats_done"] = len(runs["ours"])
    report["packed" if args.packing else "padded"] = summary
    for suffix, text in ((".json", json.dumps(report, indent=2, default=str) + "\n"), (".md", markdown(report))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out.with_suffix(suffix))
    return report


if __name__ == "__main__":
    sys.exit(main())
