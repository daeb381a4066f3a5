"""Everything train() builds before its first step, and resuming from a checkpoint.

setup_run(cfg) runs, in this order (the order fixes what the seeded RNG draws, so it is part of
reproducibility): method check -> data splits + tokenizer + tokenized rows (seeded by train.seed
explicitly) -> accelerator + run folder -> seed -> train loader -> backbone (+ base-model test
evaluation when the method cannot be switched off later) -> method attached -> optional warm start
-> param groups -> optimizer -> LR schedule -> accelerator.prepare -> trackers.

The run folder is created only once the config, the data and the batch size have passed their checks;
should anything after that fail before training starts, a folder this start created is removed again,
so bad input never leaves a half-written run behind.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, set_seed
from datasets import DatasetDict
from safetensors.torch import load_file
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from adapters.config import RunConfig, dump_config
from adapters.data.loading import PreparedData, prepare_splits, tokenize_splits, train_dataloader
from adapters.data.packing import pack_dataset, packed_train_dataloader, packing_stats
from adapters.distributed import param_count
from adapters.errors import ConfigError
from adapters.methods import get_method
from adapters.methods.weights_delta import DeltaMethod
from adapters.modeling.backbone import load_backbone, load_tokenizer, model_info
from adapters.modeling.packed import check_packing_support
from adapters.paths import cache_dir
from adapters.store.manifest import code_revision, library_versions
from adapters.store.refs import is_path_ref
from adapters.store.store import AdapterStore
from adapters.training.batch_trace import BatchTrace
from adapters.training.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    checkpoint_problems,
    load_checkpoint,
    load_trainable_state_dict,
    read_checkpoint_state,
    resume_point,
)
from adapters.training.objectives import build_objective
from adapters.training.param_groups import build_param_groups
from adapters.training.preflight import check_batch_fits, check_layers_exist, check_rank_fits
from adapters.training.schedules import build_scheduler
from adapters.training.state import EarlyStopping, TrainState
from adapters.training.unfreezing import GradualUnfreezer
from adapters.training.validation import evaluate_split


class MetricsLog:
    """metrics.jsonl in the run folder (main process only) + Accelerate's trackers (TensorBoard)."""

    def __init__(self, run_dir: Path, accelerator: Accelerator):
        self.path = run_dir / "metrics.jsonl"
        self.accelerator = accelerator

    def write(self, step: int, values: dict) -> None:
        """One JSON line {"step", "time" (Unix seconds), **values}; numeric values also go to the trackers."""
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.accelerator.log(scalars, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": step, "time": time.time(), **values}, default=str) + "\n")

    def rewind(self, size: int | None, step: int) -> None:
        """Forget what an interrupted run logged after its checkpoint at optimizer step `step`:
        metrics.jsonl is cut back to `size` bytes (None: kept), and TensorBoard hides the events of
        later steps from earlier files (the marker torch's SummaryWriter(purge_step=step + 1) writes)."""
        if not self.accelerator.is_main_process:
            return
        if size is not None and self.path.exists() and self.path.stat().st_size > size:
            os.truncate(self.path, size)
        for tracker in self.accelerator.trackers:
            writer = getattr(getattr(tracker, "writer", None), "file_writer", None)
            if tracker.name == "tensorboard" and writer is not None:
                writer.add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))


@dataclass
class TrainingRun:
    """What setup_run built. model, optimizer, scheduler and train_dl are the accelerate-prepared
    ones; total_steps counts optimizer steps; base_results is the base model's test metrics when
    they had to be measured before the method was attached (else None); parent is the
    ``name@version`` of the init_from adapter."""

    cfg: RunConfig
    accelerator: Accelerator
    run_dir: Path
    method: Any
    options: Any
    prepared: PreparedData
    tokenizer: Any
    tokenized: DatasetDict
    model: Any
    optimizer: Any
    scheduler: Any
    train_dl: Any
    total_steps: int
    unfreezer: GradualUnfreezer | None
    metrics_log: MetricsLog
    batch_trace: BatchTrace | None
    trainable_params: int
    total_params: int
    base_results: dict | None
    parent: str | None
    fold: int | None = None  # the cross-validation fold validated on (None: the plain split)
    run_id: str | None = None  # kept across resumes (adapters.training.run_record), set by train()
    objective: Any = None  # train.objective's loss (adapters.training.objectives); None: sft

    @property
    def test_split(self):
        """The held-out test rows (see held_out_split)."""
        return held_out_split(self.tokenized)


