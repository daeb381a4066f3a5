#!/usr/bin/env python
"""Run the safe ladder: `python scripts/ladder.py --config configs/ladder.yaml`.

Options and exit status: adapters/cli/ladder.py (or `--help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from adapters.cli.ladder import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
