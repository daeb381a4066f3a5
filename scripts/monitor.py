#!/usr/bin/env python
"""Drift report of logged traffic (`adapterkit monitor`; options in adapters.cli.monitor)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from adapters.cli.monitor import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