def held_out_split(tokenized: DatasetDict):
    """The tokenized test split, or the validation split when the data has no test rows."""
    return tokenized["test"] if len(tokenized.get("test", [])) else tokenized["validation"]


def _train_loader(cfg: RunConfig, train_rows, tokenizer, collate):
    """The training DataLoader: packed rows, or length-grouped/shuffled rows with the objective's collator."""
    t = cfg.train
    if t.packing:
        return packed_train_dataloader(train_rows, tokenizer, t.batch_size, t.seed, t.group_by_length)
    return train_dataloader(train_rows, cfg.task, tokenizer, t.batch_size, t.seed, t.group_by_length, collate=collate)


def _log_setup(metrics_log, prepared, groups: list[dict]) -> None:
    """Step-0 events in metrics.jsonl: packing statistics and the optimizer's parameter groups."""
    if prepared.report.packing:
        metrics_log.write(0, {"event": "packing", **prepared.report.packing})
    rows = [
        {
            "name": g.get("name"),
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
            "params": sum(p.numel() for p in g["params"]),
        }
        for g in groups
    ]
    metrics_log.write(0, {"event": "param_groups", "groups": rows})


def setup_run(
    cfg: RunConfig,
    command: list[str] | None = None,
    fold: int | None = None,
    on_model_ready: Callable[[Any], None] | None = None,
) -> TrainingRun:
    """Build a run from its config (see the module doc for the order).

    command: recorded in run_info.json (default sys.argv); fold: the cross-validation fold to
    validate on; on_model_ready(model): called after the method is attached, before the
    optimizer sees the weights (e.g. the ladder's warm start).
    Raises ConfigError for a method/model/task mismatch or a rank larger than the adapted layers
    (before any weights load), a global batch larger than the training split, a bad init_from,
    gradual unfreezing under DeepSpeed, or too little data to schedule.
    """
    method = get_method(cfg.method.name)
    options = method.parse_options(cfg.method.options)
    info = model_info(cfg.model)
    method.check_model(options, info, cfg.task)  # before any weights load
    check_layers_exist(options, info.num_layers)
    check_rank_fits(cfg, method, options)
    for key, path, used in (
        ("output.store", store_root(cfg), cfg.output.publish),
        ("output.run_dir", default_run_dir(cfg), True),
    ):
        if used and path.exists() and not path.is_dir():
            raise ConfigError(
                f"{key}: {path} exists and is not a folder; valid: a folder, or a path that does not exist"
            )
    if cfg.train.unfreeze_every and deepspeed_requested():
        raise ConfigError(
            "train.unfreeze_every: gradual unfreezing changes optimizer groups mid-run, which DeepSpeed does not allow"
        )
    if cfg.init_from:
        check_parent(cfg)
    prepared, tokenizer, tokenized = prepare_data(cfg, fold)
    check_batch_fits(cfg, len(tokenized["train"]), int(os.environ.get("WORLD_SIZE", "1")))
    created = not default_run_dir(cfg).exists()
    accelerator, run_dir = start_run(cfg, command)
    with removed_on_failure(run_dir, created and accelerator.is_main_process):
        return _build_run(
            cfg, accelerator, run_dir, method, options, prepared, tokenizer, tokenized, fold, on_model_ready
        )


def store_root(cfg: RunConfig) -> Path:
    """The store folder cfg uses (output.store, else $ADAPTERKIT_STORE, else <cache>/store), as AdapterStore
    picks it, without creating it."""
    return Path(cfg.output.store or os.environ.get("ADAPTERKIT_STORE") or cache_dir() / "store").expanduser()


def check_parent(cfg: RunConfig) -> None:
    """Raise (StoreError, ConfigError) now, before the run folder exists, when cfg.init_from names no
    intact adapter; a store that does not exist yet is not created by looking."""
    if not is_path_ref(cfg.init_from):
        root = store_root(cfg)
        if not root.is_dir():
            raise ConfigError(f"init_from {cfg.init_from!r}: the store {root} does not exist (output.store)")
    AdapterStore(cfg.output.store).resolve(cfg.init_from)


