"""`adapterkit` console command: methods, models, datasets, and the store (see scripts/ for train/serve)."""

from __future__ import annotations

import argparse
import sys


def print_methods() -> None:
    from adapters.methods import list_methods

    for method in list_methods():
        tasks = ", ".join(sorted(method.tasks))
        flags = " [quantized ok]" if method.supports_quantized else ""
        print(f"{method.name:16s} {method.summary}")
        print(f"{'':16s} tasks: {tasks}{flags}")
        for key, default, help_text in method.describe_options():
            print(f"{'':18s}{key} = {default}  {help_text}")
        print()


def print_builtins() -> None:
    from adapters.data.builtins import BUILTIN_DATASETS
    from adapters.modeling.builtins import BUILTIN_MODELS

    print("models:")
    for m in BUILTIN_MODELS.values():
        print(f"  {m.name:24s} {m.description}")
    print("datasets:")
    for d in BUILTIN_DATASETS.values():
        print(f"  {d.name:24s} {d.description}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="adapterkit")
    parser.add_argument("command", choices=["methods", "builtins", "store"], help="what to show or do")
    args, rest = parser.parse_known_args(argv)
    if args.command == "methods":
        print_methods()
    elif args.command == "builtins":
        print_builtins()
    else:
        from adapters.cli.store import main as store_main

        return store_main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
