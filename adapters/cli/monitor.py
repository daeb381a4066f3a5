"""Compare a window of logged traffic with an adapter's training reference.

    adapterkit monitor --adapter clf@prod --traffic logs/traffic.db --since 24h --out reports/today

(`python scripts/monitor.py ...` is the same command.)
Writes report.md, report.json and PNG plots into --out. Exit status, for schedulers:
0 no drift past thresholds, 1 drift past thresholds (e.g. trigger `adapterkit retrain`),
2 the monitor could not run (bad arguments, missing adapter or log).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adapters.cli.main import guarded
from adapters.config import parse_yaml
from adapters.errors import AdapterkitError


def build_parser() -> argparse.ArgumentParser:
    """The `monitor` command's options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--adapter", required=True, help="store reference (name, name@3, name@prod) or an adapter folder"
    )
    parser.add_argument("--traffic", required=True, help="traffic log written by the server (.jsonl or SQLite)")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--store", help="store root (default: $ADAPTERKIT_STORE or the cache)")
    parser.add_argument("--traffic-adapter", help="adapter name as logged (default: the stored name, every version)")
    parser.add_argument("--since", help="window start: epoch seconds, ISO-8601, or a duration ago (24h, 7d)")
    parser.add_argument("--until", help="window end (same forms)")
    parser.add_argument("--limit", type=int, help="use only the most recent N records")
    parser.add_argument(
        "--thresholds", help="YAML/JSON file of thresholds (see adapters.monitoring.drift.DriftThresholds)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a threshold, e.g. psi_alarm=0.3",
    )
    parser.add_argument(
        "--fail-on", choices=["alarm", "warn"], default="alarm", help="lowest status that exits 1 (default alarm)"
    )
    parser.add_argument("--no-embed", action="store_true", help="skip embedding logged texts with the base model")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument("--json", action="store_true", help="print report.json instead of the summary")
    return parser


def read_threshold_file(path: str | None) -> dict | None:
    """The mapping in a YAML/JSON thresholds file (None without a file); AdapterkitError if unusable."""
    if not path:
        return None
    file = Path(path)
    if not file.is_file():
        raise AdapterkitError(f"--thresholds: file {file} does not exist")
    raw = parse_yaml(file.read_text(encoding="utf-8"), f"--thresholds {file}") or {}
    if not isinstance(raw, dict):
        raise AdapterkitError(f"--thresholds: {file} must hold a mapping of threshold names to values")
    return raw


@guarded
def main(argv: list[str] | None = None) -> int:
    """`adapterkit monitor`: write the drift report; returns 0 / 1 / 2 (see the module docstring)."""
    args = build_parser().parse_args(argv)
    # monitoring loads numpy, scipy and the serving engine: after parsing, so --help answers at once.
    from adapters.monitoring.drift import load_thresholds
    from adapters.monitoring.monitor import EXIT_ERROR, monitor

    try:
        report = monitor(
            args.adapter,
            args.traffic,
            args.out,
            store_root=args.store,
            traffic_adapter=args.traffic_adapter,
            since=args.since,
            until=args.until,
            limit=args.limit,
            thresholds=load_thresholds(read_threshold_file(args.thresholds), args.overrides),
            fail_on=args.fail_on,
            embed=not args.no_embed,
            plots=not args.no_plots,
        )
    except AdapterkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR

    if args.json:
        print(json.dumps(report.to_dict(with_data=False), indent=2))
    else:
        print(
            f"{report.adapter}: {report.status.upper()} over {report.n_records} records "
            f"-> {Path(args.out) / 'report.md'}"
        )
        for c in report.checks:
            print(f"  {c.name:<15} {c.status:<8} {c.detail}")
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
