#!/usr/bin/env python
"""Chat SFT on real conversations: does training on chatterbot-corpus lower the held-out assistant-turn
perplexity of SmolLM2-135M-Instruct?

    python benchmarks/chat_sft.py [--config configs/chat-sft.yaml] [--set key=value ...]

Runs `accelerate launch scripts/train.py --config ...` (one process, CPU) and writes
benchmarks/results/chat_sft.json and .md: the test split's loss and perplexity over assistant-turn
tokens (system, user and tool turns masked) for the base model and the adapted one, the steps, time,
throughput, the data report's sizes and truncation counts, and the exact command. The test split holds
conversations whose opening line occurs in no training conversation (the built-in's group split).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/chat-sft.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--out", default="benchmarks/results/chat_sft")
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="chat-sft-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    overrides = [x for item in [*args.set, f"output.run_dir={run_dir}"] for x in ("--set", item)]
    cmd = [
        accelerate,
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "scripts/train.py",
        "--config",
        args.config,
        *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        return proc.returncode
    summary = json.loads((run_dir / "summary.json").read_text())
    report = json.loads((run_dir / "data_report.json").read_text())
    base, adapted = summary["metrics"]["base"], summary["metrics"]["adapted"]
    result = {
        "command": "python " + " ".join(sys.argv),
        "runs": " ".join(cmd[:-2]),
        "config": args.config,
        "overrides": args.set,
        "wall_seconds_total": round(wall, 1),
        "train_seconds": round(summary["train_seconds"], 1),
        "steps": summary["steps"],
        "tokens_per_second": round(summary["tokens_per_second"], 1),
        "trainable_params": summary["trainable_params"],
        "split_sizes": report["sizes"],
        "truncation": report.get("truncation"),
        "packing": report.get("packing") or None,
        "test_base": {k: base[k] for k in ("loss", "perplexity")},
        "test_adapted": {k: adapted[k] for k in ("loss", "perplexity")},
        "examples": adapted.get("examples"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_after": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    """The result as a short Markdown page: command, table of base vs adapted, run facts."""
    sizes = ", ".join(f"{k} {v}" for k, v in r["split_sizes"].items())
    lines = [
        "# Chat SFT on chatterbot-corpus (SmolLM2-135M-Instruct + LoRA)",
        "",
        f"Command: `{r['command']}` (runs `{r['runs']}`)",
        "",
        "Held-out test conversations (no opening line shared with training); loss in nats per assistant-turn "
        "token, system/user turns masked:",
        "",
        "| model | loss | perplexity |",
        "|---|---|---|",
        f"| base | {r['test_base']['loss']:.3f} | {r['test_base']['perplexity']:.2f} |",
        f"| LoRA after {r['steps']} steps | {r['test_adapted']['loss']:.3f} | {r['test_adapted']['perplexity']:.2f} |",
        "",
        f"Conversations: {sizes}. Training: {r['train_seconds']} s ({r['tokens_per_second']} tokens/s), "
        f"{r['wall_seconds_total']} s in all, on {r['machine']['cpus']} CPUs shared with other jobs (load average "
        f"{r['machine']['loadavg_after'][2]:.1f} over the last 15 minutes; {r['date']}).",
    ]
    if r.get("packing"):
        p = r["packing"]
        lines.append(
            f"Packing: {p['rows']} rows in {p['packed_rows']} packed rows, padding share "
            f"{p['padding_share']:.1%} (unpacked {p['padding_share_unpacked']:.1%})."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
