#!/usr/bin/env python
"""Training speed, ours vs the plain Hugging Face way, on the same model, data, method and steps.

    .venv/bin/python benchmarks/throughput.py [--steps 80] [--batch-size 32] [--max-length 64] [--repeats 2]

Both train MiniLM-L6 (built-in minilm-l6) with LoRA r=8 on query/value on the same TREC training
rows, with the same batch size, truncation length, learning rate, schedule, clipping and seed:

(a) ours: adapters.training.loop.train (the scripts/train.py path): length-grouped batches, SDPA,
    mean pooling as the sentence encoder was trained;
(b) plain: transformers Trainer + peft's get_peft_model on AutoModelForSequenceClassification,
    DataCollatorWithPadding (dynamic padding, random order), Trainer defaults otherwise.

It reports real (non-padding) tokens per second of training for each (tokenization, model loading
and evaluation outside the timed region), the padding share, the ratio, and held-out test
accuracy of both; with --profile, where the time goes in each (torch.profiler, top operators).
Runs alternate (plain, ours, plain, ours ...) and the median of the repeats is reported, since
a shared machine's load changes over time. Results: benchmarks/results/throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from torch.profiler import ProfilerActivity  # noqa: E402
from torch.profiler import profile as torch_profile  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from adapters.benchmarking.flops import (  # noqa: E402
    count_training_flops,
    effective_seq_len,
    load_average,
    measure_peak_flops,
)
from adapters.benchmarking.suite import PeakMemory, environment  # noqa: E402
from adapters.config import load_config  # noqa: E402
from adapters.data.loading import prepare_splits, tokenize_splits, train_dataloader  # noqa: E402
from adapters.modeling.backbone import load_tokenizer  # noqa: E402
from adapters.modeling.builtins import resolve_model  # noqa: E402
from adapters.training.loop import train  # noqa: E402


def run_config(args, run_dir: str):
    return load_config(
        raw={
            "task": "sequence-classification",
            "model": {"name": "minilm-l6"},
            "data": {"name": "trec", "max_length": args.max_length},
            "method": {
                "name": "lora",
                "options": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["query", "value"]},
            },
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
            },
            "eval": {"baseline": False},
            "output": {"run_dir": run_dir, "name": "throughput-ours"},
        }
    )


def padded_tokens_ours(cfg) -> int:
    """Tokens (with padding) in the batches our loop sees in these steps: same sampler, same seed."""
    prepared = prepare_splits(cfg)
    tokenizer = load_tokenizer(cfg.model)
    tokenized = tokenize_splits(prepared, cfg, tokenizer)
    dl = train_dataloader(
        tokenized["train"], cfg.task, tokenizer, cfg.train.batch_size, cfg.train.seed, cfg.train.group_by_length
    )
    total = 0
    for i, batch in enumerate(dl):
        if i >= cfg.train.max_steps:
            break
        total += batch["input_ids"].numel()
    return total


def train_ours(args, profile: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="throughput-ours-") as tmp:
        cfg = run_config(args, tmp)
        if profile:
            return {"profile": _profile_our_loop(cfg, args.profile_rows)}
        seen = {}

        def note_model(model):
            seen["attn_implementation"] = _attn_implementation(model)
            seen["optimizer"] = "torch.optim.AdamW (fused when available, see adapters/training/setup.py)"
            seen["flops_per_token"] = count_training_flops(model, **probe).to_dict()

        probe = flops_probe(args)
        peak = measure_peak_flops()
        with PeakMemory() as memory:
            result = train(cfg, command=["benchmarks/throughput.py"], on_model_ready=note_model)
        seconds = result.train_seconds - result.eval_seconds
        return {
            "steps": result.steps,
            "train_seconds": seconds,
            "real_tokens": result.tokens_seen,
            "samples": result.samples_seen,
            "real_tokens_per_second": result.tokens_seen / seconds,
            "samples_per_second": result.samples_seen / seconds,
            "test_accuracy": result.metrics["adapted"]["accuracy"],
            "trainable_params": result.trainable_params,
            "peak_flops": peak,
            "peak_memory": {"kind": memory.kind, "bytes": memory.peak},
            **seen,
        }


def _attn_implementation(model) -> str:
    for module in model.modules():
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if impl:
            return impl
    return "unknown"


def _profile_our_loop(cfg, rows: int) -> str:
    """torch.profiler over our training loop only: started when the model is ready (before the
    optimizer and loop), stopped at the first forward in eval mode (the evaluation after the loop)."""
    prof = torch_profile(activities=[ProfilerActivity.CPU])
    state = {"running": False}

    def stop_at_eval(module, inputs):
        if state["running"] and not module.training:
            prof.stop()
            state["running"] = False

    def start(model):
        model.register_forward_pre_hook(stop_at_eval)
        prof.start()
        state["running"] = True

    train(cfg, command=["benchmarks/throughput.py", "--profile"], on_model_ready=start)
    if state["running"]:
        prof.stop()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


class _CountingCollator:
    """DataCollatorWithPadding that also counts real and padded tokens of every batch it builds."""

    def __init__(self, tokenizer):
        self.inner = DataCollatorWithPadding(tokenizer)
        self.real = self.padded = self.samples = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.samples += len(features)
        self.real += int(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()
        return batch


def plain_data(args):
    """The same split as ours (same config and seed), tokenized the plain way (truncate, no padding)."""
    cfg = run_config(args, tempfile.gettempdir())
    prepared = prepare_splits(cfg)
    tokenizer = load_tokenizer(cfg.model)
    label2id = prepared.label2id

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=args.max_length)
        enc["labels"] = [label2id[str(l)] for l in batch["label"]]
        return enc

    splits = {
        name: split.map(encode, batched=True, remove_columns=split.column_names)
        for name, split in prepared.splits.items()
    }
    return cfg, tokenizer, label2id, splits


def train_plain(args, data, profile: bool = False) -> dict:
    """transformers Trainer + peft LoRA, as the peft/transformers docs show it."""
    cfg, tokenizer, label2id, splits = data
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model("minilm-l6"),
        num_labels=len(label2id),
        label2id=label2id,
        id2label={i: l for l, i in label2id.items()},
    )
    model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query", "value"]
        ),
    )
    collator = _CountingCollator(tokenizer)
    flops = count_training_flops(model, **flops_probe(args)).to_dict()
    peak = measure_peak_flops()

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="throughput-plain-") as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=args.seed,
            use_cpu=True,
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
            logging_steps=args.steps,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model, args=targs, train_dataset=splits["train"], data_collator=collator, callbacks=[clock]
        )
        if profile:
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                trainer.train()
            return {"profile": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)}
        with PeakMemory() as memory:
            trainer.train()
        real, padded, samples = collator.real, collator.padded, collator.samples
        optimizer = type(
            trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        ).__name__
        fused = bool(trainer.optimizer.param_groups[0].get("fused"))
        preds = trainer.predict(splits["test"])
        accuracy = float((np.argmax(preds.predictions, -1) == preds.label_ids).mean())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attn = _attn_implementation(model)
    del model, trainer
    torch.set_grad_enabled(True)
    return {
        "steps": args.steps,
        "train_seconds": clock.seconds,
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_share": 1 - real / padded,
        "samples": samples,
        "real_tokens_per_second": real / clock.seconds,
        "samples_per_second": samples / clock.seconds,
        "test_accuracy": accuracy,
        "trainable_params": trainable,
        "attn_implementation": attn,
        "flops_per_token": flops,
        "peak_flops": peak,
        "peak_memory": {"kind": memory.kind, "bytes": memory.peak},
        "optimizer": f"{optimizer} (Trainer default optim {targs.optim!s}, fused={fused})",
    }


_PROBE: dict = {}


def flops_probe(args) -> dict:
    """count_training_flops's seq_len and probe: attention over the rows' effective length
    (sum L^2 / sum L of the truncated training rows, the same rows for both sides) and a probe row of
    their mean length, so a head that runs once per row is spread over a row's tokens."""
    if not _PROBE:
        _, tokenizer, _, splits = plain_data(args)
        lengths = [len(ids) for ids in splits["train"]["input_ids"]]
        mean = max(1, round(sum(lengths) / len(lengths)))
        _PROBE.update(seq_len=effective_seq_len(lengths), probe_tokens=mean)
    n = _PROBE["probe_tokens"]
    return {
        "seq_len": _PROBE["seq_len"],
        "probe_inputs": {
            "input_ids": torch.ones((1, n), dtype=torch.long),
            "attention_mask": torch.ones((1, n), dtype=torch.long),
        },
    }


