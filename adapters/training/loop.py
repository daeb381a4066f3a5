"""The training loop on Accelerate: one process, DDP, or DeepSpeed, from the same code.

train(cfg) runs: data -> backbone -> method -> optimizer/schedule -> loop (accumulation,
clipping, periodic eval, early stopping, checkpoints) -> restore best -> held-out test
(base vs adapted) -> adapter folder + manifest -> optional publish to the store.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from adapters.config import RunConfig, dump_config

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    metrics: dict  # {"base": {...} | None, "adapted": {...}, "validation": {...}}
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


def make_accelerator(cfg: RunConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    cpu_ranks = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if cpu_ranks:
        # accelerate misreads CPU-only DeepSpeed ranks unless the process group backend is explicit.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision,
        log_with="tensorboard",
        project_dir=str(run_dir),
        kwargs_handlers=handlers,
        # The schedule counts optimizer steps. Linked to the optimizer, accelerate would step it
        # num_processes times per step (it assumes a schedule sized for one process).
        step_scheduler_with_optimizer=False,
        # Without cpu=True, ranks started by a MULTI_GPU launch on a machine without GPUs each run
        # alone (no sharding); cpu=True would switch DeepSpeed off, so not under DeepSpeed.
        cpu=cpu_ranks and not use_deepspeed,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.is_auto("gradient_clipping"):
        # DeepSpeed clips inside its step (accelerator.clip_grad_norm_ is a no-op there); accelerate
        # would fill "auto" with 1.0 whatever train.max_grad_norm says.
        plugin.deepspeed_config["gradient_clipping"] = cfg.train.max_grad_norm or 0.0
    return accelerator


def default_run_dir(cfg: RunConfig) -> Path:
    if cfg.output.run_dir:
        return Path(cfg.output.run_dir)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.output.name}-{stamp}"


def count_parameters(model) -> tuple[int, int]:
    from adapters.distributed import param_count  # ZeRO-3 leaves placeholders of numel 0

    trainable = sum(param_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(param_count(p) for p in model.parameters())
    return trainable, total


class MetricsLog:
    """metrics.jsonl in the run folder (main process only) + Accelerate's trackers (TensorBoard)."""

    def __init__(self, run_dir: Path, accelerator):
        self.path = run_dir / "metrics.jsonl"
        self.accelerator = accelerator

    def write(self, step: int, values: dict) -> None:
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.accelerator.log(scalars, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step, "time": time.time(), **values}, default=str) + "\n")


