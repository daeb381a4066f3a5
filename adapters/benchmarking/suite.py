"""The compare matrix: methods x tasks x seeds under one equal budget, with baselines.

A suite (YAML, see benchmarks/suites/) lists tasks (model + data), methods (each with its
options), seeds and one budget (optimizer steps, or seconds of training). Every task also
gets baselines:

- ``base``: the untouched pretrained model. Zero-shot for causal-lm; for classification the
  frozen backbone with a trained head (head-only), since a fresh head cannot answer unseen.
- ``scratch``: the same architecture from random init (``model.init: random``), every weight
  trained (method ``full``) with the same budget.
- ``classic``: TF-IDF + logistic regression (scikit-learn), classification only.

Each cell (task, arm, seed) is an ordinary ``adapters.training.loop.train`` run (or the baseline's
own evaluation); its line in ``results.jsonl`` holds the held-out metric, cost and speed
measurements, the curves for the plots, the full config and the environment. A rerun skips
cells whose line exists with the same spec (the spec hash covers the whole resolved config),
so an interrupted benchmark continues where it stopped. The report (table + plots) is made by
``adapters.benchmarking.report`` from results.jsonl alone.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import statistics
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import psutil
import torch
import yaml
from accelerate.utils import set_seed
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm.auto import tqdm

from adapters.benchmarking.report import write_report
from adapters.config import RunConfig, apply_overrides, dump_config, load_config
from adapters.data.loading import prepare_splits, tokenize_splits
from adapters.errors import ConfigError
from adapters.evaluation.baselines import tfidf_logistic_regression
from adapters.evaluation.evaluator import evaluate_causal_lm
from adapters.methods import get_method
from adapters.modeling.backbone import load_backbone, load_tokenizer
from adapters.store.manifest import code_revision, library_versions
from adapters.training.loop import train

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
BASELINES = ("base", "scratch", "classic")
HEADLINE = {"sequence-classification": "accuracy", "causal-lm": "exact_match"}


# ---------------------------------------------------------------- suite config
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BudgetSpec(_Strict):
    """The training budget of every run: a step count or a time limit (exactly one)."""

    steps: int | None = Field(None, ge=1, description="Optimizer steps per run.")
    seconds: float | None = Field(None, gt=0, description="Seconds of training per run (evaluation excluded).")
    max_steps: int = Field(100_000, ge=1, description="With `seconds`: the schedule's length and a step cap.")

    @model_validator(mode="after")
    def _one_budget(self) -> BudgetSpec:
        if (self.steps is None) == (self.seconds is None):
            raise ValueError("set exactly one of budget.steps or budget.seconds")
        return self

    def train_overrides(self) -> dict:
        """The run config's train keys that enforce this budget (max_steps, max_seconds)."""
        if self.steps is not None:
            return {"max_steps": self.steps}
        return {"max_steps": self.max_steps, "max_seconds": self.seconds}

    def describe(self) -> str:
        """The budget in words, for the report (e.g. "40 optimizer steps")."""
        return f"{self.steps} optimizer steps" if self.steps is not None else f"{self.seconds:g} s of training"


class TargetSpec(_Strict):
    """A validation-metric target; time-to-target is measured until the run first reaches it."""

    metric: str = Field(..., description="Validation metric as train() logs it, e.g. eval_accuracy or eval_loss.")
    value: float
    mode: Literal["max", "min"] = Field("max", description="max: reached when >= value; min: when <= value.")


class MethodSpec(_Strict):
    """One method arm of the matrix: a registered method, its options and train overrides."""

    name: str = Field(..., description="A registered method (see `scripts/train.py --list-methods`).")
    label: str | None = Field(None, description="Row name in the report (default: the method name).")
    options: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the run's train section (e.g. its own lr)."
    )

    @property
    def arm(self) -> str:
        """The arm's name: the label, else the method name."""
        return self.label or self.name


class BaselineSpec(_Strict):
    """Settings of a trained baseline (base head-only, scratch)."""

    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the train section for this baseline.")


class ClassicSpec(_Strict):
    """The TF-IDF + logistic-regression baseline (scikit-learn)."""

    ngram_max: int = Field(2, ge=1, description="Word n-grams up to this length.")
    max_features: int | None = Field(50_000, ge=1)
    C: float = Field(10.0, gt=0, description="Inverse regularisation strength of the logistic regression.")


