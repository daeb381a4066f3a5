#!/usr/bin/env python
"""Train an adapter: `accelerate launch scripts/train.py --config configs/quickstart.yaml`.

Options and exit status: adapters/cli/train.py (or `--help`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from adapters.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
