"""GGUF backbones, as far as config validation needs them: which ``model.name`` is a GGUF file, and
whether transformers can read it. Header only, through the ``gguf`` package (llama.cpp's reader):
no torch, no transformers, so ``train.py --check`` stays light. The conversion to a plain HF folder
is adapters.modeling.gguf.

A header is read once per version of a file (its path, device, inode, size, mtime and ctime: an
edit in place whose mtime is set back still changes the ctime, which no user call can set): the summary, and the
file's sha256 once computed, are cached under ``cache_dir()/models/.gguf-index``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from adapters.errors import ConfigError
from adapters.paths import atomic_path, cache_dir

GGUF_SUFFIX = ".gguf"
#: Written into a folder converted from a GGUF: the source file's sha256 (the base fingerprint) and name.
CONVERTED_MARKER = "adapterkit_gguf.json"

#: GGUF architectures (``general.architecture``) that transformers 5.23 converts: its
#: ``modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES`` less the "general"/"tokenizer" key
#: groups, plus the llama.cpp spellings it renames (qwen2moe -> qwen2_moe, ...). Kept here so that
#: validation needs no transformers import; tests/modeling/test_gguf_backbone.py checks it against transformers.
GGUF_ARCHITECTURES: tuple[str, ...] = (
    "bloom",
    "deci",
    "falcon",
    "gemma2",
    "gemma3",
    "gemma4",
    "gpt-oss",
    "gpt2",
    "gpt_oss",
    "lfm2",
    "llama",
    "mamba",
    "minimax-m2",
    "minimax_m2",
    "mistral",
    "nemotron",
    "phi3",
    "qwen2",
    "qwen2_moe",
    "qwen2moe",
    "qwen3",
    "qwen3_moe",
    "qwen3moe",
    "stablelm",
    "starcoder2",
    "t5",
    "t5encoder",
    "umt5",
)

log = logging.getLogger(__name__)
# ggml tensor types stored unquantized: F32 = 0, F16 = 1, BF16 = 30 (ggml.h, GGMLQuantizationType).
_FLOAT_TYPES = {0: "float32", 1: "float16", 30: "bfloat16"}
_memo: dict[str, dict] = {}


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF's header says: ``general.architecture``, ``general.name`` ("" if absent), whether it
    carries ``tokenizer.chat_template``, its number of blocks, and the dtype that holds its weights
    without loss once dequantized ("bfloat16" for quantized files: finer than their 4-8 bit grid)."""

    architecture: str
    name: str
    has_chat_template: bool
    num_layers: int
    weights_dtype: str


def gguf_source(name: str) -> Path | None:
    """The GGUF file ``model.name`` points at: a ``.gguf`` file, or a folder without config.json that
    holds exactly one ``.gguf``. None for anything else (a built-in, an HF folder, a hub id).

    Raises ConfigError for a ``.gguf`` path that does not exist, or a folder holding several.
    """
    path = Path(name).expanduser()
    if name.lower().endswith(GGUF_SUFFIX) and not path.is_dir():  # a folder named *.gguf is a folder
        if not path.is_file():
            raise ConfigError(f"model.name: GGUF file {name} does not exist")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(GGUF_SUFFIX))
    if len(found) > 1:
        raise ConfigError(
            f"model.name: folder {name} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
            "name one of them"
        )
    return found[0] if found else None


def read_header(path: str | Path) -> GGUFHeader:
    """The header of a GGUF file (cached per version of the file: see the module doc).

    Raises ConfigError, one line, for a file the gguf package cannot parse (not a GGUF, a bad
    version) or one whose tensor data ends before the header says it does (a truncated download).
    """
    path = Path(path)
    entry = _index_entry(path)
    if "header" not in entry:
        entry["header"] = asdict(_parse_header(path))
        _save_entry(path, entry)
    return GGUFHeader(**entry["header"])


def check_gguf(path: str | Path) -> GGUFHeader:
    """read_header, then ConfigError unless transformers can convert the file's architecture."""
    header = read_header(path)
    if header.architecture not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"model.name: {Path(path).name} is a GGUF of architecture {header.architecture!r}, which transformers "
            f"cannot read from GGUF; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    return header