def train(cfg: RunConfig, resume: bool | str = False, command: list[str] | None = None, stop_after: int | None = None, on_model_ready=None, fold: int | None = None) -> TrainResult:
    """Run one training job. `stop_after` ends the loop early at that step, as an interruption would."""
    from accelerate.utils import broadcast_object_list, set_seed

    from adapters.training.batch_trace import BatchTrace
    from adapters.training.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint_state, save_checkpoint
    from adapters.data.loading import prepare_splits, tokenize_splits, train_dataloader, eval_dataloader
    from adapters.methods import get_method
    from adapters.modeling.backbone import load_backbone, load_tokenizer, model_info
    from adapters.training.param_groups import build_param_groups
    from adapters.training.schedules import build_scheduler

    method = get_method(cfg.method.name)
    options = method.parse_options(cfg.method.options)
    method.check_model(options, model_info(cfg.model), cfg.task)  # before any weights load

    run_dir = default_run_dir(cfg)
    accelerator = make_accelerator(cfg, run_dir)
    run_dir = Path(broadcast_object_list([str(run_dir)])[0])  # one folder, even if clocks differ
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_run_info(run_dir, cfg, accelerator, command)
    accelerator.wait_for_everyone()
    set_seed(cfg.train.seed)

    # ---------------------------------------------------------------- data
    prepared = prepare_splits(cfg, fold=fold)
    if cfg.init_from and cfg.task == "sequence-classification":
        prepared.labels = _parent_labels(cfg, prepared.labels)
    if accelerator.is_main_process:
        (run_dir / "data_report.json").write_text(json.dumps(prepared.report.to_dict(), indent=2, default=str))
    tokenizer = load_tokenizer(cfg.model)
    tokenized = tokenize_splits(prepared, cfg, tokenizer)
    train_dl = train_dataloader(tokenized["train"], cfg.task, tokenizer, cfg.train.batch_size, cfg.train.seed, cfg.train.group_by_length)

    # ---------------------------------------------------------------- model
    model = load_backbone(cfg.model, cfg.task, prepared.label2id)
    test_split = tokenized["test"] if len(tokenized.get("test", [])) else tokenized["validation"]
    base_results = None
    if cfg.eval.baseline and cfg.task == "causal-lm" and not _can_disable(method):
        # Methods that train the base's own weights cannot be switched off later: measure the base now.
        if cfg.model.quantization is None:
            model.to(accelerator.device)
        base_results = _evaluate(model, test_split, tokenizer, accelerator, cfg, prepared, generate=True)
    model = method.attach(model, options, cfg.task)
    parent = None
    if cfg.init_from:
        parent = _init_from_stored(model, cfg)
    if on_model_ready is not None:
        on_model_ready(model)  # e.g. the ladder's warm start; runs before the optimizer sees the weights
    trainable, total = count_parameters(model)
    accelerator.print(f"method {method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")

    unfreezer = None
    if cfg.train.unfreeze_every:
        from adapters.training.unfreezing import GradualUnfreezer

        # Head alone first; each newly opened block joins the optimizer at its own LR.
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            from adapters.errors import ConfigError

            raise ConfigError("train.unfreeze_every: gradual unfreezing changes optimizer groups mid-run, which DeepSpeed does not allow")
        unfreezer = GradualUnfreezer.from_train_config(model, cfg.train, cfg.train.unfreeze_every, cfg.train.unfreeze_unit)
        groups = unfreezer.initial_param_groups()
    else:
        groups = build_param_groups(model, cfg.train)
    optimizer = _make_optimizer(groups, cfg)
    steps_per_epoch = math.ceil(len(train_dl) / (cfg.train.grad_accum * accelerator.num_processes))
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    accelerator.init_trackers("adapterkit", config=_flat_hparams(cfg))
    metrics_log = MetricsLog(run_dir, accelerator)
    batch_trace = BatchTrace.from_env(accelerator.process_index)  # opt-in: which rows each rank saw
    if accelerator.is_main_process:
        metrics_log.write(0, {"event": "param_groups", "groups": [
            {"name": g.get("name"), "lr": g["lr"], "weight_decay": g["weight_decay"], "params": sum(p.numel() for p in g["params"])} for g in groups
        ]})

    # ---------------------------------------------------------------- resume
    step, epoch, batches_done = 0, 0, 0
    best = {"value": None, "step": 0, "state": None}
    bad_evals = 0
    history: list[dict] = []
    if resume:
        ckpt = Path(resume) if isinstance(resume, (str, Path)) and not isinstance(resume, bool) else latest_checkpoint(run_dir)
        if ckpt is None:
            accelerator.print(f"--resume: no checkpoint under {run_dir / 'checkpoints'}; starting fresh")
        else:
            if unfreezer is not None:  # reopen the stages open at the checkpoint so optimizer groups line up
                saved = read_checkpoint_state(ckpt)
                unfreezer.step(saved["epoch"] if cfg.train.unfreeze_unit == "epoch" else saved["step"], optimizer, scheduler)
            state = load_checkpoint(ckpt, accelerator, model, optimizer, scheduler)
            step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
            best["value"], best["step"], bad_evals = state.get("best_value"), state.get("best_step", 0), state.get("bad_evals", 0)
            history = state.get("history", [])
            accelerator.print(f"resumed from {ckpt} at step {step}")

    es = cfg.train.early_stopping
    watch_metric = es.metric if es else ("eval_loss")
    watch_mode = es.mode if es else "min"

    eval_clock = {"seconds": 0.0}  # time spent evaluating: not part of a max_seconds training budget

    def evaluate_now() -> dict:
        started = time.perf_counter()
        # Generation is the slow part of causal-lm evaluation: only when the watched metric needs it.
        metrics = _evaluate(model, tokenized["validation"], tokenizer, accelerator, cfg, prepared, generate=_needs_generation(watch_metric))
        eval_clock["seconds"] += time.perf_counter() - started
        return {f"eval_{k}": v for k, v in metrics.items()}

    # ---------------------------------------------------------------- loop
    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="training", dynamic_ncols=True)
    model.train()
    tokens_seen, t_start = 0, time.perf_counter()
    samples_seen = 0
    running_loss, running_n = 0.0, 0
    stop = step >= total_steps
    while not stop:
        if hasattr(train_dl, "set_epoch"):
            train_dl.set_epoch(epoch)
        epoch_dl = accelerator.skip_first_batches(train_dl, batches_done) if batches_done else train_dl
        if unfreezer is not None and cfg.train.unfreeze_unit == "epoch":
            _log_unfrozen(metrics_log, step, unfreezer.step(epoch, optimizer, scheduler))
        for batch in epoch_dl:
            if batch_trace is not None:
                batch_trace.record(step + 1, batch)
            with accelerator.accumulate(model):
                loss = _loss(model, batch, cfg)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            batches_done += 1
            tokens_seen += int(batch["attention_mask"].sum())
            samples_seen += int(batch["attention_mask"].shape[0])
            running_loss += loss.detach().float().item()
            running_n += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if unfreezer is not None and cfg.train.unfreeze_unit == "step":
                _log_unfrozen(metrics_log, step, unfreezer.step(step, optimizer, scheduler))
            if step % cfg.train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - t_start
                mean_loss = running_loss / running_n
                if accelerator.num_processes > 1:
                    # Each rank saw its own shard: log the whole global batch's loss, as one process would.
                    mean_loss = accelerator.reduce(torch.tensor(mean_loss, device=accelerator.device), reduction="mean").item()
                row = {"loss": mean_loss, "lr": scheduler.get_last_lr()[0], "epoch": epoch,
                       "tokens_per_second": tokens_seen * accelerator.num_processes / max(elapsed, 1e-9)}
                metrics_log.write(step, row)
                history.append({"step": step, "loss": row["loss"]})
                progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
                running_loss, running_n = 0.0, 0
            eval_due = cfg.train.eval_every and step % cfg.train.eval_every == 0
            if eval_due:
                metrics = evaluate_now()
                metrics_log.write(step, metrics)
                improved = _improved(metrics.get(watch_metric), best["value"], watch_mode, es.min_delta if es else 0.0)
                if improved:
                    best.update(value=metrics[watch_metric], step=step, state=_trainable_copy(accelerator, model))
                    bad_evals = 0
                else:
                    bad_evals += 1
                if es and bad_evals >= es.patience:
                    accelerator.print(f"early stopping at step {step}: {watch_metric} did not improve for {bad_evals} evaluations")
                    stop = True
            if cfg.train.save_every and step % cfg.train.save_every == 0:
                save_checkpoint(run_dir / "checkpoints" / f"step-{step}", accelerator, model, optimizer, scheduler, {
                    "step": step, "epoch": epoch, "batches_done": batches_done, "best_value": best["value"],
                    "best_step": best["step"], "bad_evals": bad_evals, "history": history,
                })
            if step >= total_steps or (stop_after is not None and step >= stop_after):
                stop = True
            if cfg.train.max_seconds and _out_of_time(accelerator, time.perf_counter() - t_start - eval_clock["seconds"], cfg.train.max_seconds):
                stop = True
            if stop:
                break
        else:
            epoch += 1
            batches_done = 0
            if not cfg.train.eval_every and not stop:
                metrics = evaluate_now()
                metrics_log.write(step, metrics)
                if _improved(metrics.get(watch_metric), best["value"], watch_mode, es.min_delta if es else 0.0):
                    best.update(value=metrics[watch_metric], step=step, state=_trainable_copy(accelerator, model))
                    bad_evals = 0
                else:
                    bad_evals += 1
                    if es and bad_evals >= es.patience:
                        stop = True
    progress.close()
    train_seconds = time.perf_counter() - t_start
    tokens_per_second = tokens_seen * accelerator.num_processes / max(train_seconds, 1e-9)
    eval_seconds = eval_clock["seconds"]

    if best["state"] is not None and best["step"] != step:
        accelerator.print(f"restoring the best checkpoint (step {best['step']}, {watch_metric}={best['value']:.4f})")
        from adapters.training.checkpoint import load_trainable_state_dict

        load_trainable_state_dict(accelerator.unwrap_model(model), best["state"])

    # ---------------------------------------------------------------- held-out test
    results = {"validation": evaluate_now()}
    generated: dict = {}  # the adapted model's test answers and confidences: the drift reference's predictions
    results["adapted"] = _evaluate(model, test_split, tokenizer, accelerator, cfg, prepared, generate=True, out_dir=run_dir, collect=generated)
    results["base"] = base_results
    if cfg.eval.baseline and cfg.task == "causal-lm" and base_results is None:
        from adapters.evaluation.evaluator import adapter_disabled

        with adapter_disabled(model):
            results["base"] = _evaluate(model, test_split, tokenizer, accelerator, cfg, prepared, generate=True)
    metrics_log.write(step, {"event": "test", **{f"test_{k}": v for k, v in results["adapted"].items()}})

    # ---------------------------------------------------------------- save + publish
    adapter_dir = run_dir / "adapter"
    save_adapter(accelerator, model, method, adapter_dir)
    from adapters.monitoring.reference import build_training_reference

    # Drift reference for monitoring after deployment; every rank runs it (a collective under ZeRO-3).
    reference = build_training_reference(
        accelerator.unwrap_model(model), tokenizer, cfg, prepared, adapter_dir, write=accelerator.is_main_process,
        generated=generated,
    )
    ref = None
    if accelerator.is_main_process:
        from adapters.store.manifest import build_manifest, write_manifest

        manifest = build_manifest(
            name=cfg.output.name,
            task=cfg.task,
            method={"name": method.name, "options": options.model_dump(mode="json")},
            base_model=_base_model_entry(cfg),
            labels=prepared.labels,
            prompt={"system_prompt": cfg.data.system_prompt, "instruction": cfg.data.instruction, "label_names": _label_words(cfg)},
            training=dump_config(cfg),
            data=_data_entry(cfg, prepared),
            metrics={"test": _scalars(results["adapted"]), "base": _scalars(results["base"]) if results["base"] else None,
                     "validation": _scalars(results["validation"])},
            parent=parent,
            reference=reference,
        )
        write_manifest(adapter_dir, manifest)
        if cfg.output.publish:
            from adapters.store.store import AdapterStore

            ref = str(AdapterStore(cfg.output.store).publish(adapter_dir, cfg.output.name, parent=parent))
        summary = {
            "run_dir": str(run_dir), "adapter_dir": str(adapter_dir), "adapter_ref": ref, "steps": step,
            "trainable_params": trainable, "total_params": total, "train_seconds": train_seconds,
            "tokens_per_second": tokens_per_second, "tokens_seen": tokens_seen * accelerator.num_processes,
            "samples_seen": samples_seen * accelerator.num_processes, "eval_seconds": eval_seconds, "metrics": results,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    accelerator.end_training()
    return TrainResult(run_dir, adapter_dir, results, step, trainable, total, train_seconds, tokens_per_second, ref, history,
                       tokens_seen * accelerator.num_processes, samples_seen * accelerator.num_processes, eval_seconds)


# ---------------------------------------------------------------- helpers
def _out_of_time(accelerator, elapsed: float, budget: float) -> bool:
    """train.max_seconds reached; every process stops at the same step (the slowest rank decides)."""
    over = elapsed >= budget
    if accelerator.num_processes > 1:
        over = bool(accelerator.reduce(torch.tensor(float(over), device=accelerator.device), reduction="sum").item())
    return over


def _can_disable(method) -> bool:
    """peft-backed methods (incl. bottleneck) can run as the bare base later; weight-delta methods cannot."""
    from adapters.methods.weights_delta import DeltaMethod

    return not isinstance(method, DeltaMethod)


def _log_unfrozen(metrics_log, step: int, stages: list[str]) -> None:
    if stages:
        metrics_log.write(step, {"event": "unfreeze", "stages": stages})
def save_adapter(accelerator, model, method, folder: Path) -> None:
    """Save what training changed. Under ZeRO-3 the sharded parameters are gathered on every rank first."""
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


def _loss(model, batch, cfg: RunConfig):
    from adapters.modeling.losses import causal_lm_response_loss, classification_loss

    if cfg.task == "causal-lm":
        return causal_lm_response_loss(model, batch)[0]
    return classification_loss(model, batch, cfg.train.label_smoothing)[0]


def _make_optimizer(groups, cfg: RunConfig):
    if cfg.train.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.train.lr)
    try:
        # One fused kernel over all parameters: on a 2-core CPU the default (foreach) AdamW step
        # of a full MiniLM was several times slower than the fused one.
        return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=cfg.train.lr)


