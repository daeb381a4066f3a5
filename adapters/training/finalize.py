"""After the loop: best weights back, held-out test (base vs adapted), the adapter folder with its
manifest and drift reference, optional publishing to the store (once per run), summary.json (last:
its presence marks a finished run, which a resume returns without training again)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from adapters.config import RunConfig, dump_config
from adapters.data.loading import PreparedData, label_words
from adapters.data.prompts import PromptFormat
from adapters.evaluation.evaluator import adapter_disabled
from adapters.modeling.builtins import resolve_model
from adapters.modeling.portable import write_portable_files
from adapters.monitoring.reference import build_training_reference
from adapters.paths import atomic_path
from adapters.store.fingerprint import fingerprint_dataset, fingerprint_model, fingerprint_tokenizer
from adapters.store.manifest import build_manifest, write_manifest
from adapters.training.baselines import classification_baselines, in_baseline_run
from adapters.training.checkpoint import load_trainable_state_dict, replace_folder
from adapters.training.objectives import objective_entry
from adapters.training.run_record import SUMMARY_FILE, finished_summary, publish_once
from adapters.training.setup import TrainingRun
from adapters.training.state import EarlyStopping, TrainState
from adapters.training.validation import Validator, evaluate_split


@dataclass
class TrainResult:
    """What train() returns. Seconds are wall-clock; train_seconds includes the evaluations inside
    the loop (eval_seconds of it); tokens are real (non-padding) tokens of all processes."""

    run_dir: Path
    adapter_dir: Path
    # {"base": {...} | None, "adapted": {...}, "validation": {...}}; a classification run with eval.baseline
    # adds "classic" ({...} | None) and "negative_transfer" ([baseline names]) (adapters.training.baselines).
    metrics: dict
    steps: int
    trainable_params: int
    total_params: int
    train_seconds: float
    tokens_per_second: float
    adapter_ref: str | None = None
    history: list = field(default_factory=list)
    tokens_seen: int = 0  # real (non-padding) tokens, all processes
    samples_seen: int = 0
    eval_seconds: float = 0.0  # evaluation inside the loop, included in train_seconds


def finalize(
    run: TrainingRun, state: TrainState, stopper: EarlyStopping, validator: Validator, finished: bool = True
) -> TrainResult:
    """Finish a run whose loop ended: restore the best weights, evaluate, save, publish.

    Writes <run_dir>/adapter (weights, manifest.json with metrics and drift reference; assembled in
    <run_dir>/adapter.partial and renamed, so a kill never leaves a half-written adapter) and
    <run_dir>/summary.json; publishes to the store when output.publish, once per run (run_record.
    publish_once). finished: false for a loop ended by train()'s stop_after, as an interruption
    would end it: nothing is published and a resume continues the run. Every process must call it
    (saving and the drift reference are collectives under ZeRO-3).
    """
    accelerator, processes = run.accelerator, run.accelerator.num_processes
    train_seconds = state.elapsed()
    tokens_per_second = state.tokens_seen * processes / max(train_seconds, 1e-9)
    eval_seconds = validator.seconds
    if stopper.best_state is not None and stopper.best_step != state.step:
        accelerator.print(
            f"restoring the best checkpoint (step {stopper.best_step}, {stopper.metric}={stopper.best_value:.4f})"
        )
        load_trainable_state_dict(accelerator.unwrap_model(run.model), stopper.best_state)

    generated: dict = {}  # the adapted model's test answers and confidences: the drift reference's predictions
    results = final_metrics(run, validator, generated)
    run.metrics_log.write(state.step, {"event": "test", **{f"test_{k}": v for k, v in results["adapted"].items()}})

    adapter_dir, staged = run.run_dir / "adapter", run.run_dir / "adapter.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staged, ignore_errors=True)  # left by a run killed while writing its adapter
    save_adapter(accelerator, run.model, run.method, staged)
    # Drift reference for monitoring after deployment; every rank runs it (a collective under ZeRO-3).
    reference = build_training_reference(
        accelerator.unwrap_model(run.model),
        run.tokenizer,
        run.cfg,
        run.prepared,
        staged,
        write=accelerator.is_main_process,
        generated=generated,
    )
    if finished and run.cfg.eval.baseline and run.cfg.task == "sequence-classification":
        results.update(classification_baselines(run, results["adapted"]))  # every rank: a nested run
    ref = None
    if accelerator.is_main_process:
        write_portable_files(staged, accelerator.unwrap_model(run.model), run.tokenizer, run.cfg.output.name)
        write_manifest(staged, run_manifest(run, results, reference))
        replace_folder(staged, adapter_dir)
        if run.cfg.output.publish and finished:
            ref = publish_once(run, adapter_dir)
        summary = {
            "run_dir": str(run.run_dir),
            "adapter_dir": str(adapter_dir),
            "adapter_ref": ref,
            "steps": state.step,
            "trainable_params": run.trainable_params,
            "total_params": run.total_params,
            "train_seconds": train_seconds,
            "tokens_per_second": tokens_per_second,
            "tokens_seen": state.tokens_seen * processes,
            "samples_seen": state.samples_seen * processes,
            "eval_seconds": eval_seconds,
            "metrics": results,
            "run_id": run.run_id,
            "finished": finished,
        }
        with atomic_path(run.run_dir / SUMMARY_FILE, mode=0o644) as tmp:
            tmp.write_text(json.dumps(summary, indent=2, default=str))
    if in_baseline_run():  # the enclosing run still needs the process group that end_training destroys
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()
    return TrainResult(
        run.run_dir,
        adapter_dir,
        results,
        state.step,
        run.trainable_params,
        run.total_params,
        train_seconds,
        tokens_per_second,
        ref,
        state.history,
        state.tokens_seen * processes,
        state.samples_seen * processes,
        eval_seconds,
    )


def finished_result(cfg: RunConfig) -> TrainResult | None:
    """The TrainResult of the run in output.run_dir if it finished with this config (run_record.
    finished_summary), read back from its summary.json and metrics.jsonl; None otherwise."""
    summary = finished_summary(cfg)
    if summary is None:
        return None
    run_dir = Path(cfg.output.run_dir)  # where the run is now, should the folder have moved since
    log = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    history = [{"step": r["step"], "loss": r["loss"]} for r in rows if "loss" in r]
    return TrainResult(
        run_dir,
        run_dir / "adapter",
        summary["metrics"],
        summary["steps"],
        summary["trainable_params"],
        summary["total_params"],
        summary["train_seconds"],
        summary["tokens_per_second"],
        summary.get("adapter_ref"),
        history,
        summary.get("tokens_seen", 0),
        summary.get("samples_seen", 0),
        summary.get("eval_seconds", 0.0),
    )


def final_metrics(run: TrainingRun, validator: Validator, generated: dict) -> dict[str, dict | None]:
    """{"validation": ..., "adapted": test metrics, "base": the base model's test metrics or None}
    (classification's baselines join later: adapters.training.baselines).

    The base is measured here with the adapter switched off, unless setup measured it already
    (methods that change the base's own weights) or eval.baseline is off or the task is not causal-lm.
    `generated` receives the adapted model's test answers and confidences.
    """
    cfg, accelerator = run.cfg, run.accelerator
    results = {"validation": validator()}
    results["adapted"] = evaluate_split(
        run.model,
        run.test_split,
        run.tokenizer,
        accelerator,
        cfg,
        run.prepared,
        generate=True,
        out_dir=run.run_dir,
        collect=generated,
    )
    results["base"] = run.base_results
    if cfg.eval.baseline and cfg.task == "causal-lm" and run.base_results is None:
        with adapter_disabled(run.model):
            results["base"] = evaluate_split(
                run.model, run.test_split, run.tokenizer, accelerator, cfg, run.prepared, generate=True
            )
    return results


def save_adapter(accelerator: Accelerator, model, method, folder: Path) -> None:
    """Save what training changed (the method decides the files). Under ZeRO-3 the sharded
    parameters are gathered on every rank first, so every process must call it."""
    state_dict = None
    if accelerator.distributed_type.value == "DEEPSPEED":
        state_dict = accelerator.get_state_dict(model)  # collective: all ranks must call it
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        folder.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:
            method.save(unwrapped, folder, state_dict=state_dict)
        else:
            method.save(unwrapped, folder)
    accelerator.wait_for_everyone()


def run_manifest(run: TrainingRun, results: dict, reference: dict | None) -> dict[str, Any]:
    """The adapter's manifest.json (adapters.store.manifest.build_manifest) for a finished run."""
    cfg = run.cfg
    return build_manifest(
        name=cfg.output.name,
        task=cfg.task,
        method={"name": run.method.name, "options": run.options.model_dump(mode="json")},
        base_model=base_model_entry(cfg),
        labels=run.prepared.labels,
        prompt={**PromptFormat.from_data_config(cfg.data).spec(), "label_names": label_words(cfg.data)},
        training=dump_config(cfg),
        data=data_entry(cfg, run.prepared),
        metrics={
            "test": scalars(results["adapted"]),
            "base": scalars(results["base"]) if results["base"] else None,
            "validation": scalars(results["validation"]),
            "classic": scalars(results["classic"]) if results.get("classic") else None,
            "negative_transfer": results.get("negative_transfer"),
        },
        parent=run.parent,
        reference=reference,
        objective=objective_entry(run.objective),
    )


def scalars(metrics: dict | None) -> dict[str, float | None]:
    """Numeric metrics for the manifest; a non-finite value (a diverged run) is recorded as None."""
    return {
        k: (v if math.isfinite(v) else None)
        for k, v in (metrics or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def base_model_entry(cfg: RunConfig) -> dict[str, Any]:
    """The manifest's base_model: name, resolved path, revision, weight and tokenizer fingerprints, quantization."""
    path = resolve_model(cfg.model.name)
    return {
        "name": cfg.model.name,
        "path": path,
        "revision": cfg.model.revision,
        "fingerprint": fingerprint_model(path),
        "tokenizer_fingerprint": fingerprint_tokenizer(path),
        "quantization": cfg.model.quantization.model_dump() if cfg.model.quantization else None,
    }


def data_entry(cfg: RunConfig, prepared: PreparedData) -> dict[str, Any]:
    """The manifest's data: source, fingerprint of the training rows, rows per split."""
    return {
        "source": cfg.data.name,
        "fingerprint": fingerprint_dataset(prepared.splits["train"]),
        "num_train": len(prepared.splits["train"]),
        "num_validation": len(prepared.splits["validation"]),
        "num_test": len(prepared.splits["test"]) if "test" in prepared.splits else 0,
    }
