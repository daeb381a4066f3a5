"""Run the safe ladder: `python scripts/ladder.py --config configs/ladder.yaml`.

Stages (the config's `ladder:` section) train one after another, each warm-started from the
best so far, until one does not improve; the comparison lands in <run_dir>/ladder_report.md.
--set key.path=value overrides the config (ladder.* keys too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adapters.cli.main import guarded
from adapters.errors import AdapterkitError
from adapters.training.ladder import load_ladder_config, run_ladder


@guarded
def main(argv: list[str] | None = None) -> int:
    """scripts/ladder.py: 0 when the ladder ran (or --check passed), 2 with a one-line `error: ...`
    on stderr for a config or data problem (AdapterkitError)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML ladder config (a run config plus a `ladder:` section)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--check", action="store_true", help="validate the config and every stage, then exit")
    args = parser.parse_args(argv)
    try:
        cfg, ladder = load_ladder_config(args.config, args.overrides)
        if args.check:
            print(f"config OK: stages {', '.join(s.name for s in ladder.stages)}")
            return 0
        result = run_ladder(cfg, ladder)
        print(result.to_markdown())
        print(f"report: {Path(result.ladder_dir) / 'ladder_report.md'}")
    except AdapterkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
