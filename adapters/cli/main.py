"""`adapterkit <command> ...`: one console command that hands its arguments to the command's own `main`.

    adapterkit train --config configs/quickstart.yaml
    adapterkit infer --base smollm2-135m-instruct --adapter alpha@prod --prompt "Hello"
    adapterkit store list
    adapterkit methods

Each command is a module of adapters.cli with `main(argv) -> int` (its exit status); scripts/*.py
run the same functions. `adapterkit <command> --help` shows a command's options.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with `main(argv) -> int`, one-line summary). A command's module is imported only when
# that command runs, so `adapterkit methods` stays fast: it never loads the training or serving stack.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("adapters.cli.train", "train an adapter from a YAML run config"),
    "infer": ("adapters.cli.infer", "run prompts or a JSONL file through a base model + adapter, or export a merge"),
    "serve": ("adapters.cli.serve", "serve many adapters of one base model over HTTP (OpenAI-compatible)"),
    "store": ("adapters.cli.store", "manage the versioned adapter store (list, show, tag, promote, ...)"),
    "monitor": ("adapters.cli.monitor", "compare logged traffic with an adapter's training reference (drift)"),
    "retrain": ("adapters.cli.retrain", "train a stored adapter's next version on labeled data; promote if not worse"),
    "ladder": ("adapters.cli.ladder", "train stages in turn, each from the best so far, until one does not improve"),
    "export": ("adapters.cli.export", "write an adapter as the folder peft, transformers, vLLM or llama.cpp expects"),
    "parity": ("adapters.cli.parity", "check that another runtime gives adapterkit's outputs on the adapter's data"),
    "methods": ("adapters.cli.main", "list every adaptation method and its options"),
    "builtins": ("adapters.cli.main", "list the built-in models and datasets"),
}


def print_methods() -> None:
    """Print every registered method: summary, tasks and options with their defaults."""
    # The method registry imports torch: only this command pays for it.
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
    """Print the built-in models and datasets (names usable in a run config) with their descriptions."""
    # Only this command needs the catalogues.
    from adapters.data.builtins import BUILTIN_DATASETS
    from adapters.modeling.builtins import BUILTIN_MODELS

    print("models:")
    for m in BUILTIN_MODELS.values():
        print(f"  {m.name:24s} {m.description}")
    print("datasets:")
    for d in BUILTIN_DATASETS.values():
        print(f"  {d.name:24s} {d.description}")


def _listing(command: str, argv: list[str]) -> int:
    """`adapterkit methods` / `adapterkit builtins`: no options besides --help."""
    argparse.ArgumentParser(prog=f"adapterkit {command}", description=COMMANDS[command][1]).parse_args(argv)
    if command == "methods":
        print_methods()
    else:
        print_builtins()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: a command name, then everything else goes to that command."""
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:{width}s}  {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="adapterkit",
        description="Parameter-efficient fine-tuning: train, store, serve and monitor adapters.",
        epilog=f"commands:\n{listing}\n\n`adapterkit <command> --help` shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="command", help="one of the commands below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `adapterkit <command> [args]`; returns the command's exit status (2: unknown command)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command in ("methods", "builtins"):
        return _listing(args.command, args.args)
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(args.args)


if __name__ == "__main__":
    sys.exit(main())
