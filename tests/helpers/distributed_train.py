"""Entry point for the multi-process tests, started by `accelerate launch`.

Trains like scripts/train.py, but --stop-after N ends the loop at step N as an interruption
would; with --resume as well, the same processes then resume from the latest checkpoint, so one
launch (~30 s of imports) covers both. (Only for DDP: a second DeepSpeed ZeRO-3 engine in the
same process loads the model under zero.Init and fails, so ZeRO-3 resumes in a new launch.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from adapters.config import load_config  # noqa: E402
from adapters.training.loop import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    if args.stop_after:
        with _KeepProcessGroup():
            train(cfg, stop_after=args.stop_after)
        if args.resume:
            train(cfg, resume=True)
    else:
        train(cfg, resume=args.resume)


class _KeepProcessGroup:
    """train() ends with accelerator.end_training(), which tears the process group down; keep it
    for the resumed run in the same processes (a fresh launch would start a new one)."""

    def __enter__(self):
        from accelerate.state import PartialState

        self._original = PartialState.destroy_process_group
        PartialState.destroy_process_group = lambda self, group=None: None

    def __exit__(self, *exc):
        from accelerate.state import PartialState

        PartialState.destroy_process_group = self._original


if __name__ == "__main__":
    main()