@contextmanager
def removed_on_failure(run_dir: Path, remove: bool) -> Iterator[None]:
    """Remove `run_dir` (when `remove`: this start created it) if the block raises; the error propagates."""
    try:
        yield
    except BaseException:
        if remove:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def prepare_data(cfg: RunConfig, fold: int | None) -> tuple[PreparedData, Any, DatasetDict]:
    """(splits + data report, tokenizer, tokenized splits; the training split packed under train.packing).
    Raises ConfigError for data that cannot train (adapters.data.loading)."""
    prepared = prepare_splits(cfg, fold=fold)
    if cfg.init_from and cfg.task == "sequence-classification":
        prepared.labels = parent_labels(cfg, prepared.labels)
    tokenizer = load_tokenizer(cfg.model)
    tokenized = tokenize_splits(prepared, cfg, tokenizer)  # adds the truncation counts to the data report
    if cfg.train.packing:
        packed = pack_dataset(tokenized["train"], cfg.data.max_length)
        prepared.report.packing = packing_stats(
            tokenized["train"],
            packed,
            tokenizer,
            cfg.train.batch_size,
            cfg.train.seed,
            cfg.train.group_by_length,
            cfg.data.max_length,
        )
        tokenized["train"] = packed
    return prepared, tokenizer, tokenized


def _build_run(
    cfg: RunConfig,
    accelerator: Accelerator,
    run_dir: Path,
    method,
    options,
    prepared: PreparedData,
    tokenizer,
    tokenized: DatasetDict,
    fold: int | None,
    on_model_ready: Callable[[Any], None] | None,
) -> TrainingRun:
    """setup_run once the run folder exists: loader, backbone, method, optimizer, schedule, trackers."""
    if accelerator.is_main_process:
        (run_dir / "data_report.json").write_text(json.dumps(prepared.report.to_dict(), indent=2, default=str))
    check_batch_fits(cfg, len(tokenized["train"]), accelerator.num_processes)
    objective, collate = build_objective(cfg, tokenizer, method, accelerator)  # (None, None): sft
    train_dl = _train_loader(cfg, tokenized["train"], tokenizer, collate)

    model = load_backbone(cfg.model, cfg.task, prepared.label2id)
    base_results = None
    if cfg.eval.baseline and cfg.task == "causal-lm" and not can_disable(method):
        # Methods that train the base's own weights cannot be switched off later: measure the base now.
        if cfg.model.quantization is None:
            model.to(accelerator.device)
        base_results = evaluate_split(
            model, held_out_split(tokenized), tokenizer, accelerator, cfg, prepared, generate=True
        )
    model = method.attach(model, options, cfg.task)
    if cfg.train.packing:
        check_packing_support(model)
    parent = init_from_stored(model, cfg) if cfg.init_from else None
    if on_model_ready is not None:
        on_model_ready(model)  # e.g. the ladder's warm start; runs before the optimizer sees the weights
    trainable, total = count_parameters(model)
    accelerator.print(
        f"method {method.name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)"
    )

    unfreezer = None
    if cfg.train.unfreeze_every:
        # Head alone first; each newly opened block joins the optimizer at its own LR.
        unfreezer = GradualUnfreezer.from_train_config(
            model, cfg.train, cfg.train.unfreeze_every, cfg.train.unfreeze_unit
        )
        groups = unfreezer.initial_param_groups()
    else:
        groups = build_param_groups(model, cfg.train)
    optimizer = make_optimizer(groups, cfg)
    steps_per_epoch = math.ceil(len(train_dl) / (cfg.train.grad_accum * accelerator.num_processes))
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    model, optimizer, train_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, scheduler)
    accelerator.init_trackers("adapterkit", config=flat_hparams(cfg))
    metrics_log = MetricsLog(run_dir, accelerator)
    batch_trace = BatchTrace.from_env(accelerator.process_index)  # opt-in: which rows each rank saw
    if accelerator.is_main_process:
        _log_setup(metrics_log, prepared, groups)
    return TrainingRun(
        cfg,
        accelerator,
        run_dir,
        method,
        options,
        prepared,
        tokenizer,
        tokenized,
        model,
        optimizer,
        scheduler,
        train_dl,
        total_steps,
        unfreezer,
        metrics_log,
        batch_trace,
        trainable,
        total,
        base_results,
        parent,
        fold,
        objective=objective,
    )


