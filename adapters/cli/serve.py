"""Serve many adapters from one base model over HTTP (OpenAI-compatible).

    python scripts/serve.py --base smollm2-135m-instruct --preload alpha@prod --port 8000
    curl localhost:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"model": "alpha@prod", "prompt": "Hello", "max_tokens": 16, "temperature": 0}'

The bearer token comes from --api-token or $ADAPTERKIT_API_TOKEN (none: no auth).
Binds 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

import uvicorn

from adapters.cli.main import guarded
from adapters.errors import AdapterkitError, ConfigError
from adapters.monitoring.traffic_log import TrafficLogger
from adapters.serving.engine import DEFAULT_PREFIX_CACHE_MIB, InferenceEngine
from adapters.serving.http.app import create_app
from adapters.serving.http.settings import ServerSettings
from adapters.serving.standalone import StandaloneEngine
from adapters.serving.vllm_runtime import serve_with_vllm


def _mib(text: str) -> float:
    """A size in MiB: a finite number >= 0 (argparse turns the ValueError into a usage error, exit 2)."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError(text)
    return value


_mib.__name__ = "size in MiB (a number >= 0)"  # argparse names the type in its message


def build_parser() -> argparse.ArgumentParser:
    """The serve command's options: model, adapters to preload, address, auth, limits, batching, traffic log."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="built-in model name or model folder")
    p.add_argument("--task", default="causal-lm", choices=["causal-lm", "sequence-classification"])
    p.add_argument("--quantization", type=int, choices=[4, 8], help="load the base in 4 or 8 bits (bitsandbytes)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="the base's weights and activations (default float32; with --model: as trained). bfloat16 halves "
        "the base's memory; on a CPU with AVX512-BF16 it decodes small batches faster and prefills slower, and "
        "with the prefix cache it served faster overall (benchmarks/results/server_latency_bfloat16.md). LoRA "
        "weights stay float32 (peft's default)",
    )
    p.add_argument("--capacity", type=int, default=16, help="adapters resident at once (LRU beyond)")
    p.add_argument(
        "--prefix-cache-mib",
        type=_mib,
        default=DEFAULT_PREFIX_CACHE_MIB,
        metavar="MIB",
        help="memory for the keys and values of prompts already prefilled; a prompt of the same adapter that "
        "starts the same way (a chat system prompt) copies them instead of computing them (0: off; --engine vllm "
        "uses vLLM's own prefix caching)",
    )
    p.add_argument("--store", help="adapter store root (default $ADAPTERKIT_STORE or the cache's store)")
    p.add_argument(
        "--preload", action="append", default=[], metavar="REF", help="load an adapter at start (repeatable)"
    )
    p.add_argument(
        "--model",
        metavar="REF",
        help="serve this one artifact as a standalone model (base + its weights; full, partial and "
        "head-only runs need it); requests name REF",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-token", help="require this bearer token (default: $ADAPTERKIT_API_TOKEN)")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument(
        "--batching",
        choices=["continuous", "window"],
        default="continuous",
        help="continuous: requests join and leave the running decode batch between steps; "
        "window: requests gathered for --batch-window-ms run as one batch to its end",
    )
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument(
        "--allow-path-refs",
        action="store_true",
        help="let clients name adapter folders on this machine (default: store references only)",
    )
    p.add_argument(
        "--traffic-log", help="sample requests into this JSONL/SQLite file (adapters.monitoring.traffic_log)"
    )
    p.add_argument("--traffic-include-text", action="store_true", help="store raw text in the traffic log")
    p.add_argument(
        "--engine",
        choices=["adapterkit", "vllm"],
        default="adapterkit",
        help="vllm: vLLM's OpenAI server (its own virtualenv, `make runtimes`), LoRA adapters resolved "
        "from the store by our plugin (docs/serving.md)",
    )
    p.add_argument("--max-lora-rank", type=int, default=16, help="vllm: the largest LoRA rank it accepts")
    p.add_argument("--vllm-args", default="", help="vllm: more arguments for vLLM's server, one shell-quoted string")
    return p


def serve_vllm(args: argparse.Namespace) -> None:
    """Exec vLLM's server for these options; raises ConfigError for an option it does not have."""
    unsupported = {
        "--task sequence-classification": args.task != "causal-lm",
        "--quantization": args.quantization,
        "--model": args.model,
        "--traffic-log": args.traffic_log,
        "--allow-path-refs": args.allow_path_refs,
    }
    named = [option for option, given in unsupported.items() if given]
    if named:
        raise ConfigError(f"--engine vllm serves causal-lm LoRA adapters only; drop {', '.join(named)}")
    serve_with_vllm(
        args.base,
        store=args.store,
        preload=args.preload,
        lora_rank=args.max_lora_rank,
        host=args.host,
        port=args.port,
        max_loras=args.capacity,
        max_model_len=args.max_prompt_tokens + args.max_tokens,
        api_key=args.api_token or os.environ.get("ADAPTERKIT_API_TOKEN"),
        extra_args=shlex.split(args.vllm_args),
        dtype=args.dtype or "float32",
    )


@guarded
def main(argv: list[str] | None = None) -> int:
    """Load the base model and preloaded adapters, then serve until interrupted.

    Returns 0 after the server stops, 2 when the model, an adapter or a setting is refused (the message
    goes to stderr).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.engine == "vllm":
            serve_vllm(args)  # does not return: vLLM's server replaces this process
        if args.model:
            engine = StandaloneEngine(
                args.base,
                args.model,
                task=args.task,
                quantization=args.quantization,
                capacity=args.capacity,
                prefix_cache_mib=args.prefix_cache_mib,
                store=args.store,
                dtype=args.dtype,  # None: as trained
            )
        else:
            engine = InferenceEngine(
                args.base,
                task=args.task,
                quantization=args.quantization,
                capacity=args.capacity,
                prefix_cache_mib=args.prefix_cache_mib,
                store=args.store,
                dtype=args.dtype or "float32",
            )
        for ref in args.preload:
            engine.load(ref)
        on_request = None
        if args.traffic_log:
            on_request = TrafficLogger(args.traffic_log, log_text=args.traffic_include_text, tokenizer=engine.tokenizer)
        settings = ServerSettings(
            api_token=args.api_token,
            max_tokens=args.max_tokens,
            max_prompt_tokens=args.max_prompt_tokens,
            max_body_bytes=args.max_body_bytes,
            batching=args.batching,
            batch_window_ms=args.batch_window_ms,
            max_batch_size=args.max_batch_size,
            on_request=on_request,
            traffic_include_text=args.traffic_include_text,
            allow_path_refs=args.allow_path_refs,
        )
        app = create_app(engine, settings)
    except AdapterkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
