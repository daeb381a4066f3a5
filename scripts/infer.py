#!/usr/bin/env python
"""Run inputs through a base model + adapter (`adapterkit infer`; options in adapters.cli.infer)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from adapters.cli.infer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
