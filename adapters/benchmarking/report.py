"""The compare report, from results.jsonl alone: per-arm summaries over seeds, negative-transfer
flags, a Markdown table and matplotlib plots (metric vs trainable parameters, metric vs
training time, loss curves)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from adapters.evaluation.baselines import REFERENCE_BASELINES, REFERENCE_NAMES, negative_transfer
from adapters.paths import atomic_path

ARM_NAMES = {"base": "base model", **REFERENCE_NAMES}


@dataclass
class ArmSummary:
    """One (task, arm) over its seeds: mean and std of the headline metric, mean costs and speeds."""

    task: str
    task_type: str
    arm: str
    kind: str
    metric_name: str
    seeds: list[int]
    metric_mean: float | None
    metric_std: float | None
    trainable_params: float | None = None
    adapter_bytes: float | None = None
    adapter_weights_bytes: float | None = None
    tokens_per_second: float | None = None
    samples_per_second: float | None = None
    peak_memory_bytes: float | None = None
    train_seconds: float | None = None
    wall_seconds: float | None = None
    seconds_to_target: float | None = None
    reached_target: int = 0
    negative_transfer: list[str] = field(default_factory=list)  # which reference arms it scored below
    loss_curve: list[list[float]] = field(default_factory=list)  # mean over seeds

    @property
    def n(self) -> int:
        """The number of seeds."""
        return len(self.seeds)


def _mean(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(values) if values else None


def _mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    """Mean loss at the steps every seed logged."""
    by_step: dict[float, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    return [[s, statistics.fmean(v)] for s, v in sorted(by_step.items()) if len(v) == len(curves)]


def summarize(records: list[dict]) -> list[ArmSummary]:
    """One summary per (task, arm) over its seeds, with negative-transfer flags set, in record order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for rec in records:
        if rec.get("status") == "ok":
            groups.setdefault((rec["task"], rec["arm"]), []).append(rec)
    summaries = []
    for (task, arm), recs in groups.items():
        metrics = [r["metric"] for r in recs if isinstance(r.get("metric"), (int, float))]
        reached = [r["seconds_to_target"] for r in recs if r.get("seconds_to_target") is not None]
        curves = [r["loss_curve"] for r in recs if r.get("loss_curve")]
        summaries.append(
            ArmSummary(
                task=task,
                task_type=recs[0].get("task_type", ""),
                arm=arm,
                kind=recs[0]["kind"],
                metric_name=recs[0]["metric_name"],
                seeds=[r["seed"] for r in recs],
                metric_mean=_mean(metrics),
                metric_std=statistics.stdev(metrics) if len(metrics) > 1 else (0.0 if metrics else None),
                trainable_params=_mean(r.get("trainable_params") for r in recs),
                adapter_bytes=_mean(r.get("adapter_bytes") for r in recs),
                adapter_weights_bytes=_mean(r.get("adapter_weights_bytes") for r in recs),
                tokens_per_second=_mean(r.get("tokens_per_second") for r in recs),
                samples_per_second=_mean(r.get("samples_per_second") for r in recs),
                peak_memory_bytes=_mean(r.get("peak_memory_bytes") for r in recs),
                train_seconds=_mean(r.get("train_seconds") for r in recs),
                wall_seconds=_mean(r.get("wall_seconds") for r in recs),
                seconds_to_target=_mean(reached),
                reached_target=len(reached),
                loss_curve=_mean_curve(curves) if curves else [],
            )
        )
    flag_negative_transfer(summaries)
    return summaries


def flag_negative_transfer(summaries: list[ArmSummary]) -> None:
    """Mark every arm built on the pretrained model whose mean metric is below a reference arm's mean
    (adapters.evaluation.baselines.negative_transfer)."""
    for task in {s.task for s in summaries}:
        arms = [s for s in summaries if s.task == task]
        refs = {s.arm: s.metric_mean for s in arms if s.arm in REFERENCE_BASELINES and s.metric_mean is not None}
        for s in arms:
            if s.arm in REFERENCE_BASELINES or s.metric_mean is None:
                continue
            s.negative_transfer = negative_transfer(s.metric_mean, refs)