def resume_from_checkpoint(
    run: TrainingRun, resume: bool | str | Path, state: TrainState, stopper: EarlyStopping
) -> None:
    """Continue `run` from a checkpoint: trainable weights, optimizer, schedule into `run`; counters,
    data position and the random states to restore into `state`; early stopping and its best
    weights into `stopper`; the logs (metrics.jsonl, TensorBoard) rewound to the checkpoint's step.

    resume: True for the newest intact checkpoint under <run_dir>/checkpoints (each damaged one is
    skipped with a one-line note; none intact: start over, with a note), or a checkpoint folder,
    which must be intact. Raises CheckpointError for a damaged folder given explicitly, or a
    checkpoint that does not fit this run.
    """
    accelerator = run.accelerator
    chosen, notes = pick_checkpoint(run.run_dir, resume, accelerator)
    for note in notes:
        accelerator.print(f"--resume: {note}")
    if chosen is None:
        accelerator.print(f"--resume: no intact checkpoint under {run.run_dir / CHECKPOINTS}; starting over")
        return
    if run.unfreezer is not None:  # reopen the stages open at the checkpoint so optimizer groups line up
        saved = read_checkpoint_state(chosen)
        position = saved["epoch"] if run.cfg.train.unfreeze_unit == "epoch" else saved["step"]
        run.unfreezer.step(position, run.optimizer, run.scheduler)
    loaded = load_checkpoint(
        chosen, accelerator, run.model, run.optimizer, run.scheduler, trust_pickle=run.cfg.train.resume_trust_pickle
    )
    state.restore(loaded.state)
    stopper.restore(loaded.state, loaded.best_state)
    state.rng = loaded.rng
    if loaded.rng is None:
        accelerator.print(
            f"--resume: {chosen.name} has no random states for process {accelerator.process_index}; "
            "dropout and other random draws will differ from the uninterrupted run"
        )
    if loaded.state.get("shuffle_seed", run.cfg.train.seed) != run.cfg.train.seed:
        accelerator.print(f"--resume: train.seed changed since {chosen.name}; the data order will differ")
    run.metrics_log.rewind(loaded.state.get("log_bytes"), state.step)
    accelerator.print(f"resumed from {chosen} at step {state.step}")


def pick_checkpoint(
    run_dir: Path, resume: bool | str | Path, accelerator: Accelerator
) -> tuple[Path | None, list[str]]:
    """(checkpoint folder or None, notes about damaged ones skipped), decided on the main process and
    shared with all. resume: True (the newest intact one, checkpoint.resume_point) or a folder.
    Raises CheckpointError, on every process, when a given folder is damaged."""
    given = isinstance(resume, (str, Path))
    choice: list[Any] = [None, [], []]
    if accelerator.is_main_process:
        if given:
            folder = Path(resume)
            choice = [str(folder), [], checkpoint_problems(folder) if folder.is_dir() else ["not a folder"]]
        else:
            found, notes = resume_point(run_dir)
            choice = [str(found) if found else None, notes, []]
    path, notes, problems = broadcast_object_list([choice])[0]
    if problems:
        raise CheckpointError(
            f"--resume {resume}: the checkpoint is damaged ({'; '.join(problems[:3])}); "
            "resume without a folder to use the newest intact checkpoint"
        )
    return (Path(path) if path else None), notes


def start_run(cfg: RunConfig, command: list[str] | None) -> tuple[Accelerator, Path]:
    """The accelerator and the run folder (one for all processes), with config.yaml and
    run_info.json written; then every process is seeded with train.seed."""
    run_dir = default_run_dir(cfg)
    accelerator = make_accelerator(cfg, run_dir)
    run_dir = Path(broadcast_object_list([str(run_dir)])[0])  # one folder, even if clocks differ
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(run_dir, cfg, accelerator, command)
    accelerator.wait_for_everyone()
    set_seed(cfg.train.seed)
    return accelerator, run_dir