def add_mfu(runs: list[dict], model_flops: float) -> None:
    """MFU of each run (Chowdhery et al. 2022, appendix B) with the same model FLOPs per token."""
    for run in runs:
        run["model_flops_per_token"] = model_flops
        run["mfu"] = run["real_tokens_per_second"] * model_flops / run["peak_flops"]["flops_per_second"]


def markdown(report: dict) -> str:
    o, p = report["ours"], report["plain"]
    lines = [
        "# Training throughput: adapterkit vs the plain Hugging Face way",
        "",
        f"MiniLM-L6 (minilm-l6) + LoRA r=8 on query/value, TREC (6 classes), batch {report['settings']['batch_size']}, "
        f"max length {report['settings']['max_length']}, {report['settings']['steps']} optimizer steps, same rows, lr, schedule and seed. "
        f"Median of {report['settings']['repeats']} alternating runs each. Real tokens = non-padding tokens; tokenization, model "
        "loading and evaluation are outside the timed region.",
        "",
        "| | real tokens/s | samples/s | MFU | peak memory (RSS, sampled) | padding share of computed tokens "
        "| train time | held-out test accuracy |",
        "|---|---|---|---|---|---|---|---|",
        f"| plain (Trainer + peft, DataCollatorWithPadding) | {p['real_tokens_per_second']:.0f} | {p['samples_per_second']:.1f} | "
        f"{100 * p['mfu']:.1f}% | {p['peak_memory']['bytes'] / 2**20:.0f} MiB | "
        f"{100 * p['padding_share']:.1f}% | {p['train_seconds']:.1f} s | {p['test_accuracy']:.4f} |",
        f"| ours (adapters.training.loop.train) | {o['real_tokens_per_second']:.0f} | {o['samples_per_second']:.1f} | "
        f"{100 * o['mfu']:.1f}% | {o['peak_memory']['bytes'] / 2**20:.0f} MiB | "
        f"{100 * o['padding_share']:.1f}% | {o['train_seconds']:.1f} s | {o['test_accuracy']:.4f} |",
        "",
        f"**Ratio (ours / plain, real tokens/s): {report['ratio']:.2f}x** (goal ≥ 2.0x, issue 18). Per-repeat ratios: "
        + ", ".join(f"{r:.2f}" for r in report["ratios_per_repeat"])
        + ".",
        "",
        f"- machine: {report['environment']['cpu']} ({report['environment']['cpu_count']} cores, {report['environment']['torch_threads']} torch threads), "
        f"torch {report['environment']['versions'].get('torch')}, transformers {report['environment']['versions'].get('transformers')}, peft {report['environment']['versions'].get('peft')}",
        f"- plain: attention {p.get('attn_implementation')}, optimizer {p.get('optimizer')}, batches in random order padded to their longest row",
        f"- ours: attention {o.get('attn_implementation')}, optimizer {o.get('optimizer')}, length-grouped batches (transformers' LengthGroupedSampler, seeded per epoch)",
        f"- MFU: real tokens/s x {o['model_flops_per_token'] / 1e6:.1f} M model FLOPs per token "
        f"(adapters.benchmarking.flops: {o['flops_per_token']['formula']}; attention over "
        f"{o['flops_per_token']['seq_len']:.1f} tokens) / the peak of a {o['peak_flops']['dtype']} "
        f"{o['peak_flops']['size']}x{o['peak_flops']['size']} matmul measured before each run "
        f"({o['peak_flops']['flops_per_second'] / 1e9:.0f} GFLOP/s before ours, "
        f"{p['peak_flops']['flops_per_second'] / 1e9:.0f} before plain, {o['peak_flops']['threads']} threads)",
        "- peak memory: the process's resident set sampled every 20 ms during training (both sides run in one "
        "process, so getrusage's high-water mark would carry over)",
        f"- load average (1, 5, 15 min): {report['load_average_start']} at start, {report['load_average_end']} at end",
        f"- command: `{report['command']}` ({report.get('date', 'date not recorded')})",
    ]
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    if report.get("profiles"):
        for name, table in report["profiles"].items():
            lines += [
                "",
                f"## Profile: {name} (torch.profiler, top operators by self CPU time)",
                "",
                "```",
                table.strip(),
                "```",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the median is reported")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="also profile a short run of each (--profile-steps)")
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "throughput"), help="writes OUT.json and OUT.md"
    )
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(
        [".venv/bin/python", "benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])]
    )
    load_start = load_average()
    data = plain_data(args)
    our_padded = padded_tokens_ours(run_config(args, tempfile.gettempdir()))
    ours_runs, plain_runs = [], []
    for i in range(args.repeats):
        plain_runs.append(train_plain(args, data))
        print(f"plain #{i + 1}: {plain_runs[-1]['real_tokens_per_second']:.0f} real tokens/s", flush=True)
        ours_runs.append(train_ours(args))
        print(f"ours  #{i + 1}: {ours_runs[-1]['real_tokens_per_second']:.0f} real tokens/s", flush=True)

    def median_run(runs):
        ordered = sorted(runs, key=lambda r: r["real_tokens_per_second"])
        return ordered[(len(ordered) - 1) // 2] if len(ordered) % 2 else ordered[len(ordered) // 2 - 1]

    # the same model FLOPs for both (the smaller count: what the model needs, Chowdhery et al. 2022)
    add_mfu(ours_runs + plain_runs, min(r["flops_per_token"]["total"] for r in ours_runs + plain_runs))
    ours, plain = median_run(ours_runs), median_run(plain_runs)
    ours["padded_tokens"] = our_padded
    ours["padding_share"] = 1 - ours["real_tokens"] / our_padded
    ours["real_tokens_per_second_median"] = statistics.median(r["real_tokens_per_second"] for r in ours_runs)
    plain["real_tokens_per_second_median"] = statistics.median(r["real_tokens_per_second"] for r in plain_runs)
    report = {
        "settings": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "lr": args.lr,
            "seed": args.seed,
            "repeats": args.repeats,
            "model": "minilm-l6",
            "data": "trec",
            "method": "lora r=8 alpha=16 dropout=0.05 on query,value",
        },
        "ours": ours,
        "plain": plain,
        "ours_runs": ours_runs,
        "plain_runs": plain_runs,
        "ratio": ours["real_tokens_per_second_median"] / plain["real_tokens_per_second_median"],
        "ratios_per_repeat": [
            o["real_tokens_per_second"] / p["real_tokens_per_second"] for o, p in zip(ours_runs, plain_runs)
        ],
        "environment": environment(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if max(load_start[0], report["load_average_end"][0]) > 2.5:
        report["notes"] = [
            f"measured on a shared, busy machine (1-minute load average up to {max(load_start[0], report['load_average_end'][0]):.1f} on "
            f"{os.cpu_count()} cores): absolute numbers are low and noisy; the ratio of alternating runs is the comparable figure"
        ]
    if args.profile:
        short = argparse.Namespace(**{**vars(args), "steps": args.profile_steps})
        report["profiles"] = {
            f"plain, {args.profile_steps} steps (Trainer.train)": train_plain(short, data, profile=True)["profile"],
            f"ours, {args.profile_steps} steps (the training loop of train())": train_ours(short, profile=True)[
                "profile"
            ],
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
