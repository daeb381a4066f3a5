"""Entry point that trains several configs, one after the other, in one `accelerate launch`.

A launch costs ~30 s of imports on this machine, a tiny run a few seconds: the multi-process
equivalence tests put all their runs in one launch per launcher. Between runs the process group
stays up, and accelerate's shared state is cleared so that each run's Accelerator (and DeepSpeed
config, whose "auto" values accelerate fills in place) starts from its own config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from adapters.config import load_config  # noqa: E402
from adapters.training.loop import train  # noqa: E402
from tests.helpers.distributed_train import _KeepProcessGroup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", dest="configs", action="append", required=True, help="one per run, in order")
    args = parser.parse_args()
    *first, last = args.configs
    for path in first:
        with _KeepProcessGroup():
            train(load_config(path))
        AcceleratorState._reset_state()  # the next Accelerator reads its own grad_accum / DeepSpeed config
        GradientState._reset_state()
    train(load_config(last))


if __name__ == "__main__":
    main()
