#!/usr/bin/env python
"""Serve many adapters from one base model over HTTP: `python scripts/serve.py --base MODEL [--preload REF] ...`.

The options and examples: `python scripts/serve.py --help` (adapters/cli/serve.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from adapters.cli.serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
