"""The baselines a classification run scores next to its adapter (``eval.baseline``), on the same
held-out split, so that a run says whether the adapter earned its cost:

- ``base``: the frozen backbone with a trained head (the head-only method, i.e. a linear probe on
  the pretrained features), trained with the run's own train section (same budget: steps or epochs,
  batch, learning rate of the head) by a nested ``train()`` in ``<run_dir>/baseline-head-only``.
  It costs about one forward pass of the backbone per training row and step (no backward through it);
  a resumed run reuses a finished one. Not under DeepSpeed (a second engine in the same processes
  fails under ZeRO-3); under DDP the nested run shares the process group and leaves it up.
- ``classic``: TF-IDF + logistic regression on the same training rows (scikit-learn; seconds).
- ``negative_transfer``: the reference baselines the adapter scores below, by the compare suite's
  rule (adapters.evaluation.baselines.negative_transfer).

Causal-lm runs compare with the untouched base model instead (adapters.training.finalize).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from adapters.config import RunConfig, dump_config, load_config
from adapters.evaluation.baselines import negative_transfer, tfidf_logistic_regression
from adapters.training.report import headline_metric
from adapters.training.setup import TrainingRun, deepspeed_requested

HEAD_ONLY_DIR = "baseline-head-only"
_IN_BASELINE = ContextVar("adapterkit_in_baseline_run", default=False)


def in_baseline_run() -> bool:
    """Whether the current train() runs a baseline inside another run: it must then leave the process
    group (and anything else the enclosing run still uses) up when it finishes."""
    return _IN_BASELINE.get()


@contextmanager
def _baseline_scope():
    token = _IN_BASELINE.set(True)
    try:
        yield
    finally:
        _IN_BASELINE.reset(token)


def head_only_config(cfg: RunConfig, run_dir: Path) -> RunConfig:
    """The frozen-backbone baseline's config: `cfg` with method head-only, no baselines of its own, no
    checkpoints, no gradual unfreezing, no warm start and no publishing, in <run_dir>/baseline-head-only."""
    raw = dump_config(cfg)
    raw["method"] = {"name": "head-only", "options": {}}
    raw["eval"] = {**raw["eval"], "baseline": False}
    raw["train"] = {**raw["train"], "save_every": None, "unfreeze_every": None}
    raw["output"] = {
        **raw["output"],
        "run_dir": str(run_dir / HEAD_ONLY_DIR),
        "publish": False,
        "name": f"{cfg.output.name}-head-only",
    }
    raw["init_from"] = None
    return load_config(raw=raw)


def head_only_baseline(run: TrainingRun) -> dict[str, Any]:
    """Test metrics of the head trained alone on the frozen backbone, on the run's split (and fold).

    Every process must call it (the nested run is as distributed as the enclosing one). A finished
    baseline folder (its summary.json) is reused; an unfinished one is started over.
    """
    # loop -> finalize -> this module: a module-level import of train would be circular.
    from adapters.training.loop import train

    folder = run.run_dir / HEAD_ONLY_DIR
    summary = folder / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())["metrics"]["adapted"]
    if run.accelerator.is_main_process and folder.exists():
        shutil.rmtree(folder)  # a baseline interrupted before its end
    run.accelerator.wait_for_everyone()
    run.accelerator.print(f"baseline: training the head alone on the frozen backbone ({folder})")
    with _baseline_scope():
        result = train(head_only_config(run.cfg, run.run_dir), command=["baseline", "head-only"], fold=run.fold)
    return result.metrics["adapted"]


def classic_baseline(run: TrainingRun) -> dict[str, float]:
    """Test metrics of TF-IDF + logistic regression fitted on the run's training rows (same held-out
    split as the adapter: test, or validation when the data has no test rows)."""
    data, splits = run.cfg.data, run.prepared.splits
    test = splits["test"] if len(splits.get("test", [])) else splits["validation"]
    train_rows = splits["train"]
    fitted = tfidf_logistic_regression(
        train_rows[data.text_field],
        train_rows[data.label_field],
        test[data.text_field],
        test[data.label_field],
        run.prepared.labels,
        run.cfg.train.seed,
    )
    return fitted.metrics


def classification_baselines(run: TrainingRun, adapted: dict[str, Any]) -> dict[str, Any]:
    """{"base": frozen backbone + head, "classic": TF-IDF + logistic regression (test metrics each; base None
    under DeepSpeed, classic None when scikit-learn cannot fit it), "negative_transfer": the reference
    baselines the `adapted` test metrics fall below on the headline metric}. Every process must call it."""
    if deepspeed_requested():  # a second DeepSpeed engine in the same processes fails under ZeRO-3
        run.accelerator.print(
            "baseline: the frozen backbone + head is not measured under DeepSpeed; "
            "train method head-only on its own to compare"
        )
        base = None
    else:
        base = head_only_baseline(run)
    try:
        classic = classic_baseline(run)
    except ValueError as err:  # e.g. one class in the training rows: no baseline, but the run stands
        run.accelerator.print(f"baseline: TF-IDF + logistic regression failed ({err})")
        classic = None
    key = headline_metric(run.cfg.task)
    flags = negative_transfer(adapted.get(key), {"classic": (classic or {}).get(key)})
    return {"base": base, "classic": classic, "negative_transfer": flags}
