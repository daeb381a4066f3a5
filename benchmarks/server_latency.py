"""Server latency and throughput on loopback at a fixed concurrency (SmolLM2-135M, LoRA r=8).

    .venv/bin/python benchmarks/server_latency.py [--clients 16] [--requests 3] [--max-tokens 16] [--threads 1]

The server runs in this process (uvicorn on 127.0.0.1, a free port); --clients threads each
send --requests completions back to back (greedy, max_tokens tokens each, ignore_eos). Three
workloads:
- one adapter: every client uses the same adapter;
- 16 adapters, mixing: each client its own adapter, batches may mix adapters;
- 16 adapters, no mixing: the same, but the batcher runs one batch per adapter.
Writes benchmarks/results/server_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_adapters import BASE, machine, publish_random_loras  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=3, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--window-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared; see load_avg)")
    p.add_argument("--out", default="benchmarks/results/server_latency")
    args = p.parse_args()
    import httpx
    import torch

    torch.set_num_threads(args.threads)
    from adapters.serving.engine import InferenceEngine
    from adapters.serving.http.app import BackgroundServer, ServerSettings, create_app

    results: dict = {"command": "python " + " ".join(sys.argv), "machine": machine(), "base": BASE, "clients": args.clients,
                     "requests_per_client": args.requests, "max_tokens": args.max_tokens, "batch_window_ms": args.window_ms}
    with tempfile.TemporaryDirectory() as tmp:
        refs = publish_random_loras(Path(tmp) / "store", args.clients)
        engine = InferenceEngine(BASE, capacity=args.clients, store=Path(tmp) / "store")
        for r in refs:
            engine.load(r)

        def workload(name: str, adapters: list[str], mix: bool) -> dict:
            settings = ServerSettings(batch_window_ms=args.window_ms, max_batch_size=args.clients, mix_adapters=mix, max_tokens=args.max_tokens)
            latencies: list[float] = []
            failures: list[str] = []
            with BackgroundServer(create_app(engine, settings)) as server:
                def client(i: int) -> None:
                    with httpx.Client(base_url=server.url, timeout=600) as http:
                        for k in range(args.requests):
                            body = {"model": adapters[i], "prompt": f"Client {i} request {k}: write about the weather.",
                                    "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
                            t0 = time.perf_counter()
                            r = http.post("/v1/completions", json=body)
                            latencies.append(time.perf_counter() - t0)
                            if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != args.max_tokens:
                                failures.append(r.text[:200])

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
            lat = sorted(latencies)
            batches = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("adapterkit_batch_rows_count")))
            rows = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("adapterkit_batch_rows_sum")))
            return {
                "workload": name, "requests": len(lat), "failures": len(failures), "wall_seconds": wall,
                "p50_ms": statistics.median(lat) * 1e3, "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3,
                "requests_per_s": len(lat) / wall, "tokens_per_s": len(lat) * args.max_tokens / wall,
                "mean_batch_rows": rows / batches if batches else None,
            }

        results["workloads"] = [
            workload("one adapter", [refs[0]] * args.clients, mix=True),
            workload(f"{args.clients} adapters, mixed batches", refs, mix=True),
            workload(f"{args.clients} adapters, one batch per adapter", refs, mix=False),
        ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(render_md(results))
    print(render_md(results))


def render_md(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# Server latency at {r['clients']} concurrent clients (SmolLM2-135M, LoRA r=8, {r['max_tokens']} new tokens per request)",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, load average at start "
        f"{tuple(round(x, 1) for x in m['load_avg'])} (shared machine), git {m['git']}; loopback HTTP, batching window {r['batch_window_ms']} ms",
        "",
        "| workload | requests | failures | p50 | p99 | requests/s | tokens/s | rows per batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w in r["workloads"]:
        lines.append(f"| {w['workload']} | {w['requests']} | {w['failures']} | {w['p50_ms'] / 1e3:.2f} s | {w['p99_ms'] / 1e3:.2f} s | "
                     f"{w['requests_per_s']:.2f} | {w['tokens_per_s']:.1f} | {w['mean_batch_rows']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