class BaselinesSpec(_Strict):
    """Settings of the three baselines."""

    base: BaselineSpec = Field(default_factory=lambda: BaselineSpec(train={"lr": 5e-3}))
    scratch: BaselineSpec = Field(default_factory=lambda: BaselineSpec(train={"lr": 5e-4}))
    classic: ClassicSpec = Field(default_factory=ClassicSpec)


class TaskSpec(_Strict):
    """One task of the matrix (a row group of the report): model, data and what runs on it."""

    name: str = Field(..., description="Row group in the report, e.g. trec-minilm.")
    task: Literal["causal-lm", "sequence-classification"]
    model: dict[str, Any]
    data: dict[str, Any]
    train: dict[str, Any] = Field(default_factory=dict, description="Overrides of the suite's train section.")
    eval: dict[str, Any] = Field(default_factory=dict)
    target: TargetSpec | None = Field(None, description="Validation target for time-to-target.")
    budget: BudgetSpec | None = Field(
        None, description="This task's budget (default: the suite's); equal for all its arms."
    )
    seeds: list[int] | None = Field(None, min_length=1, description="This task's seeds (default: the suite's).")
    methods: list[str] | None = Field(
        None, description="Method labels to run on this task (default: every method that supports it)."
    )
    baselines: list[Literal["base", "scratch", "classic"]] | None = Field(
        None, description="Default: every baseline that applies."
    )


class SuiteConfig(_Strict):
    """A benchmark suite (YAML, see benchmarks/suites/): tasks x methods x seeds under one budget."""

    name: str
    description: str = ""
    budget: BudgetSpec
    seeds: list[int] = Field(..., min_length=1)
    train: dict[str, Any] = Field(default_factory=dict, description="train section shared by every run.")
    eval: dict[str, Any] = Field(default_factory=dict)
    methods: list[MethodSpec] = Field(..., min_length=1)
    tasks: list[TaskSpec] = Field(..., min_length=1)
    baselines: BaselinesSpec = Field(default_factory=BaselinesSpec)

    @model_validator(mode="after")
    def _names_unique_and_known(self) -> SuiteConfig:
        arms = [m.arm for m in self.methods]
        for seen in (arms, [t.name for t in self.tasks]):
            dupes = sorted({a for a in seen if seen.count(a) > 1})
            if dupes:
                raise ValueError(f"names must be unique, repeated: {', '.join(dupes)} (give methods a `label`)")
        clash = sorted(set(arms) & set(BASELINES))
        if clash:
            raise ValueError(f"method labels {clash} are reserved for baselines; choose other labels")
        for task in self.tasks:
            unknown = sorted(set(task.methods or []) - set(arms))
            if unknown:
                raise ValueError(f"tasks[{task.name}].methods: unknown labels {unknown}; defined: {', '.join(arms)}")
        return self


def load_suite(
    path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None
) -> SuiteConfig:
    """Read and validate a suite (from `path`, or the mapping `raw`) and every run config it implies.

    `overrides` are dotted `key=value` like the run config's (e.g. budget.steps=5).
    Raises ConfigError naming the bad key, or the cell whose run config is invalid.
    """
    if raw is None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"benchmark suite not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError("a benchmark suite must be a mapping of keys")
    raw = apply_overrides(copy.deepcopy(raw), overrides or [])
    try:
        suite = SuiteConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("; ".join(_describe_error(e) for e in err.errors())) from None
    for cell in plan_cells(suite):  # every run config validates before anything trains
        if cell.run_config is not None:
            cell.config()
    return suite


def _describe_error(e: dict) -> str:
    key = ".".join(str(p) for p in e["loc"]) or "suite"
    if e["type"] == "extra_forbidden":
        return f"unknown suite key {key!r}"
    if e["type"] == "missing":
        return f"missing suite key {key!r}"
    return f"suite key {key!r}: {e['msg']}"


