"""Save and load only the backbone weights a classic strategy trained (head, top blocks, or all).

Shared by ``head-only``, ``partial`` and ``full``. The folder mirrors peft's layout so the store
and the inference engine treat it like any adapter:

- ``adapter_config.json``: ``{"adapterkit_method", "options", "task", "parameter_names",
  "base_model_name_or_path", "base_model_type"}``
- ``adapter_model.safetensors``: exactly the tensors named in ``parameter_names``.

Loading = load the base, then ``load_state_dict(strict=False)`` with those keys, checking that every
key landed on a parameter of the same shape. A tied weight (lm_head = embeddings) is one tensor
and is saved once, under its first name.

These are the classic transfer-learning baselines that parameter-efficient methods are measured
against: a new head on frozen features (head-only), the top blocks unfrozen (partial), everything
trained (full); Devlin et al. 2019 (BERT) compare full fine-tuning with feature extraction.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from adapters.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapters.errors import BaseMismatchError, ConfigError
from adapters.methods.targets import FINAL_NORM_NAMES
from adapters.paths import atomic_path

DELTA_ATTR = "adapterkit_delta"  # the model attribute that remembers what a classic method trains


@dataclass
class WeightsDelta:
    """What a classic strategy trains on one model: its method, options and parameter names."""

    method: str
    options: dict[str, Any]
    task: str
    parameter_names: list[str]
    adapter_name: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def train_only(model: nn.Module, prefixes: list[str] | None) -> list[str]:
    """Make trainable exactly the parameters under `prefixes` (None: all). Returns their names, each
    tensor once (a tied weight under its first name), in the model's order; ConfigError if none matched."""
    names, seen = [], set()
    # remove_duplicate=False: a tied weight must be unfrozen if any of its names is selected.
    selected_ids = {
        id(p) for n, p in model.named_parameters(remove_duplicate=False) if prefixes is None or _under(n, prefixes)
    }
    for n, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(id(p) in selected_ids)
        if id(p) in selected_ids and id(p) not in seen:
            seen.add(id(p))
            names.append(n)
    if not names:
        raise ConfigError(f"no parameters matched {prefixes}: nothing would be trained")
    return names


def remember(model: nn.Module, delta: WeightsDelta) -> nn.Module:
    """Record `delta` on `model`; ConfigError when the model already holds another such adapter."""
    existing = getattr(model, DELTA_ATTR, None)
    if existing is not None and existing.adapter_name != delta.adapter_name:
        raise ConfigError(
            f"method {delta.method!r} changes the backbone's own weights: one model holds one such adapter "
            f"({existing.adapter_name!r} is already loaded); load {delta.adapter_name!r} on a fresh base model"
        )
    setattr(model, DELTA_ATTR, delta)
    return model


def delta_of(model: nn.Module) -> WeightsDelta:
    """What ``remember`` recorded on `model`; ConfigError when no classic method is attached."""
    delta = getattr(model, DELTA_ATTR, None)
    if delta is None:
        raise ConfigError("this model has no head-only/partial/full method attached: call attach() or load() first")
    return delta


def base_name_or_path(model: nn.Module) -> str | None:
    """The folder or hub id the backbone was loaded from, as its config recorded it."""
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None


