#!/usr/bin/env python
"""Time the main job end to end, first-time model conversion included, and record its metrics.

    python benchmarks/quickstart.py [--config configs/quickstart.yaml] [--keep-cache]

Runs exactly what `make demo` runs (`accelerate launch scripts/train.py --config ...`) with an
empty model cache (so the GGUF conversion is timed too, unless --keep-cache), and writes
benchmarks/results/quickstart.json: wall time, held-out metrics of base and adapted model,
trainable parameters, adapter bytes, machine and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--keep-cache", action="store_true", help="reuse the converted model cache")
    parser.add_argument("--out", default="benchmarks/results/quickstart.json")
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="quickstart-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cache = None
    if not args.keep_cache:
        cache = Path(tempfile.mkdtemp(prefix="adapterkit-cache-"))
        env["ADAPTERKIT_CACHE"] = str(cache)
    accelerate = str(Path(sys.executable).with_name("accelerate"))
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
        "--set",
        f"output.run_dir={run_dir}",
    ]
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        return proc.returncode
    summary = json.loads((run_dir / "summary.json").read_text())
    adapter = Path(summary["adapter_dir"])
    result = {
        "command": "python " + " ".join(sys.argv),
        "runs": " ".join(cmd[:-2]),
        "config": args.config,
        "wall_seconds_total": round(wall, 1),
        "first_time_conversion_included": not args.keep_cache,
        "train_seconds": round(summary["train_seconds"], 1),
        "steps": summary["steps"],
        "tokens_per_second": round(summary["tokens_per_second"], 1),
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "adapter_bytes": sum(f.stat().st_size for f in adapter.iterdir() if f.name.endswith(".safetensors")),
        "test_base": summary["metrics"]["base"],
        "test_adapted": summary["metrics"]["adapted"],
        "printed": proc.stdout.strip().splitlines()[-8:],
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_seconds_total", "train_seconds", "steps")}, indent=2))
    print("\n".join(result["printed"]))
    shutil.rmtree(run_dir, ignore_errors=True)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
