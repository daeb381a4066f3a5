"""Check that another runtime gives adapterkit's outputs for an adapter, on its own held-out data.

    adapterkit parity trec@prod --runtime peft                       # the adapter folder, plain peft
    adapterkit parity trec@prod --runtime transformers               # a merged export, plain transformers
    adapterkit parity trec@prod --runtime transformers --artifact out/trec-merged
    adapterkit parity smol@prod --runtime vllm | gguf                # adapters.serving.vllm_runtime / .gguf

The golden set is the first --limit rows of the run's test split (the manifest records the data
config), or the lines of --prompts. Causal LMs: top-k log-probabilities at each prompt's first generated
position and the greedy tokens; classifiers: every class probability. Prints a table.
Exit status: 0 every row within --tol with equal answers, 1 a row is not, 2 refused or not available.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adapters.cli.main import guarded
from adapters.constants import RUNTIMES
from adapters.errors import AdapterkitError


def build_parser() -> argparse.ArgumentParser:
    """The `parity` command's options (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="adapterkit parity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("ref", help="adapter reference (name, name@3, name@prod) or folder")
    p.add_argument("--runtime", required=True, choices=RUNTIMES)
    p.add_argument(
        "--artifact",
        help="the folder the runtime loads (an `adapterkit export` output); "
        "default: the adapter folder, or for transformers a merged export made now",
    )
    p.add_argument("--base", help="base model; default: the one the manifest records")
    p.add_argument("--store", help="adapter store root")
    p.add_argument("--prompts", help="a text file of golden inputs, one per line (default: the run's test split)")
    p.add_argument("--limit", type=int, default=8, help="golden rows taken from the test split")
    p.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="largest allowed difference of log-probabilities (causal LM) or probabilities (classifier)",
    )
    p.add_argument("--top-k", type=int, default=5, help="causal LM: tokens compared at the first generated position")
    p.add_argument("--max-new-tokens", type=int, default=8, help="causal LM: greedy tokens compared")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON here")
    return p


@guarded
def main(argv: list[str] | None = None) -> int:
    """`adapterkit parity`: print the comparison table; returns the exit status (module docstring)."""
    args = build_parser().parse_args(argv)
    # The engine and the runtimes import transformers: loaded after parsing, so --help answers at once.
    from adapters.serving.parity import report_json, run_parity

    texts = None
    if args.prompts:
        texts = [line for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        report = run_parity(
            args.ref,
            args.runtime,
            base=args.base,
            store=args.store,
            artifact=args.artifact,
            texts=texts,
            limit=args.limit,
            tol=args.tol,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
        )
    except AdapterkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        Path(args.json).write_text(report_json(report), encoding="utf-8")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
