"""What a finished run prints: base vs adapted on held-out data, side by side, and where the adapter is."""

from __future__ import annotations


def headline_metric(task: str) -> str:
    return "exact_match" if task == "causal-lm" else "accuracy"


def format_result(result, cfg) -> str:
    key = headline_metric(cfg.task)
    adapted = result.metrics.get("adapted") or {}
    base = result.metrics.get("base") or {}
    lines = [
        "",
        f"held-out test ({key}, {cfg.data.name}):",
        f"  base model     {base.get(key, float('nan')):.3f}" if base else "  base model     (not evaluated)",
        f"  with adapter   {adapted.get(key, float('nan')):.3f}",
        f"trainable params {result.trainable_params:,} of {result.total_params:,} "
        f"({100 * result.trainable_params / max(1, result.total_params):.2f}%)",
        f"trained {result.steps} steps in {result.train_seconds:.0f}s ({result.tokens_per_second:.0f} tokens/s)",
        f"adapter: {result.adapter_dir}",
    ]
    if result.adapter_ref:
        lines.append(f"published as: {result.adapter_ref}")
    lines.append(f"run folder: {result.run_dir} (metrics.jsonl, summary.json, TensorBoard events)")
    return "\n".join(lines)


def print_result(result, cfg) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(format_result(result, cfg), flush=True)
