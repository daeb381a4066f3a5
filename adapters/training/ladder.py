"""The safe ladder: head-only -> partial unfreeze -> the chosen method, one stage at a time.

Each stage is an ordinary training run (``adapters.training.loop.train``) warm-started from the
best stage so far, and the ladder stops as soon as a stage fails to beat that best on the
validation metric (by more than ``min_delta``): more capacity is only bought when it pays.

Warm start: the previous best adapter's tensors are copied into the new stage's *trainable*
parameters wherever their canonical names match (the name in the bare backbone, without
peft's wrappers), e.g. the head of head-only into partial's head, the top blocks of partial
into full fine-tuning. Frozen weights are never changed, so every stage's adapter stays
self-contained: it loads on the untouched base model. (Partial -> LoRA therefore carries the
head only; LoRA's low-rank updates start fresh on the original blocks.)

Config: a normal run config (its ``method`` is the ladder's final, chosen method) plus a
``ladder:`` section (see LadderConfig), e.g. configs/ladder.yaml.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file

from adapters.config import RunConfig, apply_overrides, load_config, read_config_file
from adapters.errors import ConfigError
from adapters.store.store import AdapterStore
from adapters.training.state import is_improvement

log = logging.getLogger(__name__)

CHOSEN = "chosen"  # stage method placeholder: the run config's own method


class LadderStageConfig(BaseModel):
    """One rung: a method (or "chosen": the run's own) and train overrides."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="Stage name, used in folder names and the report.")
    method: str | dict[str, Any] = Field(
        ..., description="Method name or {name, options...}; 'chosen' = the run's method."
    )
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the run's train section for this stage (e.g. a higher lr for head-only).",
    )


def _default_stages() -> list[LadderStageConfig]:
    return [
        LadderStageConfig(name="head-only", method="head-only"),
        LadderStageConfig(name="partial", method={"name": "partial", "blocks": 2}),
        LadderStageConfig(name=CHOSEN, method=CHOSEN),
    ]


class LadderConfig(BaseModel):
    """The `ladder:` section: the stages in order and the validation metric that ranks them."""

    model_config = ConfigDict(extra="forbid")

    stages: list[LadderStageConfig] = Field(default_factory=_default_stages, min_length=1)
    metric: str = Field(
        "eval_loss", description="Validation metric that ranks stages (as train() reports it, e.g. eval_accuracy)."
    )
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    min_delta: float = Field(0.0, ge=0, description="A stage must beat the best so far by more than this to continue.")