def deepspeed_requested() -> bool:
    """Whether `accelerate launch` was configured for DeepSpeed (it sets ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(cfg: RunConfig, run_dir: Path) -> Accelerator:
    """An Accelerator for one process, DDP or DeepSpeed (whatever `accelerate launch` set up), with
    train.grad_accum, train.mixed_precision, TensorBoard logging into run_dir, and the schedule
    stepped by the loop (once per optimizer step)."""
    handlers = []
    cpu_ranks = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
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
        cpu=cpu_ranks and not deepspeed_requested(),
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.is_auto("gradient_clipping"):
        # DeepSpeed clips inside its step (accelerator.clip_grad_norm_ is a no-op there); accelerate
        # would fill "auto" with 1.0 whatever train.max_grad_norm says.
        plugin.deepspeed_config["gradient_clipping"] = cfg.train.max_grad_norm or 0.0
    return accelerator


def default_run_dir(cfg: RunConfig) -> Path:
    """output.run_dir, else runs/<output.name>-<UTC timestamp>."""
    if cfg.output.run_dir:
        return Path(cfg.output.run_dir)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.output.name}-{stamp}"


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter elements; ZeRO-3 placeholders count at their full size."""
    trainable = sum(param_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(param_count(p) for p in model.parameters())
    return trainable, total


def can_disable(method) -> bool:
    """peft-backed methods (incl. bottleneck) can run as the bare base later; weight-delta methods cannot."""
    return not isinstance(method, DeltaMethod)


def make_optimizer(groups: list[dict], cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, 2019) over the param groups at train.lr; "adamw_8bit" is
    bitsandbytes' 8-bit AdamW (Dettmers et al., 2022)."""
    if cfg.train.optimizer == "adamw_8bit":
        import bitsandbytes as bnb  # an optional extra that loads CUDA libraries: only when asked for

        return bnb.optim.AdamW8bit(groups, lr=cfg.train.lr)
    try:
        # One fused kernel over all parameters: on a 2-core CPU the default (foreach) AdamW step
        # of a full MiniLM was several times slower than the fused one.
        return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=cfg.train.lr)


def parent_labels(cfg: RunConfig, labels: list[str]) -> list[str]:
    """Continue with the parent's label order, so its head's rows keep meaning the same classes.
    Raises ConfigError if the data has labels the parent does not know."""
    parent = AdapterStore(cfg.output.store).resolve(cfg.init_from)[1].get("labels") or labels
    unknown = sorted(set(labels) - set(parent))
    if unknown:
        raise ConfigError(f"init_from {cfg.init_from!r}: labels {unknown} are not among the parent's labels {parent}")
    return list(parent)


def init_from_stored(model: torch.nn.Module, cfg: RunConfig) -> str:
    """Copy the trainable weights of the stored adapter cfg.init_from into the freshly attached one.

    Returns the parent's ``name@version``. Raises ConfigError if it was trained with another
    method or none of its weights match this model's adapter.
    """
    path, manifest = AdapterStore(cfg.output.store).resolve(cfg.init_from)
    if manifest.get("method", {}).get("name") != cfg.method.name:
        raise ConfigError(
            f"init_from {cfg.init_from!r} was trained with method {manifest['method']['name']!r}, "
            f"not {cfg.method.name!r}"
        )
    saved = load_file(str(Path(path) / "adapter_model.safetensors"))
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mapped = {}
    for name in own:
        # peft saves without the adapter name ("lora_A.weight"); in the model it is "lora_A.default.weight".
        key = name.replace(".default", "")
        if key in saved:
            mapped[name] = saved[key]
    if not mapped:
        raise ConfigError(f"init_from {cfg.init_from!r}: none of its weights match this model's adapter")
    load_trainable_state_dict(model, mapped)
    version = manifest.get("version")
    return f"{manifest.get('name', cfg.init_from.split('@')[0])}@{version}" if version is not None else cfg.init_from


def flat_hparams(cfg: RunConfig) -> dict:
    """The config as {"train.lr": 0.0002, ...} for the trackers (non-scalars as strings)."""
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", dump_config(cfg))
    return flat


def write_run_info(run_dir: Path, cfg: RunConfig, accelerator: Accelerator, command: list[str] | None) -> None:
    """config.yaml (the resolved config) and run_info.json (command, platform, devices, library versions)."""
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
        "versions": library_versions(),
        "code_revision": code_revision(),
    }
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
