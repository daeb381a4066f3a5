"""Write an adapter (or a full/partial/head-only artifact) as the folder another runtime expects.

    adapterkit export trec@prod --to peft out/trec-peft          # plain peft / transformers load it
    adapterkit export trec@prod --to merged out/trec-merged      # a standalone transformers model
    adapterkit export smol@prod --to vllm out/smol-vllm          # vLLM's --lora-modules folder
    adapterkit export smol@prod --to gguf out/smol-gguf          # llama.cpp (adapters.serving.gguf)

Each folder holds the tokenizer and a README.md whose "Load it" section is the code that loads it;
`adapterkit parity REF --runtime ...` checks that runtime gives adapterkit's outputs.
Exit status: 0 written, 1 a merged export whose check failed, 2 refused (the message says why).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from adapters.cli.main import guarded
from adapters.errors import AdapterkitError, ConfigError

TARGETS = ("peft", "merged", "gguf", "vllm")


def build_parser() -> argparse.ArgumentParser:
    """The `export` command's options (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="adapterkit export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("ref", help="adapter reference (name, name@3, name@prod) or folder")
    p.add_argument("out_dir", help="the folder to write (must not exist)")
    p.add_argument("--to", required=True, choices=TARGETS, help="the runtime the folder is for")
    p.add_argument("--base", help="base model (built-in name, folder or hub id); default: the one the manifest records")
    p.add_argument("--store", help="adapter store root")
    p.add_argument("--requantize", action="store_true", help="--to merged on a 4-bit base: save it in 4 bits")
    p.add_argument("--allow-base-mismatch", action="store_true", help="export onto a base other than the trained one")
    return p


def export(args: argparse.Namespace) -> dict:
    """Write the export `args` ask for; returns its report. Raises AdapterkitError when refused."""
    # The serving stack imports transformers: loaded after parsing, so --help answers at once.
    from adapters.serving.export import export_peft
    from adapters.serving.merge import merge_and_export
    from adapters.store.store import AdapterStore

    if args.to in ("peft", "vllm"):
        return export_peft(
            args.ref,
            args.out_dir,
            base=args.base,
            store=args.store,
            allow_base_mismatch=args.allow_base_mismatch,
            for_vllm=args.to == "vllm",
        )
    base = args.base or _recorded_base(AdapterStore(args.store), args.ref)
    if args.to == "merged":
        return merge_and_export(
            base,
            args.ref,
            args.out_dir,
            requantize=args.requantize,
            store=args.store,
            allow_base_mismatch=args.allow_base_mismatch,
        )
    try:  # GGUF: llama.cpp's converters, wrapped by adapters.serving.gguf
        export_gguf = importlib.import_module("adapters.serving.gguf").export_gguf
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"runtime 'gguf' is not available here (adapters.serving.gguf.export_gguf: {err})") from None
    return {"output": str(export_gguf(args.ref, args.out_dir, base=base, store=args.store)), "format": "gguf"}


def _recorded_base(store, ref: str) -> str:
    """The base model the adapter's manifest records (its resolved path, else its name)."""
    _, manifest = store.resolve(ref, verify=False)
    recorded = (manifest or {}).get("base_model") or {}
    base = recorded.get("path") or recorded.get("name")
    if not base:
        raise ConfigError(f"{ref!r} records no base model: pass --base")
    return base


@guarded
def main(argv: list[str] | None = None) -> int:
    """`adapterkit export`: write the folder and print its report as JSON; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        report = export(args)
    except AdapterkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str))
    return 1 if (report.get("check") or {}).get("passed") is False else 0


if __name__ == "__main__":
    sys.exit(main())
