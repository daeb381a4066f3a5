"""Server latency and throughput on loopback at a fixed concurrency (SmolLM2-135M, LoRA r=8):
continuous batching against the old window batching, in the same run.

    .venv/bin/python benchmarks/server_latency.py [--clients 16] [--requests 3] [--max-tokens 16] [--threads 1]
        [--think-seconds 2] [--dtype float32|bfloat16] [--only 0 3]

The server runs in this process (uvicorn on 127.0.0.1, a free port); --clients threads each send
--requests streamed completions back to back (greedy, max_tokens tokens each, ignore_eos), and time
each request to its first text chunk (time to first token) and to its end (latency). Workloads, each
under ``ServerSettings.batching = "continuous"`` (rows join and leave the running decode batch between
steps) and ``"window"`` (requests gathered for --window-ms run as one batch to its end):
- one adapter: every client uses the same adapter;
- N adapters, mixing: each client its own adapter, batches may mix adapters;
- the same with mixed lengths: client i asks for max_tokens x (1/4, 1/2, 1, 2)[i % 4] tokens;
- one adapter and N adapters with think time: each client pauses a seeded exponential time (mean
  --think-seconds) before each request, as interactive users do, so requests arrive spread out;
- N adapters, no mixing (window only, as before: one engine batch per adapter).
Back to back (no think time), Little's law ties the modes: mean latency = clients / throughput.
The engine holds clients + 1 adapters: continuous batching keeps one slot free of running rows.
Writes benchmarks/results/server_latency[_bfloat16].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_adapters import BASE, machine, publish_random_loras  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` by the nearest-rank rule."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_workload(
    engine,
    args,
    name: str,
    adapters: list[str],
    mix: bool,
    batching: str,
    lengths: list[int] | None = None,
    think_s: float = 0.0,
) -> dict:
    """Serve ``engine`` with one batching mode and drive it with ``args.clients`` streaming clients; client i
    uses ``adapters[i]`` and asks for ``lengths[i]`` new tokens (default: ``args.max_tokens``). ``think_s``:
    the mean of the exponential pause (seconds) each client takes before each request, the same seeded
    draws in every mode (0: back to back)."""
    lengths = lengths or [args.max_tokens] * args.clients
    import httpx

    from adapters.serving.http.app import BackgroundServer, create_app
    from adapters.serving.http.settings import ServerSettings

    settings = ServerSettings(
        batch_window_ms=args.window_ms,
        max_batch_size=args.clients,
        mix_adapters=mix,
        max_tokens=max(lengths),
        batching=batching,
        join_every_steps=args.join_every_steps,
    )
    latencies: list[float] = []
    tokens: list[int] = []
    first_tokens: list[float] = []
    failures: list[str] = []
    engine.prefix_cache.clear()  # every mode starts cold (but for the warm-up request)
    looked, hit, reused = (engine.prefix_cache.stats()[k] for k in ("lookups", "hits", "hit_tokens"))
    with BackgroundServer(create_app(engine, settings)) as server:

        def client(i: int) -> None:
            pauses = random.Random(i)
            with httpx.Client(base_url=server.url, timeout=600) as http:
                for k in range(args.requests):
                    if think_s:
                        time.sleep(pauses.expovariate(1 / think_s))
                    body = {
                        "model": adapters[i],
                        "prompt": f"Client {i} request {k}: write about the weather.",
                        "max_tokens": lengths[i],
                        "temperature": 0,
                        "ignore_eos": True,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    t0 = time.perf_counter()
                    first, usage = None, None
                    with http.stream("POST", "/v1/completions", json=body) as r:
                        for line in r.iter_lines():
                            if not line.startswith("data: {"):
                                continue
                            chunk = json.loads(line[len("data: ") :])
                            if first is None and any(c.get("text") for c in chunk["choices"]):
                                first = time.perf_counter() - t0
                            usage = chunk.get("usage") or usage
                    latencies.append(time.perf_counter() - t0)
                    first_tokens.append(first if first is not None else latencies[-1])
                    tokens.append(usage["completion_tokens"] if usage else 0)
                    if r.status_code != 200 or tokens[-1] != lengths[i]:
                        failures.append(f"{r.status_code} {usage}")

        with httpx.Client(base_url=server.url) as http:  # warm-up
            http.post("/v1/completions", json={"model": adapters[0], "prompt": "warm up", "max_tokens": 2})
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        metrics = httpx.get(server.url + "/metrics").text
    lines = metrics.splitlines()
    batches = float(next(line.split()[-1] for line in lines if line.startswith("adapterkit_batch_rows_count")))
    rows = float(next(line.split()[-1] for line in lines if line.startswith("adapterkit_batch_rows_sum")))
    return {
        "workload": name,
        "batching": batching,
        "think_seconds": think_s,
        "requests": len(latencies),
        "failures": len(failures),
        "wall_seconds": wall,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "ttft_p50_ms": statistics.median(first_tokens) * 1e3,
        "ttft_p99_ms": percentile(first_tokens, 0.99) * 1e3,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": sum(tokens) / wall,
        # window: rows per engine batch; continuous: rows per decode step (prefills of joining rows not counted)
        "mean_batch_rows": rows / batches if batches else None,
        # prompts that reused a cached prefix, and the prompt tokens copied instead of computed (warm-up included)
        "prefix_cache_hits": engine.prefix_cache.hits - hit,
        "prefix_cache_lookups": engine.prefix_cache.lookups - looked,
        "prefix_cache_hit_tokens": engine.prefix_cache.hit_tokens - reused,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=3, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--window-ms", type=float, default=10.0)
    p.add_argument(
        "--join-every-steps",
        type=int,
        default=4,
        help="continuous: waiting requests join together at most every this many decode steps (one prefill pass)",
    )
    p.add_argument(
        "--think-seconds",
        type=float,
        default=2.0,
        help="the think-time workloads: each client pauses a seeded exponential time of this mean before each request",
    )
    p.add_argument("--only", type=int, nargs="*", help="run only these workloads (indices in the table's order)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared; see load_avg)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the engine's (serve --dtype)")
    p.add_argument(
        "--prefix-cache-mib",
        type=float,
        help="the engine's prefix cache (serve --prefix-cache-mib; default the engine's, 0: off)",
    )
    p.add_argument("--out", help="results path without suffix (default benchmarks/results/server_latency[_DTYPE])")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from adapters.serving.engine import DEFAULT_PREFIX_CACHE_MIB, InferenceEngine

    cache_mib = DEFAULT_PREFIX_CACHE_MIB if args.prefix_cache_mib is None else args.prefix_cache_mib

    results: dict = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "base": BASE,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
        "batch_window_ms": args.window_ms,
        "join_every_steps": args.join_every_steps,
        "dtype": args.dtype,
        "prefix_cache_mib": cache_mib,
    }
    with tempfile.TemporaryDirectory() as tmp:
        refs = publish_random_loras(Path(tmp) / "store", args.clients)
        engine = InferenceEngine(
            BASE, capacity=args.clients + 1, store=Path(tmp) / "store", dtype=args.dtype, prefix_cache_mib=cache_mib
        )
        for r in refs:
            engine.load(r)
        one, many = [refs[0]] * args.clients, refs
        mixed = f"{args.clients} adapters, mixed batches"
        spread = [args.max_tokens * f // 4 for f in (1, 2, 4, 8)] * args.clients  # 1/4 to 2x max_tokens
        results["lengths_spread"] = sorted(set(spread))
        think = f", think time {args.think_seconds:g} s"
        both = ("continuous", "window")
        specs = [  # (name, adapters per client, mix, lengths, think time, modes)
            ("one adapter", one, True, None, 0.0, both),
            (mixed, many, True, None, 0.0, both),
            (
                mixed + ", lengths " + "/".join(map(str, sorted(set(spread)))),
                many,
                True,
                spread[: args.clients],
                0.0,
                both,
            ),
            ("one adapter" + think, one, True, None, args.think_seconds, both),
            (mixed + think, many, True, None, args.think_seconds, both),
            (f"{args.clients} adapters, one batch per adapter", many, False, None, 0.0, ("window",)),
        ]
        chosen = [specs[i] for i in args.only] if args.only else specs
        results["workloads"] = [
            run_workload(engine, args, name, ads, mix, batching, lengths, think_s)
            for name, ads, mix, lengths, think_s, modes in chosen
            for batching in modes
        ]
    suffix = "" if args.dtype == "float32" else "_" + args.dtype
    out = Path(args.out or f"benchmarks/results/server_latency{suffix}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(render_md(results))
    print(render_md(results))


def render_md(r: dict) -> str:
    """The results as a Markdown table."""
    m = r["machine"]
    lines = [
        f"# Server latency at {r['clients']} concurrent clients (SmolLM2-135M, LoRA r=8, {r['max_tokens']} new "
        f"tokens per request, {r.get('dtype', 'float32')}): continuous against window batching",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, load average at start "
        f"{tuple(round(x, 1) for x in m['load_avg'])} (shared machine), git {m['git']}; loopback HTTP, streamed "
        f"completions (latency: to the last chunk; TTFT: to the first text chunk), window {r['batch_window_ms']} ms, "
        f"continuous: requests join at most every {r['join_every_steps']} decode steps; prefix cache "
        f"{_cache_size(r.get('prefix_cache_mib'))} (each mode starts with it empty)",
        "",
        "| workload | batching | requests | failures | p50 | p99 | TTFT p50 | TTFT p99 | requests/s | tokens/s "
        "| rows per step / batch | prefix cache hits (prompt tokens reused) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w in r["workloads"]:
        hits = (
            f"{w['prefix_cache_hits']} of {w['prefix_cache_lookups']} ({w['prefix_cache_hit_tokens']})"
            if "prefix_cache_hits" in w
            else "-"
        )
        lines.append(
            f"| {w['workload']} | {w['batching']} | {w['requests']} | {w['failures']} | {w['p50_ms'] / 1e3:.2f} s "
            f"| {w['p99_ms'] / 1e3:.2f} s | {w['ttft_p50_ms'] / 1e3:.2f} s | {w['ttft_p99_ms'] / 1e3:.2f} s "
            f"| {w['requests_per_s']:.2f} | {w['tokens_per_s']:.1f} | {w['mean_batch_rows']:.1f} | {hits} |"
        )
    return "\n".join(lines) + "\n"


def _cache_size(mib: float | None) -> str:
    """The prefix cache's setting in words (results from before it existed say so)."""
    if mib is None:
        return "not built yet"
    return f"{mib:g} MiB" if mib else "off"


if __name__ == "__main__":
    main()