# ---------------------------------------------------------------- cells
@dataclass
class Cell:
    """One (task, arm, seed) of the matrix: what to run and how to recognise its result line."""

    suite: str
    task: TaskSpec
    arm: str  # method label or baseline name
    kind: Literal["method", "base", "scratch", "classic", "zero-shot"]
    seed: int
    run_config: dict | None  # raw RunConfig (a classic cell uses only its data section)
    extra: dict = field(default_factory=dict)  # classic settings
    budget: str = ""  # e.g. "40 optimizer steps", for the report

    @property
    def key(self) -> str:
        """ "task/arm/seed=N", unique in a suite."""
        return f"{self.task.name}/{self.arm}/seed={self.seed}"

    @property
    def spec_hash(self) -> str:
        """16 hex digits of the SHA-256 of everything that defines the cell (a changed spec reruns it)."""
        spec = {
            "task": self.task.name,
            "arm": self.arm,
            "kind": self.kind,
            "seed": self.seed,
            "run": self.run_config,
            "extra": self.extra,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def config(self) -> RunConfig:
        """The validated run config; ConfigError names the cell."""
        try:
            return load_config(raw=copy.deepcopy(self.run_config))
        except ConfigError as err:
            raise ConfigError(f"benchmark cell {self.key}: {err}") from None


def _merge(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in (d or {}).items():
            out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def plan_cells(suite: SuiteConfig) -> list[Cell]:
    """Every (task, arm, seed) of the suite, baselines first, in a stable order.

    Raises ConfigError when a task names a method that cannot train its task type.
    """
    cells: list[Cell] = []
    for task in suite.tasks:
        budget = (task.budget or suite.budget).train_overrides()
        wanted = task.baselines if task.baselines is not None else list(BASELINES)
        if task.task != "sequence-classification":
            wanted = [b for b in wanted if b != "classic"]
        labels = task.methods if task.methods is not None else [m.arm for m in suite.methods]
        methods = [m for m in suite.methods if m.arm in labels and task.task in get_method(m.name).tasks]
        unfit = [m.arm for m in suite.methods if task.methods and m.arm in task.methods and m not in methods]
        if unfit:  # asked for by name: say so rather than skip
            raise ConfigError(f"tasks[{task.name}].methods: {', '.join(unfit)} cannot train a {task.task} task")
        for seed in task.seeds or suite.seeds:

            def run(method: dict, extra_train: dict, model: dict | None = None) -> dict:
                return {
                    "task": task.task,
                    "model": _merge(task.model, model or {}),
                    "data": task.data,
                    "method": method,
                    "train": _merge(suite.train, task.train, extra_train, budget, {"seed": seed}),
                    "eval": _merge(suite.eval, task.eval, {"baseline": False}),
                    "output": {"name": _slug(f"{task.name}-{method['name']}")},
                }

            def cell(arm: str, kind: str, method: str, extra_train: dict, **more) -> Cell:
                config = run({"name": method, "options": more.pop("options", {})}, extra_train, more.pop("model", None))
                return Cell(suite.name, task, arm, kind, seed, config, **more)

            if "base" in wanted:
                if task.task == "causal-lm":
                    cells.append(cell("base", "zero-shot", "lora", {}))
                else:
                    cells.append(cell("base", "base", "head-only", suite.baselines.base.train))
            if "scratch" in wanted:
                scratch = suite.baselines.scratch.train
                cells.append(cell("scratch", "scratch", "full", scratch, model={"init": "random"}))
            if "classic" in wanted:
                cells.append(cell("classic", "classic", "head-only", {}, extra=suite.baselines.classic.model_dump()))
            for m in methods:
                cells.append(cell(m.arm, "method", m.name, m.train, options=m.options))
        for cell in cells:
            if cell.task is task:
                cell.budget = (task.budget or suite.budget).describe()
    return cells


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


# ---------------------------------------------------------------- measuring
class PeakMemory:
    """Peak memory while the block runs: CUDA max_memory_allocated on GPU, else sampled process RSS.

    RSS is sampled every `interval` seconds in a daemon thread (the kernel's ru_maxrss is the peak
    of the whole process, useless for the second cell of a matrix run in one process).
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.cuda = torch.cuda.is_available()
        self.peak = 0
        self.before = 0
        self.kind = "cuda_max_memory_allocated" if self.cuda else "process_rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            proc = psutil.Process()
            self.before = self.peak = proc.memory_info().rss

            def sample() -> None:
                while not self._stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    self._stop.wait(self.interval)

            self._thread = threading.Thread(target=sample, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, psutil.Process().memory_info().rss)


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def weights_bytes(folder: Path) -> int:
    """The trained weights alone: every safetensors file but the drift reference (same for every method)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors") if p.name != "reference.safetensors")


def read_metrics_log(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] if it has none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve(rows: list[dict]) -> list[list[float]]:
    """[[step, training loss], ...] from metrics.jsonl rows."""
    return [[r["step"], r["loss"]] for r in rows if "loss" in r and "event" not in r]


def metric_curve(rows: list[dict], metric: str) -> list[list[float]]:
    """[[step, value], ...] of one logged metric (e.g. eval_accuracy) from metrics.jsonl rows."""
    return [[r["step"], r[metric]] for r in rows if isinstance(r.get(metric), (int, float))]


def time_to_target(
    curve: list[list[float]], target: TargetSpec, seconds_per_step: float | None
) -> tuple[int | None, float | None]:
    """First logged step at which the validation metric reached the target, and the training time to
    get there (steps x measured seconds per training step: evaluation time is not counted)."""
    for step, value in curve:
        reached = value >= target.value if target.mode == "max" else value <= target.value
        if reached:
            return int(step), (step * seconds_per_step if seconds_per_step is not None else None)
    return None, None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What a number depends on: libraries, CPU/GPU, threads, load, code revision."""
    cpu = cpu_name()
    env = {
        "versions": library_versions(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "code_revision": code_revision(),
    }
    return env


# ---------------------------------------------------------------- running one cell
def run_cell(cell: Cell, work_dir: Path) -> dict:
    """Run one cell (training runs in work_dir) and return its results line (status ok), or raise."""
    run_dir = Path(work_dir) / _slug(cell.task.name) / _slug(cell.arm) / f"seed-{cell.seed}"
    env_before = environment()
    started = time.perf_counter()
    with PeakMemory() as memory:
        if cell.kind == "classic":
            measured = _run_classic(cell)
        elif cell.kind == "zero-shot":
            measured = _run_zero_shot(cell)
        else:
            measured = _run_training(cell, run_dir)
    wall = time.perf_counter() - started
    gc.collect()
    record = {
        "suite": cell.suite,
        "key": cell.key,
        "spec_hash": cell.spec_hash,
        "status": "ok",
        "task": cell.task.name,
        "task_type": cell.task.task,
        "arm": cell.arm,
        "kind": cell.kind,
        "seed": cell.seed,
        "method": (cell.run_config or {}).get("method") if cell.kind not in ("classic", "zero-shot") else None,
        "metric_name": HEADLINE[cell.task.task],
        "wall_seconds": wall,
        "peak_memory_bytes": memory.peak,
        "memory_before_bytes": memory.before,
        "memory_kind": memory.kind,
        "target": cell.task.target.model_dump() if cell.task.target else None,
        "budget": cell.budget,
        **measured,
        # the fully resolved run config (every default filled in), as train() saw it
        "config": dump_config(cell.config())
        if cell.kind != "classic"
        else {"data": cell.run_config["data"], "classic": cell.extra, "seed": cell.seed},
        "environment": {**env_before, "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return record


def _run_training(cell: Cell, run_dir: Path) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a half-finished earlier attempt; this cell starts over
    cfg = cell.config()
    cfg.output.run_dir = str(run_dir)
    result = train(cfg, command=["benchmarks/compare.py", cell.key])
    headline = HEADLINE[cell.task.task]
    test = _numbers(result.metrics.get("adapted") or {})
    train_only = max(result.train_seconds - result.eval_seconds, 1e-9)
    seconds_per_step = train_only / result.steps if result.steps else None
    rows = read_metrics_log(result.run_dir)
    out = {
        "metric": test.get(headline),
        "test_metrics": test,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "adapter_bytes": folder_bytes(result.adapter_dir),
        "adapter_weights_bytes": weights_bytes(result.adapter_dir),
        "steps": result.steps,
        "train_seconds": train_only,
        "eval_seconds_in_loop": result.eval_seconds,
        "tokens": result.tokens_seen,
        "samples": result.samples_seen,
        "tokens_per_second": result.tokens_seen / train_only,
        "samples_per_second": result.samples_seen / train_only,
        "loss_curve": loss_curve(rows),
        "eval_curve": None,
        "steps_to_target": None,
        "seconds_to_target": None,
    }
    target = cell.task.target
    if target is not None:
        curve = metric_curve(rows, target.metric)
        final = (result.metrics.get("validation") or {}).get(target.metric)
        if isinstance(final, (int, float)) and (not curve or curve[-1][0] != result.steps):
            curve.append([result.steps, final])  # the end-of-run validation after best-checkpoint restore
        out["eval_curve"] = curve
        out["steps_to_target"], out["seconds_to_target"] = time_to_target(curve, target, seconds_per_step)
    # The weights are measured; the run folder's big files are not needed by the report.
    for sub in ("adapter", "checkpoints"):
        shutil.rmtree(result.run_dir / sub, ignore_errors=True)
    return out


def _numbers(metrics: dict) -> dict:
    """The numeric (non-bool) entries of a metrics dict."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _load_eval_pieces(cfg: RunConfig):
    prepared = prepare_splits(cfg)
    tokenizer = load_tokenizer(cfg.model)
    return prepared, tokenizer, tokenize_splits(prepared, cfg, tokenizer)


def _run_zero_shot(cell: Cell) -> dict:
    """The untouched pretrained causal LM answering the test prompts (no training)."""
    cfg = cell.config()
    set_seed(cfg.train.seed)
    prepared, tokenizer, tokenized = _load_eval_pieces(cfg)
    model = load_backbone(cfg.model, cfg.task, prepared.label2id)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    test = tokenized["test"] if len(tokenized.get("test", [])) else tokenized["validation"]
    metrics = evaluate_causal_lm(
        model,
        test,
        tokenizer,
        types.SimpleNamespace(device=device),
        cfg.train.eval_batch_size,
        cfg.eval.max_new_tokens,
        generate=True,
    )
    total = sum(p.numel() for p in model.parameters())
    del model
    test_metrics = _numbers(metrics)
    return _untrained(test_metrics.get(HEADLINE[cell.task.task]), test_metrics, total_params=total)


def _run_classic(cell: Cell) -> dict:
    """TF-IDF word n-grams + logistic regression on the very same splits as the neural runs."""
    cfg = cell.config()
    prepared = prepare_splits(cfg)
    text, label = cfg.data.text_field, cfg.data.label_field
    train_split = prepared.splits["train"]
    has_test = "test" in prepared.splits and len(prepared.splits["test"])
    test = prepared.splits["test"] if has_test else prepared.splits["validation"]
    opts = cell.extra
    fitted = tfidf_logistic_regression(
        train_split[text],
        train_split[label],
        test[text],
        test[label],
        prepared.labels,
        cfg.train.seed,
        ngram_max=opts["ngram_max"],
        max_features=opts["max_features"],
        C=opts["C"],
    )
    out = _untrained(fitted.metrics["accuracy"], fitted.metrics, total_params=fitted.params)
    out.update(
        trainable_params=fitted.params,
        train_seconds=fitted.fit_seconds,
        samples=len(train_split),
        samples_per_second=len(train_split) / max(fitted.fit_seconds, 1e-9),
    )
    return out


def _untrained(metric, test_metrics: dict, total_params: int) -> dict:
    return {
        "metric": metric,
        "test_metrics": test_metrics,
        "trainable_params": 0,
        "total_params": total_params,
        "adapter_bytes": 0,
        "adapter_weights_bytes": 0,
        "steps": 0,
        "train_seconds": 0.0,
        "eval_seconds_in_loop": 0.0,
        "tokens": 0,
        "samples": 0,
        "tokens_per_second": None,
        "samples_per_second": None,
        "loss_curve": [],
        "eval_curve": None,
        "steps_to_target": None,
        "seconds_to_target": None,
    }


# ---------------------------------------------------------------- the matrix
def read_results(out_dir: Path) -> list[dict]:
    """Every line of out_dir/results.jsonl (a torn or corrupt line is logged and skipped)."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON (an interrupted write?); ignored", path, n)
    return records


def append_result(out_dir: Path, record: dict) -> None:
    """One line per cell, flushed and fsynced: a crash loses at most the cell being run."""
    path = Path(out_dir) / RESULTS_FILE
    with open(path, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def current_records(cells: list[Cell], records: list[dict]) -> dict[str, dict]:
    """The newest successful record of each planned cell whose spec is unchanged."""
    hashes = {c.key: c.spec_hash for c in cells}
    out: dict[str, dict] = {}
    for rec in records:
        if rec.get("status") == "ok" and hashes.get(rec.get("key")) == rec.get("spec_hash"):
            out[rec["key"]] = rec
    return out


@dataclass
class MatrixRun:
    """What ``run_matrix`` did, by cell key."""

    records: list[dict]  # current records of every planned cell, in plan order
    ran: list[str]  # keys run now
    skipped: list[str]  # keys already finished
    failed: list[str]


def run_matrix(
    suite: SuiteConfig,
    out_dir: str | Path,
    work_dir: str | Path,
    progress: bool = True,
    only: Callable[[Cell], bool] | None = None,
    keep_going: bool = True,
) -> MatrixRun:
    """Run every unfinished cell, appending its line to results.jsonl as it finishes.

    only: a filter on the planned cells; keep_going=False re-raises a cell's error instead of
    recording it as failed.
    """
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = [c for c in plan_cells(suite) if only is None or only(c)]
    done = current_records(cells, read_results(out_dir))
    todo = [c for c in cells if c.key not in done]
    skipped = [c.key for c in cells if c.key in done]
    ran, failed = [], []
    bar = tqdm(
        total=len(cells),
        initial=len(cells) - len(todo),
        desc=f"{suite.name} matrix",
        unit="cell",
        position=0,
        dynamic_ncols=True,
        disable=not progress,
    )
    for cell in todo:
        bar.set_postfix_str(cell.key)
        try:
            record = run_cell(cell, work_dir)
        except Exception as err:  # one broken cell must not lose the rest of a long benchmark
            if not keep_going:
                raise
            log.exception("cell %s failed", cell.key)
            record = {
                "suite": suite.name,
                "key": cell.key,
                "spec_hash": cell.spec_hash,
                "status": "failed",
                "task": cell.task.name,
                "arm": cell.arm,
                "kind": cell.kind,
                "seed": cell.seed,
                "error": f"{type(err).__name__}: {err}",
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            failed.append(cell.key)
        else:
            done[cell.key] = record
            ran.append(cell.key)
        append_result(out_dir, record)
        bar.update(1)
        if progress:
            metric = record.get("metric")
            shown = record.get("error", "done")
            if isinstance(metric, float):
                shown = f"{record['metric_name']}={metric:.4f}"
            bar.write(f"[{bar.n}/{len(cells)}] {cell.key}: {shown}")
    bar.close()
    return MatrixRun([done[c.key] for c in cells if c.key in done], ran, skipped, failed)


def report_header(suite: SuiteConfig, records: list[dict], command: str | None = None) -> dict:
    """What the table's reader needs to trust the numbers: budget, seeds, machine, load, command."""
    envs = [r["environment"] for r in records if r.get("environment")]
    budget = suite.budget.describe() + " per run, the same for every arm of a task"
    if any(t.budget for t in suite.tasks):
        budget += " (" + ", ".join(f"{t.name}: {t.budget.describe()}" for t in suite.tasks if t.budget) + ")"
    header = {
        "suite": suite.name,
        "description": suite.description,
        "budget": budget,
        "seeds": ", ".join(map(str, suite.seeds)),
        "command": f"`{command}`" if command else None,
    }
    if envs:
        env = envs[-1]
        v = env.get("versions", {})
        header["environment"] = (
            f"{env.get('device')} / {env.get('cpu')} ({env.get('cpu_count')} cores, "
            f"{env.get('torch_threads')} torch threads), "
            f"torch {v.get('torch')}, transformers {v.get('transformers')}, peft {v.get('peft')}, "
            f"code {str(env.get('code_revision'))[:10]}"
        )
        loads = [
            x
            for e in envs
            for x in (e.get("load_average", [None])[0], e.get("load_average_after", [None])[0])
            if x is not None
        ]
        total = sum(r.get("wall_seconds") or 0 for r in records)
        header["wall time"] = f"{total / 60:.1f} min summed over the {len(records)} cells (process start-up excluded)"
        if loads:
            header["load"] = (
                f"1-minute load average during the cells: {min(loads):.2f} to {max(loads):.2f} "
                f"(median {statistics.median(loads):.2f})"
            )
    return header


def run_suite(
    suite: SuiteConfig,
    out_dir: str | Path,
    work_dir: str | Path,
    command: str | None = None,
    progress: bool = True,
    only: Callable[[Cell], bool] | None = None,
) -> MatrixRun:
    """run_matrix, then command.txt, table.md and the plots from every current record."""
    out_dir = Path(out_dir)
    result = run_matrix(suite, out_dir, work_dir, progress=progress, only=only)
    if command:
        (out_dir / "command.txt").write_text(command + "\n")
    failed = [r for r in read_results(out_dir) if r.get("status") == "failed" and r["key"] in set(result.failed)]
    write_report(result.records + failed, out_dir, report_header(suite, result.records, command))
    return result
