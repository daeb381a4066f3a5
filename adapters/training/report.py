"""What a finished run prints: baselines vs adapted on held-out data, side by side, and where the adapter is."""

from __future__ import annotations

from accelerate import PartialState

from adapters.evaluation.baselines import REFERENCE_NAMES


def headline_metric(task: str) -> str:
    """The test metric a run is judged by: exact_match for causal LMs, accuracy for classifiers."""
    return "exact_match" if task == "causal-lm" else "accuracy"


def baseline_lines(metrics: dict, task: str) -> list[str]:
    """The held-out headline metric of the baselines and the adapter, one line each, the adapter's
    line flagging negative transfer (adapters.training.baselines)."""
    key = headline_metric(task)
    adapted, base, classic = (metrics.get(k) or {} for k in ("adapted", "base", "classic"))
    base_name = "base model" if task == "causal-lm" else "frozen backbone + head"
    rows = [(base_name, base.get(key) if base else None)]
    if "classic" in metrics:
        rows.append((REFERENCE_NAMES["classic"], classic.get(key) if classic else None))
    width = max(len(name) for name, _ in rows + [("with adapter", None)]) + 3
    lines = [f"  {name:<{width}}{'(not evaluated)' if value is None else f'{value:.3f}'}" for name, value in rows]
    flags = metrics.get("negative_transfer") or []
    flag = f"   negative transfer: below {', '.join(REFERENCE_NAMES.get(f, f) for f in flags)}" if flags else ""
    lines.append(f"  {'with adapter':<{width}}{adapted.get(key, float('nan')):.3f}{flag}")
    return lines


def format_result(result, cfg) -> str:
    """The text printed after training: baselines vs adapted headline metric, parameters, speed, folders."""
    key = headline_metric(cfg.task)
    lines = [
        "",
        f"held-out test ({key}, {cfg.data.name}):",
        *baseline_lines(result.metrics, cfg.task),
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
    """Print format_result on the main process only."""
    if PartialState().is_main_process:
        print(format_result(result, cfg), flush=True)
