"""Train the next version of a stored adapter on a labeled (drifted) window; promote it if not worse.

    python scripts/retrain.py --adapter clf@prod --data labeled_window.jsonl --out runs/retrain-1 --replay 500

The labeled file (jsonl/csv/json/parquet) has the parent's text and label columns. A
stratified holdout of it (--holdout, or a separate --holdout-file) scores the current and the
new version; the `prod` tag (--tag) moves only if the new one is not worse than the current by
more than --margin. Writes retrain_report.md/json into --out.

Exit status: 0 promoted (or not worse, with --no-promote), 1 kept the current version
(candidate worse), 2 could not run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adapters.cli.main import guarded
from adapters.errors import AdapterkitError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="current adapter in the store: name@prod, name@3, name")
    parser.add_argument(
        "--data", required=True, help="labeled window: jsonl/csv/json/parquet with the parent's text and label columns"
    )
    parser.add_argument("--out", required=True, help="folder for the run, the split data and the report")
    parser.add_argument("--store", help="store root (default: $ADAPTERKIT_STORE or the cache)")
    parser.add_argument(
        "--holdout", type=float, default=0.2, help="fraction of --data held out for the comparison (default 0.2)"
    )
    parser.add_argument("--holdout-file", help="score on this labeled file instead (all of --data trains)")
    parser.add_argument(
        "--metric", help="deciding metric (default accuracy for classifiers, exact_match for causal LMs)"
    )
    parser.add_argument(
        "--margin", type=float, default=0.0, help="how much worse the new version may be and still be promoted"
    )
    parser.add_argument("--tag", default="prod", help="tag to move to the new version (default prod)")
    parser.add_argument("--no-promote", action="store_true", help="compare only; leave the tag where it is")
    parser.add_argument("--replay", type=int, default=0, help="mix in N rows of the parent's own training split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the holdout split and the replay sample")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the parent's training config, e.g. train.epochs=2",
    )
    return parser


@guarded
def main(argv: list[str] | None = None) -> int:
    """scripts/retrain.py: the exit status above; a one-line `error: ...` on stderr for status 2."""
    args = _parser().parse_args(argv)
    try:
        # The training stack loads only now: --help and argument errors answer without it.
        from adapters.training.retrain import retrain

        result = retrain(
            args.adapter,
            args.data,
            args.out,
            store_root=args.store,
            holdout=args.holdout,
            holdout_file=args.holdout_file,
            metric=args.metric,
            margin=args.margin,
            promote=not args.no_promote,
            tag=args.tag,
            replay=args.replay,
            overrides=args.overrides,
            seed=args.seed,
            command=sys.argv,
        )
    except AdapterkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.reason)
    print(f"report: {Path(args.out) / 'retrain_report.md'}")
    return result.exit_code
