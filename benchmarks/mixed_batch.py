"""Throughput of one batch mixing 16 adapters vs one adapter vs adapter-by-adapter (SmolLM2-135M).

    .venv/bin/python benchmarks/mixed_batch.py [--adapters 16] [--new-tokens 32] [--rounds 3] [--threads 1]

The same 16 chat requests (greedy, every row generates --new-tokens tokens) are served:
- single: one batch, every row on the same adapter;
- mixed: one batch, each row on its own adapter (the engine's stacked-bmm LoRA path);
- mixed, peft loop: the same batch through peft's own per-adapter loop (fast path off);
- adapter by adapter, resident swaps: 16 batches of one row, activating each adapter in turn;
- adapter by adapter, loads: an engine holding one adapter at a time loads each from the store.
Tokens/s are medians over --rounds. Writes benchmarks/results/mixed_batch.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _bench_adapters import BASE, machine, publish_random_loras  # noqa: E402

from adapters.modeling.generation import SamplingParams  # noqa: E402
from adapters.serving.engine import GenerationRequest, InferenceEngine  # noqa: E402

TOPICS = [
    "the sea",
    "a forest",
    "the moon",
    "coffee",
    "rain",
    "a library",
    "trains",
    "winter",
    "music",
    "a garden",
    "the desert",
    "bicycles",
    "bread",
    "mountains",
    "a lighthouse",
    "autumn",
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6, help="rounds of the single and mixed batches")
    p.add_argument(
        "--slow-rounds", type=int, default=2, help="of which also run the slow modes (peft loop, one by one)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared; see load_avg)")
    p.add_argument("--out", default="benchmarks/results/mixed_batch")
    args = p.parse_args()

    torch.set_num_threads(args.threads)

    n = args.adapters
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    messages = [
        [{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}] for i in range(n)
    ]
    results: dict = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "base": BASE,
        "rows": n,
        "new_tokens": args.new_tokens,
    }
    with tempfile.TemporaryDirectory() as tmp:
        refs = publish_random_loras(Path(tmp) / "store", n)
        engine = InferenceEngine(BASE, capacity=n, store=Path(tmp) / "store")
        for r in refs:
            engine.load(r)

        def batch(adapters):
            return [GenerationRequest(adapter=a, messages=m, params=params) for a, m in zip(adapters, messages)]

        def run_batch(adapters) -> tuple[float, list]:
            t0 = time.perf_counter()
            out = engine.generate(batch(adapters))
            return time.perf_counter() - t0, out

        def run_one_by_one(eng, adapters) -> tuple[float, list]:
            t0 = time.perf_counter()
            out = []
            for a, m in zip(adapters, messages):
                eng.activate(a)
                out += eng.generate([GenerationRequest(adapter=a, messages=m, params=params)])
            return time.perf_counter() - t0, out

        run_batch([refs[0]] * n)  # warm-up
        modes: dict[str, list[float]] = {
            k: [] for k in ("single", "mixed", "mixed_peft_loop", "one_by_one_resident", "one_by_one_loads")
        }
        outputs = {}
        one_slot = InferenceEngine(BASE, capacity=1, store=Path(tmp) / "store")
        one_slot.load(refs[-1])
        # The machine is shared: modes alternate within each round, and ratios are taken between
        # runs of the same round (paired), so a busy minute slows both sides of a ratio.
        for k in range(args.rounds):
            modes["single"].append(run_batch([refs[0]] * n)[0])
            seconds, outputs["mixed"] = run_batch(refs)
            modes["mixed"].append(seconds)
            if k < args.slow_rounds:
                engine._layers.mixed.enabled = False
                seconds, outputs["mixed_peft_loop"] = run_batch(refs)
                modes["mixed_peft_loop"].append(seconds)
                engine._layers.mixed.enabled = True
                seconds, outputs["one_by_one"] = run_one_by_one(engine, refs)
                modes["one_by_one_resident"].append(seconds)
                modes["one_by_one_loads"].append(run_one_by_one(one_slot, refs)[0])

    tokens = n * args.new_tokens
    results["modes"] = {
        k: {
            "seconds_median": statistics.median(v),
            "seconds_min": min(v),
            "seconds": v,
            "tokens_per_s": tokens / statistics.median(v),
            "tokens_per_s_best": tokens / min(v),
        }
        for k, v in modes.items()
    }
    results["same_tokens"] = {
        "mixed_vs_peft_loop": [r.token_ids for r in outputs["mixed"]]
        == [r.token_ids for r in outputs["mixed_peft_loop"]],
        "mixed_vs_one_by_one": [r.token_ids for r in outputs["mixed"]] == [r.token_ids for r in outputs["one_by_one"]],
    }

    def paired(a: str, b: str) -> float:
        """Median over rounds of throughput(a) / throughput(b) measured in the same round."""
        return statistics.median(tb / ta for ta, tb in zip(modes[a], modes[b]))

    results["ratios"] = {
        "mixed_over_single": paired("mixed", "single"),
        "mixed_over_one_by_one_resident": paired("mixed", "one_by_one_resident"),
        "mixed_over_one_by_one_loads": paired("mixed", "one_by_one_loads"),
        "mixed_over_peft_loop": paired("mixed", "mixed_peft_loop"),
        "note": "paired: median over rounds of the ratio of two modes run in the same round",
    }
    results["targets"] = {
        "mixed_ge_0.8x_single": results["ratios"]["mixed_over_single"] >= 0.8,
        "mixed_ge_4x_one_by_one_with_swaps": results["ratios"]["mixed_over_one_by_one_resident"] >= 4,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(render_md(results))
    print(render_md(results))


def render_md(r: dict) -> str:
    m = r["machine"]
    labels = {
        "single": f"one batch of {r['rows']}, one adapter",
        "mixed": f"**one batch of {r['rows']}, {r['rows']} adapters (mixed)**",
        "mixed_peft_loop": "same mixed batch, peft's per-adapter loop",
        "one_by_one_resident": f"{r['rows']} batches of 1, resident swaps",
        "one_by_one_loads": f"{r['rows']} batches of 1, loading each adapter (1 slot)",
    }
    lines = [
        f"# Mixed-adapter batch throughput (SmolLM2-135M, LoRA r=8, {r['rows']} chat requests x {r['new_tokens']} new tokens, greedy)",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, load average at start "
        f"{tuple(round(x, 1) for x in m['load_avg'])} (shared machine), git {m['git']}",
        "",
        "| how the requests are served | runs | seconds (median) | tokens/s (median) | tokens/s (best run) | mixed is (paired) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratio_key = {
        "single": "mixed_over_single",
        "mixed_peft_loop": "mixed_over_peft_loop",
        "one_by_one_resident": "mixed_over_one_by_one_resident",
        "one_by_one_loads": "mixed_over_one_by_one_loads",
    }
    for k, label in labels.items():
        v = r["modes"][k]
        ratio = f"{r['ratios'][ratio_key[k]]:.2f}x" if k in ratio_key else "1.00x"
        lines.append(
            f"| {label} | {len(v['seconds'])} | {v['seconds_median']:.2f} | {v['tokens_per_s']:.1f} | {v['tokens_per_s_best']:.1f} | {ratio} |"
        )
    lines += [
        "",
        f"Same tokens: {r['same_tokens']}  ",
        "Targets: " + ", ".join(f"{k}: {v}" for k, v in r["targets"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
