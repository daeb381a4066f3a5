"""What every adaptation method shares, and the one registry that names them.

A method is a subclass of ``AdaptationMethod`` in its own module under
``adapters/methods/``, registered with one call: ``register_method(MyMethod())``.
Its options are a small pydantic model (defaults + help text), validated before
any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, get_args

import torch.nn as nn
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from adapters.constants import ADAPTER_CONFIG, TASKS
from adapters.errors import ConfigError

ALL_TASKS = frozenset(TASKS)


class NumbersNotBools(BaseModel):
    """Base of config models (run config sections, method options): a boolean given for a number
    field is an error. YAML's true/false are bools, which pydantic's lax mode reads as 1/0."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("must be a number, not a boolean")
        return value


def _numeric(annotation: Any) -> bool:
    """Whether a field's type takes an int or a float (alone or in a union) and no bool."""
    args = get_args(annotation) or (annotation,)
    return bool not in args and any(a in (int, float) or (a is not annotation and _numeric(a)) for a in args)


class MethodOptions(NumbersNotBools):
    """Base for a method's options: unknown keys are errors, and so are nan, inf and booleans for numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about a backbone, read from its config only (no weights)."""

    model_type: str  # e.g. "llama", "bert"
    is_encoder: bool  # bidirectional encoder (BERT family) vs decoder-only
    num_layers: int  # transformer blocks (config.num_hidden_layers)
    hidden_size: int  # width of the residual stream
    quantized: bool = False  # the backbone will load in 4/8-bit


class AdaptationMethod:
    """One way of adapting a backbone. Subclasses set the class attributes and implement attach/save/load.

    ``PeftMethod`` (adapters.methods.peft_base) implements them for peft tuners and
    ``DeltaMethod`` (adapters.methods.weights_delta) for methods that train the backbone's own weights.
    """

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, shown by --list-methods
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    tasks: ClassVar[frozenset[str]] = ALL_TASKS
    supports_quantized: ClassVar[bool] = False  # may train on a 4/8-bit backbone
    mixable: ClassVar[bool] = False  # rows with different adapters can share one forward pass

    # -- options -----------------------------------------------------------------
    def parse_options(self, raw: dict[str, Any] | MethodOptions | None) -> MethodOptions:
        """Validate `raw` (the config's ``method`` keys; None = all defaults) into this method's Options.

        Raises ConfigError naming each bad ``method.<key>`` and, for an unknown key, the valid ones.
        """
        if isinstance(raw, self.Options):
            return raw
        try:
            return self.Options.model_validate(raw or {})
        except ValidationError as err:
            problems = []
            for e in err.errors():
                key = ".".join(str(p) for p in e["loc"])
                if e["type"] == "extra_forbidden":
                    problems.append(
                        f"unknown option 'method.{key}' for method {self.name!r}; "
                        f"valid options: {', '.join(self.Options.model_fields) or '(none)'}"
                    )
                else:
                    message = e["msg"].removeprefix("Value error, ")
                    problems.append(f"method.{key} ({self.name}): {message} (got {e.get('input')!r})")
            raise ConfigError("; ".join(problems)) from None

    def check_model(self, options: MethodOptions, info: ModelInfo, task: str) -> None:
        """Raise ConfigError when this method cannot work on this backbone. Called before weights load."""

    # -- the work ----------------------------------------------------------------
    def attach(self, model: nn.Module, options: MethodOptions, task: str, adapter_name: str = "default") -> nn.Module:
        """Return the model with this method attached and only its parameters trainable."""
        raise NotImplementedError

    def save(self, model: nn.Module, folder: Path, state_dict: dict | None = None) -> None:
        """Write only what training changed (adapter_config.json + adapter_model.safetensors).

        `state_dict` is the full gathered state dict when parameters are sharded (DeepSpeed
        ZeRO-3); pick this method's tensors from it instead of reading the (empty) shards.
        """
        raise NotImplementedError

    def load(
        self, model: nn.Module, folder: Path, adapter_name: str = "default", is_trainable: bool = False
    ) -> nn.Module:
        """Attach a saved adapter from `folder` to a freshly loaded base `model`."""
        raise NotImplementedError

    def describe_options(self) -> list[tuple[str, str, str]]:
        """(name, default, help) for each option, for --list-methods."""
        rows = []
        for key, field in self.Options.model_fields.items():
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            rows.append((key, default, field.description or ""))
        return rows


_REGISTRY: dict[str, AdaptationMethod] = {}


def register_method(method: AdaptationMethod) -> AdaptationMethod:
    """Make `method` available by its name in configs, the store and the inference engine.

    Raises ValueError when another class already registered the same name.
    """
    if method.name in _REGISTRY and type(_REGISTRY[method.name]) is not type(method):
        raise ValueError(f"adaptation method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> AdaptationMethod:
    """The registered method called `name` (case-insensitive, "_" read as "-"); ConfigError lists the valid names."""
    _ensure_builtin_methods()
    key = (name or "").strip().lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def list_methods() -> list[AdaptationMethod]:
    """Every registered method, sorted by name."""
    _ensure_builtin_methods()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def method_of_folder(folder: Path) -> AdaptationMethod:
    """Which registered method saved this adapter folder (from its adapter_config.json); ConfigError if none."""
    cfg_path = Path(folder) / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise ConfigError(f"{folder} is not an adapter folder: {ADAPTER_CONFIG} is missing")
    return method_of_config(json.loads(cfg_path.read_text()), folder)


def method_of_config(cfg: dict, folder: Path | str = "adapter") -> AdaptationMethod:
    """Which registered method wrote this adapter_config.json content (folder: for the error).

    adapterkit's own folders name it in ``adapterkit_method``; a plain peft folder is recognised by
    its ``peft_type`` (LORA with ``use_dora`` is dora). Raises ConfigError when neither tells.
    """
    cfg_path = Path(folder) / ADAPTER_CONFIG
    name = cfg.get("adapterkit_method")
    if name is None:  # a plain peft folder
        name = _PEFT_TYPE_TO_METHOD.get(str(cfg.get("peft_type", "")).upper())
        if name == "lora" and cfg.get("use_dora"):
            name = "dora"
    if name is None:
        raise ConfigError(f"{cfg_path}: cannot tell which method saved it (peft_type={cfg.get('peft_type')!r})")
    return get_method(name)


_PEFT_TYPE_TO_METHOD = {
    "LORA": "lora",
    "IA3": "ia3",
    "LOHA": "loha",
    "LOKR": "lokr",
    "VERA": "vera",
    "PROMPT_TUNING": "prompt-tuning",
    "PREFIX_TUNING": "prefix-tuning",
    "P_TUNING": "p-tuning",
}


def _ensure_builtin_methods() -> None:
    # Importing the package imports every built-in method module, each of which registers itself.
    # Not at module level: the package imports this module first.
    import adapters.methods  # noqa: F401
