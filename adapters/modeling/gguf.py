"""A GGUF file as a backbone: converted once into a plain HF folder under the model cache.

The folder is ``cache_dir()/models/gguf-<sha256 of the file>``: the same file under any path or
name (the built-in SmolLM2 included) is converted once, under a file lock, into a temporary folder
renamed into place in one step, so a half-written folder is never visible. transformers reads the
GGUF (``from_pretrained(folder, gguf_file=...)``, dequantized to fp32); the weights are saved in the
GGUF's own float type, bfloat16 for a quantized one (adapters.gguf_meta.GGUFHeader.weights_dtype).
The folder carries a marker (adapters.gguf_meta.CONVERTED_MARKER) with the file's sha256, which
adapters.store.fingerprint reports as the base fingerprint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from adapters.errors import ConfigError
from adapters.gguf_meta import CONVERTED_MARKER, GGUFHeader, check_gguf, gguf_sha256
from adapters.paths import cache_dir

log = logging.getLogger(__name__)

#: Conversions this process has run (a cache hit adds nothing): for tests and logs.
conversions = 0


def converted_folder(gguf_path: str | Path) -> Path:
    """Where the conversion of this GGUF lives (whether or not it exists yet)."""
    return cache_dir() / "models" / f"gguf-{gguf_sha256(gguf_path)}"


def convert_gguf(gguf_path: str | Path) -> Path:
    """The plain HF folder (config.json, safetensors, tokenizer with the GGUF's chat template) of a
    GGUF causal LM; converted on first use (~40 s for 135M parameters), found in the cache after.

    Raises ConfigError for an unreadable or truncated file, an architecture transformers cannot
    read from GGUF, or a conversion transformers refuses (one line, naming the file).
    """
    gguf_path = Path(gguf_path)
    header = check_gguf(gguf_path)
    target = converted_folder(gguf_path)
    if (target / CONVERTED_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / CONVERTED_MARKER).is_file():  # another process converted it meanwhile
            return target
        log.info("converting %s (GGUF, %s) once into %s", gguf_path.name, header.architecture, target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        try:
            _convert_into(gguf_path, header, tmp)
            marker = {"sha256": gguf_sha256(gguf_path), "source": gguf_path.name, **_marker_fields(header)}
            (tmp / CONVERTED_MARKER).write_text(json.dumps(marker, indent=1))
            shutil.rmtree(target, ignore_errors=True)  # a folder left without its marker is incomplete
            os.replace(tmp, target)  # atomic: the folder appears whole, marker included
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    global conversions
    conversions += 1
    return target


def _marker_fields(header: GGUFHeader) -> dict:
    return {"architecture": header.architecture, "name": header.name, "weights_dtype": header.weights_dtype}


def _convert_into(gguf_path: Path, header: GGUFHeader, out: Path) -> None:
    """Write the HF folder of `gguf_path` into `out`. Raises ConfigError when transformers cannot."""
    # Only for the one-time conversion: resolving an already converted model stays light.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; a model built from its config does not.
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError, NotImplementedError) as err:
        message = " ".join(str(err).split())[:300]
        raise ConfigError(
            f"model.name: transformers cannot convert {name} (GGUF architecture {header.architecture!r}) "
            f"into a causal LM: {type(err).__name__}: {message}"
        ) from None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    dtype = getattr(torch, header.weights_dtype)
    model.to(dtype).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
