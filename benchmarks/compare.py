#!/usr/bin/env python
"""Compare adaptation methods side by side: quality, cost and speed under one budget.

    .venv/bin/python benchmarks/compare.py --suite quick            # built-in: quick | full
    .venv/bin/python benchmarks/compare.py --suite my_suite.yaml --set budget.steps=50 --set seeds=[0]

Writes results.jsonl (one line per run), table.md and PNG plots to --out (default
benchmarks/results/compare-<suite>), run folders to --work-dir. A rerun skips finished cells.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from adapters.benchmarking.suite import load_suite, plan_cells, run_suite  # noqa: E402
from adapters.errors import AdapterkitError  # noqa: E402

SUITES_DIR = ROOT / "benchmarks" / "suites"


def suite_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return SUITES_DIR / f"{name}.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="quick", help="built-in suite (quick, full) or a suite YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a suite key, e.g. budget.steps=20",
    )
    parser.add_argument("--out", help="results folder (default benchmarks/results/compare-<suite>)")
    parser.add_argument("--work-dir", help="run folders (default runs/compare-<suite>)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only cells whose key (task/arm/seed=N) contains TEXT",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--check", action="store_true", help="validate the suite, list its cells and exit")
    args = parser.parse_args(argv)

    try:
        suite = load_suite(suite_path(args.suite), args.overrides)
    except AdapterkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    only = (lambda cell: any(text in cell.key for text in args.only)) if args.only else None
    if args.check:
        for cell in plan_cells(suite):
            if only is None or only(cell):
                print(cell.key, f"({cell.kind})")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"compare-{suite.name}")
    work = Path(args.work_dir or ROOT / "runs" / f"compare-{suite.name}")
    command = shlex.join([".venv/bin/python", "benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])])
    result = run_suite(suite, out, work, command=command, progress=not args.no_progress, only=only)
    print(
        f"{len(result.ran)} cells run, {len(result.skipped)} already done, {len(result.failed)} failed; table: {out / 'table.md'}"
    )
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