def load_ladder_config(path: str | Path, overrides: list[str] | None = None) -> tuple[RunConfig, LadderConfig]:
    """Read a ladder YAML: the `ladder:` section plus a run config. `--set ladder.min_delta=0.01` works too."""
    raw = apply_overrides(read_config_file(path), overrides or [])
    ladder_raw = raw.pop("ladder", None) or {}
    try:
        ladder = LadderConfig.model_validate(ladder_raw)
    except ValidationError as err:
        problems = "; ".join(f"ladder.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ConfigError(problems) from None
    cfg = load_config(raw=raw)
    for stage in ladder.stages:
        stage_config(cfg, stage)  # every stage must validate before the first one trains
    return cfg, ladder


def stage_config(cfg: RunConfig, stage: LadderStageConfig, run_dir: Path | None = None) -> RunConfig:
    """The run config of one stage: the stage's method and train overrides, its own run folder, no publishing."""
    raw = cfg.model_dump(mode="json")
    if stage.method == CHOSEN:
        method: Any = raw["method"]
    elif isinstance(stage.method, str):
        method = {"name": stage.method, "options": {}}
    else:
        method = stage.method
    raw["method"] = method
    raw["train"] = {**raw["train"], **stage.train}
    raw["init_from"] = None
    # The ladder's own first rungs are the frozen baselines; a stage training its own would repeat them.
    raw["eval"] = {**raw["eval"], "baseline": False}
    raw["output"] = {**raw["output"], "publish": False, "name": f"{cfg.output.name}-{_slug(stage.name)}"}
    if run_dir is not None:
        raw["output"]["run_dir"] = str(run_dir)
    try:
        return load_config(raw=raw)
    except ConfigError as err:
        raise ConfigError(f"ladder stage {stage.name!r}: {err}") from None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "stage"


# ---------------------------------------------------------------- warm start
_WRAPPER_SEGMENTS = {"default", "modules_to_save", "original_module", "base_layer"}


def canonical_name(name: str) -> str:
    """A parameter's name in the bare backbone: peft's `base_model.model.` prefix, adapter names
    and wrapper segments (modules_to_save, base_layer) removed."""
    while name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return ".".join(s for s in name.split(".") if s not in _WRAPPER_SEGMENTS)


def read_adapter_tensors(adapter_dir: Path) -> dict[str, Any]:
    """{name: tensor} of an adapter folder's adapter_model.safetensors; ConfigError if it has none."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise ConfigError(f"ladder: {adapter_dir} has no adapter_model.safetensors to warm-start from")
    return load_file(str(path))


def apply_init_state(model, state: dict[str, Any]) -> list[str]:
    """Copy `state` tensors into the model's trainable parameters whose canonical names and
    shapes match; returns the names of the parameters that were set."""
    by_name = {canonical_name(k): v for k, v in state.items()}
    loaded = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            source = by_name.get(canonical_name(name))
            if source is not None and tuple(source.shape) == tuple(param.shape):
                param.copy_(source.to(device=param.device, dtype=param.dtype))
                loaded.append(name)
    log.info("warm start: %d of %d saved tensors loaded into trainable parameters", len(loaded), len(state))
    return loaded


def _warm_start_hook(state: dict[str, Any], loaded: list[str]) -> Callable[[Any], None]:
    """For train(on_model_ready=...): called after the method is attached, before the optimizer exists."""

    def hook(model) -> None:
        loaded.extend(apply_init_state(model, state))

    return hook


# ---------------------------------------------------------------- the ladder
@dataclass
class StageResult:
    """One stage's run: its validation `metric` value, all metrics, size and time, where it was
    warm-started from, and whether it beat the best stage before it."""

    name: str
    method: dict[str, Any]
    run_dir: str
    adapter_dir: str
    metric: float | None
    validation: dict[str, Any]
    test: dict[str, Any]
    trainable_params: int
    train_seconds: float
    warm_started_from: str | None
    warm_started_tensors: int
    improved: bool


@dataclass
class LadderResult:
    """The ladder's stages in order, the best one, and why it stopped early (if it did)."""

    metric: str
    mode: str
    min_delta: float
    stages: list[StageResult] = field(default_factory=list)
    best: str | None = None
    stopped_early: str | None = None  # why the ladder stopped before its last stage (None: all ran)
    ladder_dir: str | None = None
    adapter_ref: str | None = None

    @property
    def best_stage(self) -> StageResult | None:
        """The best stage's result (None before any stage ran)."""
        return next((s for s in self.stages if s.name == self.best), None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (ladder_report.json)."""
        return asdict(self)

    def to_markdown(self) -> str:
        """The Markdown report (ladder_report.md): one table row per stage."""
        lines = [
            "# Ladder report",
            "",
            f"Stages ranked by validation `{self.metric}` ({'higher' if self.mode == 'max' else 'lower'} is better, "
            f"min_delta {self.min_delta}).",
            "",
            f"| stage | method | trainable params | {self.metric} | test metrics | seconds | warm start | improved |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in self.stages:
            value = "n/a" if s.metric is None else f"{s.metric:.4f}"
            shown = ("accuracy", "f1_macro", "loss", "exact_match")
            test = ", ".join(f"{k}={v:.4f}" for k, v in s.test.items() if k in shown)
            warm = f"{s.warm_started_tensors} tensors from {s.warm_started_from}" if s.warm_started_from else "-"
            lines.append(
                f"| {s.name}{' (best)' if s.name == self.best else ''} | {s.method.get('name')} | "
                f"{s.trainable_params:,} | {value} | "
                f"{test} | {s.train_seconds:.1f} | {warm} | {'yes' if s.improved else 'no'} |"
            )
        lines += ["", f"Best stage: **{self.best}**" + (f" ({self.best_stage.adapter_dir})" if self.best_stage else "")]
        if self.stopped_early:
            lines.append(f"Stopped early: {self.stopped_early}")
        return "\n".join(lines) + "\n"


def _scalars(metrics: dict | None) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_ladder(
    cfg: RunConfig,
    ladder: LadderConfig | None = None,
    ladder_dir: str | Path | None = None,
    train_fn: Callable[..., Any] | None = None,
) -> LadderResult:
    """Train the stages in order; each warm-starts from the best so far; stop at the first stage
    that does not improve. Writes ladder_report.json/.md into the ladder folder; publishes the
    best stage's adapter when output.publish is set."""
    if train_fn is None:
        # Here, not at the top: `scripts/ladder.py --check` validates without loading the training stack.
        from adapters.training.loop import train as train_fn
    ladder = ladder or LadderConfig()
    if ladder_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        default = Path("runs") / f"ladder-{_slug(cfg.output.name)}-{stamp}"
        ladder_dir = Path(cfg.output.run_dir) if cfg.output.run_dir else default
    ladder_dir = Path(ladder_dir)
    ladder_dir.mkdir(parents=True, exist_ok=True)
    stage_cfgs = [
        stage_config(cfg, stage, ladder_dir / f"{i + 1}-{_slug(stage.name)}") for i, stage in enumerate(ladder.stages)
    ]

    result = LadderResult(
        metric=ladder.metric, mode=ladder.mode, min_delta=ladder.min_delta, ladder_dir=str(ladder_dir)
    )
    best_value: float | None = None
    for i, (stage, stage_cfg) in enumerate(zip(ladder.stages, stage_cfgs)):
        best = result.best_stage
        loaded: list[str] = []
        hook = _warm_start_hook(read_adapter_tensors(Path(best.adapter_dir)), loaded) if best is not None else None

        log.info("ladder stage %d/%d: %s (%s)", i + 1, len(ladder.stages), stage.name, stage_cfg.method.name)
        run = train_fn(stage_cfg, on_model_ready=hook)
        validation = _scalars(run.metrics.get("validation"))
        if ladder.metric not in validation:
            raise ConfigError(
                f"ladder.metric {ladder.metric!r} is not among the validation metrics of stage {stage.name!r}: "
                f"{', '.join(sorted(validation))}"
            )
        value = validation[ladder.metric]
        improved = is_improvement(value, best_value, ladder.mode, ladder.min_delta)
        result.stages.append(
            StageResult(
                name=stage.name,
                method={"name": stage_cfg.method.name, "options": stage_cfg.method.options},
                run_dir=str(run.run_dir),
                adapter_dir=str(run.adapter_dir),
                metric=value,
                validation=validation,
                test=_scalars(run.metrics.get("adapted")),
                trainable_params=int(run.trainable_params),
                train_seconds=float(run.train_seconds),
                warm_started_from=best.name if best is not None else None,
                warm_started_tensors=len(loaded),
                improved=improved,
            )
        )
        if improved:
            best_value, result.best = value, stage.name
            continue
        if i + 1 < len(ladder.stages):
            result.stopped_early = (
                f"stage {stage.name!r} ({ladder.metric}={value:.4f}) did not beat stage {result.best!r} "
                f"({best_value:.4f}) by more than {ladder.min_delta}; "
                f"skipped {', '.join(s.name for s in ladder.stages[i + 1 :])}"
            )
        break

    if cfg.output.publish and result.best_stage is not None:
        best_dir = Path(result.best_stage.adapter_dir)
        result.adapter_ref = str(AdapterStore(cfg.output.store).publish(best_dir, cfg.output.name))
    (ladder_dir / "ladder_report.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    (ladder_dir / "ladder_report.md").write_text(result.to_markdown())
    return result