# ---------------------------------------------------------------- table
def _num(x: float | None, digits: int = 0, suffix: str = "") -> str:
    if x is None:
        return "–"
    return f"{x:,.{digits}f}{suffix}"


def _bytes(x: float | None) -> str:
    if x is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(x) < 1024 or unit == "GB":
            return f"{x:,.0f} {unit}" if unit == "B" else f"{x:,.1f} {unit}"
        x /= 1024
    return "–"


def _params(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def _adapter_size(s: ArmSummary) -> str:
    if s.kind in ("classic", "zero-shot") or not s.adapter_bytes:
        return "–"
    return f"{_bytes(s.adapter_weights_bytes)} ({_bytes(s.adapter_bytes)})"


def arm_title(s: ArmSummary, records_by_arm: dict | None = None) -> str:
    """The arm's row title in the table (baselines spelled out)."""
    if s.kind == "zero-shot":
        return "base model (zero-shot)"
    if s.kind == "base":
        return "base model (frozen, head-only)"
    if s.kind == "scratch":
        return "from scratch (random init, full)"
    if s.kind == "classic":
        return "TF-IDF + logistic regression"
    return s.arm


def markdown_table(records: list[dict], header: dict | None = None) -> str:
    """table.md: the header's facts, how to read the table, one table per task, then the failed cells."""
    summaries = summarize(records)
    header = header or {}
    lines = [f"# Method comparison: {header.get('suite', '')}".rstrip(), ""]
    for key in ("description", "budget", "seeds", "environment", "load", "wall time", "command"):
        if header.get(key):
            lines.append(f"- {key}: {header[key]}")
    lines += [
        "",
        "Held-out test metric: mean ± std over seeds (n). Throughput counts real (non-padding) tokens "
        "during training, evaluation excluded. Adapter weights: the saved safetensors; the folder adds config, "
        "manifest and the drift reference. Peak memory: " + _memory_kind(records) + ". Time to target: training time "
        "until the validation metric first reached the target (mean over the seeds that reached it). "
        "**Negative transfer**: an arm on the pretrained model scoring below the from-scratch or the classic "
        "baseline.",
        "",
    ]
    targets = {r["task"]: r.get("target") for r in records if r.get("status") == "ok"}
    budgets = {r["task"]: r.get("budget") for r in records if r.get("status") == "ok"}
    for task in dict.fromkeys(s.task for s in summaries):
        arms = [s for s in summaries if s.task == task]
        target = targets.get(task)
        target_col = "time to target"
        if target:
            target_col = f"time to {target['metric']} {'≥' if target['mode'] == 'max' else '≤'} {target['value']:g}"
        budget = f", budget {budgets[task]} per run" if budgets.get(task) else ""
        lines += [
            f"## {task} ({arms[0].task_type}, test {arms[0].metric_name}{budget})",
            "",
            f"| arm | {arms[0].metric_name} | trainable params | adapter weights (folder) | train tokens/s "
            f"| train samples/s | peak memory | train time | wall time | {target_col} | negative transfer |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [_table_row(s, target) for s in arms]
        lines.append("")
    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        lines += ["## Failed cells", ""] + [f"- {r['key']}: {r.get('error')}" for r in failed] + [""]
    return "\n".join(lines)


def _table_row(s: ArmSummary, target: dict | None) -> str:
    metric = f"{s.metric_mean:.4f} ± {s.metric_std:.4f} ({s.n})" if s.metric_mean is not None else "–"
    if s.kind in ("classic", "zero-shot") or not target:
        ttt = "–"
    elif s.reached_target:
        ttt = f"{s.seconds_to_target:.1f} s ({s.reached_target}/{s.n})"
    else:
        ttt = f"not reached (0/{s.n})"
    if s.negative_transfer:
        flag = "**yes** (below " + ", ".join(ARM_NAMES[r] for r in s.negative_transfer) + ")"
    else:
        flag = "" if s.arm in REFERENCE_BASELINES else "no"
    train_time = _num(s.train_seconds, 1, " s") if s.kind != "zero-shot" else "–"
    return (
        f"| {arm_title(s)} | {metric} | {_params(s.trainable_params)} | {_adapter_size(s)} | "
        f"{_num(s.tokens_per_second)} | {_num(s.samples_per_second, 1)} | {_bytes(s.peak_memory_bytes)} | "
        f"{train_time} | {_num(s.wall_seconds, 1, ' s')} | {ttt} | {flag} |"
    )


def _memory_kind(records: list[dict]) -> str:
    kinds = {r.get("memory_kind") for r in records if r.get("status") == "ok"}
    if kinds == {"cuda_max_memory_allocated"}:
        return "torch.cuda.max_memory_allocated during the cell"
    return "process RSS sampled during the cell (all cells share one process)"


# ---------------------------------------------------------------- plots
_PALETTE = [
    "tab:blue",
    "tab:green",
    "tab:orange",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:gray",
]
_SHORT_TITLES = {
    "zero-shot": "base (zero-shot)",
    "base": "base (head-only)",
    "scratch": "from scratch",
    "classic": "TF-IDF + LR",
}


def short_title(s: ArmSummary) -> str:
    """The arm's label in the plots."""
    return _SHORT_TITLES.get(s.kind, s.arm)


def _atomic_savefig(fig, path: Path) -> None:
    with atomic_path(path, mode=0o644) as tmp:  # results are meant to be read and committed
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def write_plots(records: list[dict], out_dir: Path) -> dict[str, Path]:
    """metric_vs_params.png, metric_vs_time.png and loss_curves.png (one panel per task); returns their paths.

    Figures are made without pyplot, so no GUI backend is needed and the caller's is left alone.
    """
    summaries = summarize(records)
    tasks = list(dict.fromkeys(s.task for s in summaries))
    if not tasks:
        return {}
    out_dir = Path(out_dir)
    paths = {}
    for name, xfield, xlabel in (
        ("metric_vs_params", "trainable_params", "trainable parameters (log)"),
        ("metric_vs_time", "train_seconds", "training time, s (log)"),
    ):
        fig = Figure(figsize=(5.5 * len(tasks), 4.2))
        axes = fig.subplots(1, len(tasks), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            arms = [s for s in summaries if s.task == task and s.metric_mean is not None]
            for i, s in enumerate(arms):
                x = getattr(s, xfield)
                if not x:  # nothing trained (zero-shot): a reference line
                    ax.axhline(s.metric_mean, linestyle="--", color="gray", linewidth=1)
                    ax.annotate(
                        short_title(s),
                        (0.01, s.metric_mean),
                        xycoords=("axes fraction", "data"),
                        fontsize=7,
                        color="gray",
                        va="bottom",
                    )
                    continue
                marker = "x" if s.arm in REFERENCE_BASELINES or s.kind == "base" else "o"
                color = "tab:red" if s.negative_transfer else _PALETTE[i % len(_PALETTE)]
                ax.errorbar(x, s.metric_mean, yerr=s.metric_std or 0, fmt=marker, color=color, capsize=3)
                ax.annotate(short_title(s), (x, s.metric_mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.set_xscale("log")
            ax.margins(x=0.2)  # room for the labels of the rightmost points
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"test {arms[0].metric_name}" if arms else "")
            ax.set_title(task)
            ax.grid(alpha=0.3)
        fig.suptitle("red: negative transfer (below from-scratch or classic)", fontsize=8)
        paths[name] = out_dir / f"{name}.png"
        _atomic_savefig(fig, paths[name])

    fig = Figure(figsize=(5.5 * len(tasks), 4.2))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for s in summaries:
            if s.task == task and s.loss_curve:
                steps, losses = zip(*s.loss_curve)
                ax.plot(steps, losses, label=arm_title(s), linewidth=1.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.set_yscale("log")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    paths["loss_curves"] = out_dir / "loss_curves.png"
    _atomic_savefig(fig, paths["loss_curves"])
    return paths


def write_report(records: list[dict], out_dir: Path, header: dict | None = None) -> dict[str, Path]:
    """table.md + the PNGs in out_dir; returns their paths."""
    out_dir = Path(out_dir)
    table = out_dir / "table.md"
    with atomic_path(table, mode=0o644) as tmp:
        tmp.write_text(markdown_table(records, header))
    return {"table": table, **write_plots(records, out_dir)}
