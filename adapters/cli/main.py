"""`adapterkit <command> ...`: one console command that hands its arguments to the command's own `main`.

    adapterkit train --config configs/quickstart.yaml
    adapterkit infer --base smollm2-135m-instruct --adapter alpha@prod --prompt "Hello"
    adapterkit store list
    adapterkit methods

Each command is a module of adapters.cli with `main(argv) -> int` (its exit status); scripts/*.py
run the same functions. `adapterkit <command> --help` shows a command's options.

Every command's `main` is wrapped by `guarded`, the one error path: bad input (an AdapterkitError or
a library error only bad input causes, adapters.errors.user_message) ends as one line
``error: <what>`` on stderr and exit status 2; anything else is a bug: one line saying where its
traceback was written, exit status 1. Tracebacks go to the `adapters.cli` logger at DEBUG, never to
the user's terminal unless ADAPTERKIT_DEBUG=1.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable

from adapters.errors import one_line, user_message

log = logging.getLogger("adapters.cli")
#: Exit status of a run refused for bad input (argparse uses the same for a bad command line).
EXIT_BAD_INPUT = 2
#: Exit status of an unexpected error (a bug): its traceback is in the debug log file.
EXIT_BUG = 1
#: Exit status when the reader of stdout went away (`... | head`): 128 + SIGPIPE, what a shell tool killed by it gives.
EXIT_BROKEN_PIPE = 141

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


def debug_enabled() -> bool:
    """Whether ADAPTERKIT_DEBUG asks for tracebacks on stderr (any value but '', '0', 'false', 'no')."""
    return os.environ.get("ADAPTERKIT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _write_debug_log(err: BaseException, prog: str) -> str | None:
    """Write err's traceback to <cache>/logs/<prog>-<time>-<pid>.log; its path, or None if it cannot be written."""
    from adapters.paths import cache_dir

    try:
        folder = cache_dir() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{prog}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text("".join(traceback.format_exception(err)), encoding="utf-8")
        return str(path)
    except OSError:
        return None


def report_error(err: BaseException, prog: str) -> int:
    """Print the one-line message for `err` on stderr and return the exit status (see the module doc)."""
    message = user_message(err)
    log.debug("%s failed", prog, exc_info=err)
    if debug_enabled():
        traceback.print_exception(err, file=sys.stderr)
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    where = _write_debug_log(err, prog)
    hint = f"its traceback is in {where}" if where else "run again with ADAPTERKIT_DEBUG=1 for its traceback"
    print(f"error: unexpected {type(err).__name__}: {one_line(str(err), 300)} (a bug; {hint})", file=sys.stderr)
    return EXIT_BUG


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a command's `main(argv) -> int` in the one error path (module doc); SystemExit (argparse's
    usage errors, --help) passes through, Ctrl-C returns 130 with one line, and a closed stdout
    (`adapterkit store list | head -1`) ends quietly with EXIT_BROKEN_PIPE (_stdout_closed)."""
    prog = main.__module__.rsplit(".", 1)[-1]

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            status = main(argv)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit where nothing catches it
            return status
        except BrokenPipeError:
            return _stdout_closed()
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        except Exception as err:
            return report_error(err, prog)

    return wrapper


def _stdout_closed() -> int:
    """The reader of stdout has gone: point stdout at /dev/null so that the interpreter's final flush
    cannot fail again, and return EXIT_BROKEN_PIPE without a message (the Python docs' recipe,
    library/signal.html "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (a test's capture): nothing to redirect
        pass
    return EXIT_BROKEN_PIPE


def print_methods() -> None:
    """Print every registered method: summary, tasks and options with their defaults."""
    # The method registry imports torch: only this command pays for it.
    from adapters.methods import list_methods
    from adapters.methods.targets import TARGET_FALLBACK_NOTE

    print(f"Note: {TARGET_FALLBACK_NOTE}.\n")
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


@guarded
def main(argv: list[str] | None = None) -> int:
    """Run `adapterkit <command> [args]`; returns the command's exit status (2: unknown command)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command in ("methods", "builtins"):
        return _listing(args.command, args.args)
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(args.args)


if __name__ == "__main__":
    sys.exit(main())
