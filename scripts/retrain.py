#!/usr/bin/env python
"""Train the next version of a stored adapter on a labeled (drifted) window; promote it if not worse.

Options and exit status: adapters/cli/retrain.py (or `--help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from adapters.cli.retrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
