"""Train an adapter: `accelerate launch scripts/train.py --config configs/quickstart.yaml`.

Options: --set key.path=value (repeatable) overrides the config; --resume continues the
run in output.run_dir from its latest checkpoint; --trust-checkpoint allows a DeepSpeed resume
(DeepSpeed's loader unpickles, so it runs code from the checkpoint); --list-methods prints
every method.
"""

from __future__ import annotations

import argparse
import sys

from adapters.cli.main import guarded, print_methods
from adapters.config import load_config


def build_parser() -> argparse.ArgumentParser:
    """The options of `adapterkit train` / scripts/train.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML run config")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.lr=2e-4",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        help="resume from the latest checkpoint of output.run_dir (or the given checkpoint folder)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow resuming a DeepSpeed checkpoint, which DeepSpeed unpickles (only checkpoints you wrote); "
        "same as train.resume_trust_pickle: true",
    )
    parser.add_argument("--list-methods", action="store_true", help="print every adaptation method and its options")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    return parser


@guarded
def main(argv: list[str] | None = None) -> int:
    """scripts/train.py: 0 trained (or --check / --list-methods); 2 with a one-line `error: ...` on stderr
    for a config, data or checkpoint problem; 1 for an unexpected error (adapters.cli.main.guarded)."""
    args = build_parser().parse_args(argv)
    if args.list_methods:
        print_methods()
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.trust_checkpoint:
        cfg.train.resume_trust_pickle = True
    if args.check:
        print("config OK")
        return 0
    # The training stack (torch, transformers, accelerate, datasets) loads only now, after
    # validation: --check and --list-methods answer without it.
    from adapters.data.splits import format_folds
    from adapters.training.checkpoint import check_resume_trust
    from adapters.training.crossval import cross_validate
    from adapters.training.loop import train
    from adapters.training.report import print_result

    if args.resume:
        check_resume_trust(cfg.train.resume_trust_pickle)  # before any model loads
    if cfg.data.split.folds:
        cv = cross_validate(cfg, command=sys.argv)
        print(
            f"{cfg.data.split.folds}-fold cross-validation (test):\n{format_folds(cv.test)}\n"
            f"report: {cv.run_dir / 'crossval.md'}"
        )
        return 0
    result = train(cfg, resume=args.resume, command=sys.argv)
    print_result(result, cfg)
    return 0
