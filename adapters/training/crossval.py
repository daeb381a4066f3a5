"""Stratified k-fold cross-validation: one training per fold, metrics reported as mean ± std.

The held-out test split is carved once, before the folds, so no fold ever trains on it; the
rest rotates between training and validation. Each fold is a full run in <run_dir>/fold-<i>.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from adapters.config import RunConfig
from adapters.data.splits import aggregate_folds, format_folds
from adapters.training.finalize import TrainResult
from adapters.training.loop import train
from adapters.training.setup import default_run_dir


@dataclass
class CrossValResult:
    """The folds' runs and their metrics aggregated as {metric: {"mean", "std", "values"}}."""

    run_dir: Path
    folds: list[TrainResult]  # one per fold
    validation: dict  # {metric: {mean, std, values}}
    test: dict


def cross_validate(cfg: RunConfig, command: list[str] | None = None) -> CrossValResult:
    """Train data.split.folds runs (fold i validates on the i-th of k stratified folds), never
    publishing; writes crossval.json / crossval.md into the run folder. The usual k-fold
    protocol (e.g. scikit-learn's StratifiedKFold), with a test split fixed before the folds."""
    k = cfg.data.split.folds
    root = default_run_dir(cfg)
    results = []
    for i in range(k):
        output = cfg.output.model_copy(update={"run_dir": str(root / f"fold-{i}"), "publish": False})
        fold_cfg = cfg.model_copy(update={"output": output})
        results.append(train(fold_cfg, command=command, fold=i))
    validation = aggregate_folds([_numeric(r.metrics["validation"]) for r in results])
    test = aggregate_folds([_numeric(r.metrics["adapted"]) for r in results])
    root.mkdir(parents=True, exist_ok=True)
    (root / "crossval.json").write_text(json.dumps({"folds": k, "validation": validation, "test": test}, indent=2))
    (root / "crossval.md").write_text(
        f"# {k}-fold cross-validation\n\n## validation\n\n```\n{format_folds(validation)}\n```\n\n"
        f"## test (same held-out split for every fold)\n\n```\n{format_folds(test)}\n```\n"
    )
    return CrossValResult(root, results, validation, test)


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
