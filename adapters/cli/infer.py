"""Run inputs through a base model + adapter, or fold an adapter into a standalone model.

    adapterkit infer --base smollm2-135m-instruct --adapter alpha@prod --prompt "Hello"
    adapterkit infer --base smollm2-135m-instruct --adapter alpha --input in.jsonl --output out.jsonl
    adapterkit infer --task sequence-classification --base minilm-l6 --adapter trec --prompt "Where is Rome?"
    adapterkit infer --base smollm2-135m-instruct --adapter alpha@3 --export merged/ [--requantize]

(`python scripts/infer.py ...` is the same command.)
Input JSONL: one object per line with "prompt" (or "text") or "messages"; optional per-row
"adapter", "max_new_tokens", "temperature", "top_p", "seed", "stop"; other keys are copied.
Exit status: 0 done, 1 an --export whose merged model failed its check, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adapters.cli.main import guarded
from adapters.constants import TASKS
from adapters.errors import AdapterkitError


def build_parser() -> argparse.ArgumentParser:
    """The `infer` command's options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="built-in model name or model folder")
    p.add_argument("--adapter", default="base", help="adapter reference (name, name@3, name@prod, folder) or 'base'")
    p.add_argument("--task", default="causal-lm", choices=list(TASKS))
    p.add_argument("--quantization", type=int, choices=[4, 8], help="load the base in 4 or 8 bits")
    p.add_argument("--store", help="adapter store root")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt (or text to classify)")
    src.add_argument("--input", help="JSONL file of inputs")
    p.add_argument("--output", help="write JSONL here instead of printing")
    p.add_argument("--chat", action="store_true", help="send --prompt as a user chat message")
    p.add_argument("--raw", action="store_true", help="do not apply the adapter's training prompt format")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--export", metavar="DIR", help="merge the adapter into the base and save a standalone model here")
    p.add_argument(
        "--requantize", action="store_true", help="with --export on a 4-bit base: save the merged model in 4 bits"
    )
    return p


def _records(args: argparse.Namespace) -> list[dict]:
    """The input rows: the lines of --input, or one row made of --prompt."""
    if args.input:
        lines = Path(args.input).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    if args.chat:
        return [{"messages": [{"role": "user", "content": args.prompt}]}]
    return [{"prompt": args.prompt, "raw": args.raw}]


def _base(args: argparse.Namespace):
    """The base model config: --base and --quantization, pooled as the adapter's classifier was trained."""
    # The config and the store load with the serving stack, after parsing.
    from adapters.config import ModelConfig, QuantizationConfig
    from adapters.store.store import AdapterStore

    quantization = QuantizationConfig(bits=args.quantization) if args.quantization else None
    pooling = "auto"
    if args.adapter != "base" and args.task == "sequence-classification":
        _, manifest = AdapterStore(args.store).resolve(args.adapter, verify=False)
        pooling = (((manifest or {}).get("training") or {}).get("model") or {}).get("pooling") or "auto"
    return ModelConfig(name=args.base, quantization=quantization, pooling=pooling)


@guarded
def main(argv: list[str] | None = None) -> int:
    """`adapterkit infer`: print or write the outputs; returns the exit status (module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # serving imports transformers: loaded after parsing so --help and usage errors answer at once.
    from adapters.serving.engine import InferenceEngine, infer_records, write_jsonl
    from adapters.serving.merge import merge_and_export
    from adapters.serving.standalone import StandaloneEngine, needs_own_model

    try:
        if args.export:
            report = merge_and_export(
                args.base,
                args.adapter,
                args.export,
                task=args.task,
                quantization=args.quantization,
                requantize=args.requantize,
                store=args.store,
            )
            print(json.dumps(report, indent=2))
            return 0 if report["check"]["passed"] else 1
        if not args.input and args.prompt is None:
            parser.error("give --prompt, --input or --export")
        records = _records(args)
        if needs_own_model(args.adapter, args.store):  # full/partial/head-only: base + artifact is one model
            engine = StandaloneEngine(
                args.base, args.adapter, task=args.task, quantization=args.quantization, capacity=4, store=args.store
            )
        else:
            engine = InferenceEngine(_base(args), task=args.task, capacity=4, store=args.store)
        defaults = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "stop": args.stop,
        }
        outputs = infer_records(engine, records, adapter=args.adapter, defaults=defaults, batch_size=args.batch_size)
    except AdapterkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.output:
        write_jsonl(args.output, outputs)
    elif args.prompt is not None and engine.task == "causal-lm":
        print(outputs[0]["output"])
    else:
        sys.stdout.write("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