def local_model_folder(name: str) -> Path | None:
    """The rule that tells a local model folder from a hub id, for a ``model.name`` that is neither a
    built-in nor a GGUF (gguf_source): an existing path is a folder that must hold config.json; a
    missing one is a hub id unless it starts like a path (``.``, ``/``, ``~``). Returns the folder,
    or None for a hub id (``org/model``). Shared by adapters.modeling.builtins.resolve_model and
    config validation (check_model_name), so that ``--check`` refuses what the run would.

    Raises ConfigError for a path-like name that does not exist, or a path without config.json.
    """
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model.name: {path} is a file; valid: a model folder (with config.json) or a .gguf file")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name: folder {path} has no config.json and no .gguf file")
        return path
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name: folder {name} does not exist")
    return None


def check_model_name(name: str) -> None:
    """Config validation of ``model.name`` by the rule the run resolves it with: a GGUF it names must
    be readable and of a supported architecture; a local-path-looking name must be a folder with
    config.json (local_model_folder); a hub id or a built-in name passes here (built-in names look
    like neither). Raises ConfigError otherwise."""
    path = gguf_source(name)
    if path is not None:
        check_gguf(path)
    else:
        local_model_folder(name)


def gguf_sha256(path: str | Path) -> str:
    """Hex sha256 of the whole GGUF file, cached per version of the file (a 100 MB file takes ~0.5 s)."""
    path = Path(path)
    entry = _index_entry(path)
    if "sha256" not in entry:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        entry["sha256"] = h.hexdigest()
        _save_entry(path, entry)
    return entry["sha256"]


def converted_source(folder: str | Path) -> dict | None:
    """The marker of a folder converted from a GGUF ({"sha256", "source", "architecture", ...}), or None."""
    marker = Path(folder) / CONVERTED_MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _parse_header(path: Path) -> GGUFHeader:
    # The gguf package imports numpy: only when a GGUF is named.
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        fields = reader.fields
        architecture = str(fields["general.architecture"].contents())
        name = str(fields["general.name"].contents()) if "general.name" in fields else ""
        block_key = f"{architecture}.block_count"
        num_layers = int(fields[block_key].contents()) if block_key in fields else 0
        tensors = list(reader.tensors)
    except Exception as err:  # the reader fails with ValueError, KeyError, IndexError... on a bad file
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ConfigError(f"model.name: {path} is not a GGUF file (it does not start with b'GGUF')") from None
        log.debug("reading the GGUF header of %s failed", path, exc_info=err)
        size = path.stat().st_size
        # The reader's own errors are numpy's (reshape, view): say which part of the file is short instead.
        if any(frame.name == "_build_tensors" for frame in traceback.extract_tb(err.__traceback__)):
            where = "its tensor data ends before its header says"
        else:
            where = "it ends inside its header (metadata) or the header is malformed"
        raise ConfigError(
            f"model.name: {path} is truncated or corrupt: {where} (the file has {size:,} bytes); download it again"
        ) from None
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in tensors), default=0)
    if not tensors or end > size:
        raise ConfigError(
            f"model.name: {path} is truncated or corrupt: its header describes {len(tensors)} tensors ending at "
            f"byte {end}, but the file has {size} bytes; download it again"
        )
    kinds = {_FLOAT_TYPES.get(int(t.tensor_type), "quantized") for t in tensors if len(t.shape) >= 2}
    if "quantized" in kinds:
        weights_dtype = "bfloat16"
    else:  # one float type is kept as is; a mix widens to float32
        weights_dtype = kinds.pop() if len(kinds) == 1 else "float32"
    return GGUFHeader(architecture, name, "tokenizer.chat_template" in fields, num_layers, weights_dtype)


def _index_file(path: Path) -> tuple[Path, str]:
    st = path.stat()
    stamp = {
        "path": str(path.resolve()),
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }
    key = json.dumps(stamp, sort_keys=True)
    return cache_dir() / "models" / ".gguf-index" / (hashlib.sha256(key.encode()).hexdigest() + ".json"), key


def _index_entry(path: Path) -> dict:
    """The cached facts of this version of the file ({} on a miss); a stale version has another key."""
    try:
        index, key = _index_file(path)
    except OSError as err:
        raise ConfigError(f"model.name: cannot read GGUF file {path}: {err}") from None
    if key in _memo:
        return dict(_memo[key])
    try:
        cached = json.loads(index.read_text())
        if cached.get("key") == key:
            _memo[key] = cached
            return dict(cached)
    except (OSError, ValueError):
        pass
    return {"key": key}


def _save_entry(path: Path, entry: dict) -> None:
    index, key = _index_file(path)
    _memo[key] = dict(entry)
    try:  # a read-only cache only costs time
        index.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(index, fsync=False) as tmp:
            tmp.write_text(json.dumps(entry))
    except OSError:
        pass
