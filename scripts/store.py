#!/usr/bin/env python
"""The adapter store CLI (adapters.cli.store): `python scripts/store.py [--store DIR] [--json] COMMAND ...`.

Commands: publish, list, show, diff, tag, untag, promote, rollback, rm, verify, export, import, gc.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from adapters.cli.store import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