def _needs_generation(metric: str) -> bool:
    return metric in ("eval_exact_match",)


def _evaluate(model, dataset, tokenizer, accelerator, cfg, prepared, generate: bool, out_dir=None, collect=None) -> dict:
    from adapters.data.loading import eval_dataloader
    from adapters.evaluation.evaluator import evaluate_causal_lm, evaluate_classification

    if cfg.task == "sequence-classification":
        dl = eval_dataloader(dataset, cfg.task, tokenizer, cfg.train.eval_batch_size)
        return evaluate_classification(model, dl, accelerator, prepared.labels, out_dir=out_dir)
    return evaluate_causal_lm(
        model, dataset, tokenizer, accelerator, cfg.train.eval_batch_size, cfg.eval.max_new_tokens, generate=generate, collect=collect
    )


def _improved(value, best, mode: str, min_delta: float) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _trainable_copy(accelerator, model) -> dict:
    from adapters.training.checkpoint import trainable_state_dict

    return trainable_state_dict(accelerator.unwrap_model(model))


def _scalars(metrics: dict | None) -> dict:
    """Numeric metrics for the manifest; a non-finite value (a diverged run) is recorded as null."""
    return {
        k: (v if math.isfinite(v) else None)
        for k, v in (metrics or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _label_words(cfg: RunConfig) -> dict:
    from adapters.data.loading import label_words

    return label_words(cfg.data)


def _base_model_entry(cfg: RunConfig) -> dict:
    from adapters.modeling.builtins import resolve_model
    from adapters.store.fingerprint import fingerprint_model, fingerprint_tokenizer

    path = resolve_model(cfg.model.name)
    return {
        "name": cfg.model.name,
        "path": path,
        "revision": cfg.model.revision,
        "fingerprint": fingerprint_model(path),
        "tokenizer_fingerprint": fingerprint_tokenizer(path),
        "quantization": cfg.model.quantization.model_dump() if cfg.model.quantization else None,
    }


def _data_entry(cfg: RunConfig, prepared) -> dict:
    from adapters.store.fingerprint import fingerprint_dataset

    return {
        "source": cfg.data.name,
        "fingerprint": fingerprint_dataset(prepared.splits["train"]),
        "num_train": len(prepared.splits["train"]),
        "num_validation": len(prepared.splits["validation"]),
        "num_test": len(prepared.splits["test"]) if "test" in prepared.splits else 0,
    }


def _parent_labels(cfg: RunConfig, labels: list[str]) -> list[str]:
    """Continue with the parent's label order, so its head's rows keep meaning the same classes."""
    from adapters.errors import ConfigError
    from adapters.store.store import AdapterStore

    parent = AdapterStore(cfg.output.store).resolve(cfg.init_from)[1].get("labels") or labels
    unknown = sorted(set(labels) - set(parent))
    if unknown:
        raise ConfigError(f"init_from {cfg.init_from!r}: labels {unknown} are not among the parent's labels {parent}")
    return list(parent)


def _init_from_stored(model, cfg: RunConfig) -> str:
    """Copy the trainable weights of a stored adapter into the freshly attached one."""
    from safetensors.torch import load_file

    from adapters.training.checkpoint import load_trainable_state_dict
    from adapters.store.store import AdapterStore

    path, manifest = AdapterStore(cfg.output.store).resolve(cfg.init_from)
    if manifest.get("method", {}).get("name") != cfg.method.name:
        from adapters.errors import ConfigError

        raise ConfigError(f"init_from {cfg.init_from!r} was trained with method {manifest['method']['name']!r}, not {cfg.method.name!r}")
    saved = load_file(str(Path(path) / "adapter_model.safetensors"))
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mapped = {}
    for name in own:
        # peft saves without the adapter name ("lora_A.weight"); in the model it is "lora_A.default.weight".
        key = name.replace(".default", "")
        if key in saved:
            mapped[name] = saved[key]
    if not mapped:
        from adapters.errors import ConfigError

        raise ConfigError(f"init_from {cfg.init_from!r}: none of its weights match this model's adapter")
    load_trainable_state_dict(model, mapped)
    version = manifest.get("version")
    return f"{manifest.get('name', cfg.init_from.split('@')[0])}@{version}" if version is not None else cfg.init_from


def _flat_hparams(cfg: RunConfig) -> dict:
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", dump_config(cfg))
    return flat


def _write_run_info(run_dir: Path, cfg: RunConfig, accelerator, command) -> None:
    import platform

    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))
    info = {
        "command": command or sys.argv,
        "cwd": os.getcwd(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
    }
    try:
        from adapters.store.manifest import library_versions, code_revision

        info["versions"] = library_versions()
        info["code_revision"] = code_revision()
    except ImportError:
        pass
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