def save_delta(model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the trained tensors and the config, each file atomically (temp + fsync + rename).

    state_dict: the full gathered state dict under ZeRO-3 (the model's own parameters are empty shards
    there). Raises ConfigError when a recorded parameter is missing.
    """
    delta = delta_of(model)
    source = state_dict if state_dict is not None else dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in delta.parameter_names if n not in source]
    if missing:
        raise ConfigError(f"cannot save {delta.method!r}: the model has no parameters {missing[:5]}")
    tensors = {n: source[n].detach().to("cpu").contiguous() for n in delta.parameter_names}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "adapterkit_method": delta.method,
        "options": delta.options,
        "task": delta.task,
        "parameter_names": list(delta.parameter_names),
        "base_model_name_or_path": base_name_or_path(model),
        "base_model_type": getattr(getattr(model, "config", None), "model_type", None),
        **delta.extra,
    }
    with atomic_path(folder / ADAPTER_WEIGHTS, sync_dir=True) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(folder / ADAPTER_CONFIG, sync_dir=True) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's adapter_config.json; ConfigError when it is missing."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise ConfigError(f"{folder} is not an adapter folder: {ADAPTER_CONFIG} is missing")
    return json.loads(path.read_text())


def load_delta(model: nn.Module, folder: Path, method: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load the saved tensors into `model` in place -> (model, saved config).

    Raises ConfigError for a folder of another method or inconsistent files, BaseMismatchError when a
    saved key is not a same-shaped parameter of `model`.
    """
    folder = Path(folder)
    config = read_config(folder)
    if config.get("adapterkit_method") != method:
        raise ConfigError(f"{folder} was saved by method {config.get('adapterkit_method')!r}, not {method!r}")
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    names = config.get("parameter_names") or []
    if sorted(tensors) != sorted(names):
        raise ConfigError(f"{folder}: {ADAPTER_WEIGHTS} does not hold the tensors {ADAPTER_CONFIG} lists")
    # Names saved under a module's older name (the model's own mapping, as peft applies it to adapters).
    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    if mapping:
        tensors = {renamed_by(n, mapping): t for n, t in tensors.items()}
        names = config["parameter_names"] = [renamed_by(n, mapping) for n in names]
    own = dict(model.named_parameters(remove_duplicate=False))
    unknown = [n for n in names if n not in own]
    wrong_shape = [
        (n, tuple(tensors[n].shape), tuple(own[n].shape))
        for n in names
        if n in own and own[n].shape != tensors[n].shape
    ]
    if unknown or wrong_shape:
        raise BaseMismatchError(
            f"{folder} does not fit this base model (saved on {config.get('base_model_name_or_path')!r}, "
            f"type {config.get('base_model_type')!r}): "
            + (f"unknown parameters {unknown[:5]}" if unknown else "")
            + (f" shape mismatches {wrong_shape[:5]}" if wrong_shape else "")
        )
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above; kept as the load's own verdict
        raise BaseMismatchError(f"{folder}: keys not in the model: {result.unexpected_keys[:5]}")
    return model, config


def renamed_by(name: str, mapping: dict[str, str]) -> str:
    """`name` renamed by the first regex of `mapping` (pattern -> replacement) that matches it; else `name`."""
    for pattern, replacement in mapping.items():
        renamed, n = re.subn(pattern, replacement, name)
        if n:
            return renamed
    return name


# ---------------------------------------------------------------- the shared method base
def block_list_name(model: nn.Module) -> str:
    """Name of the ModuleList holding the transformer blocks (the one with num_hidden_layers entries).

    Raises ConfigError when the model has no such list.
    """
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not candidates:
        raise ConfigError(f"cannot find the {n_layers} transformer blocks of {type(model).__name__}")
    return min(candidates, key=len)  # the outermost, should a block nest a list of the same length


def top_modules(model: nn.Module, blocks: str) -> list[str]:
    """Modules above the last block that are not the head: a decoder's final norm, BERT's pooler."""
    names = []
    for name, module in model.named_modules():
        if not name or _under(name, [blocks]) or not any(True for _ in module.parameters(recurse=False)):
            continue
        last = name.rsplit(".", 1)[-1]
        if last in FINAL_NORM_NAMES or last == "dense" and name.endswith("pooler.dense"):
            names.append(name)
    return names


class DeltaMethod:
    """Mixin for AdaptationMethod subclasses that train the backbone's own weights (head-only, partial, full).

    Subclasses implement ``trainable_prefixes(model, options, task)`` (None = everything).
    """

    mixable = False  # the weights themselves change: one adapter per model copy

    def trainable_prefixes(self, model, options, task) -> list[str] | None:
        """Module names whose parameters this method trains on `model` (None: every parameter)."""
        raise NotImplementedError

    def attach(self, model, options, task, adapter_name="default"):
        """Freeze everything but ``trainable_prefixes`` and record them on the model (no wrapper)."""
        options = self.parse_options(options)
        names = train_only(model, self.trainable_prefixes(model, options, task))
        return remember(model, WeightsDelta(self.name, options.model_dump(mode="json"), task, names, adapter_name))

    def save(self, model, folder, state_dict=None):
        """``save_delta``: the trained tensors and adapter_config.json."""
        save_delta(model, folder, state_dict)

    def load(self, model, folder, adapter_name="default", is_trainable=False):
        """``load_delta`` into `model` in place; the saved parameters trainable when `is_trainable`, else all frozen."""
        model, config = load_delta(model, folder, self.name)
        names = config["parameter_names"]
        if is_trainable:
            train_only(model, names)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
        delta = WeightsDelta(self.name, config.get("options") or {}, config.get("task"), names, adapter_name)
        return remember(model, delta)
