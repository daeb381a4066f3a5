#!/usr/bin/env python
"""Compare a window of logged traffic with an adapter's training reference.

    python scripts/monitor.py --adapter clf@prod --traffic logs/traffic.db --since 24h --out reports/today

Writes report.md, report.json and PNG plots into --out. Exit status, for schedulers:
0 no drift past thresholds, 1 drift past thresholds (e.g. trigger scripts/retrain.py),
2 the monitor could not run (bad arguments, missing adapter or log).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from adapters.errors import AdapterkitError  # noqa: E402

EXIT_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="store reference (name, name@3, name@prod) or an adapter folder")
    parser.add_argument("--traffic", required=True, help="traffic log written by the server (.jsonl or SQLite)")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--store", help="store root (default: $ADAPTERKIT_STORE or the cache)")
    parser.add_argument("--traffic-adapter", help="adapter name as logged (default: the stored name, every version)")
    parser.add_argument("--since", help="window start: epoch seconds, ISO-8601, or a duration ago (24h, 7d)")
    parser.add_argument("--until", help="window end (same forms)")
    parser.add_argument("--limit", type=int, help="use only the most recent N records")
    parser.add_argument("--thresholds", help="YAML/JSON file of thresholds (see adapters.monitoring.drift.DriftThresholds)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a threshold, e.g. psi_alarm=0.3")
    parser.add_argument("--fail-on", choices=["alarm", "warn"], default="alarm", help="lowest status that exits 1 (default alarm)")
    parser.add_argument("--no-embed", action="store_true", help="skip embedding logged texts with the base model")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument("--json", action="store_true", help="print report.json instead of the summary")
    args = parser.parse_args(argv)

    try:
        import yaml

        from adapters.monitoring.drift import load_thresholds
        from adapters.monitoring.monitor import monitor

        raw = None
        if args.thresholds:
            path = Path(args.thresholds)
            if not path.is_file():
                raise AdapterkitError(f"--thresholds: file {path} does not exist")
            raw = yaml.safe_load(path.read_text()) or {}
            if not isinstance(raw, dict):
                raise AdapterkitError(f"--thresholds: {path} must hold a mapping of threshold names to values")
        report = monitor(
            args.adapter,
            args.traffic,
            args.out,
            store_root=args.store,
            traffic_adapter=args.traffic_adapter,
            since=args.since,
            until=args.until,
            limit=args.limit,
            thresholds=load_thresholds(raw, args.overrides),
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
        print(f"{report.adapter}: {report.status.upper()} over {report.n_records} records -> {Path(args.out) / 'report.md'}")
        for c in report.checks:
            print(f"  {c.name:<15} {c.status:<8} {c.detail}")
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
