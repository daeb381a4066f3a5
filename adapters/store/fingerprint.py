"""Content fingerprints of a base model, a tokenizer and a data set: "sha256:<hex>".

A manifest records the fingerprints an adapter was trained with, so that loading it on another
base fails loudly. Model weights are hundreds of MB: their fingerprint is cached under
``cache_dir()/fingerprints``, keyed by the folder's path and each hashed file's size and mtime,
so it is computed once per version of the files, not on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from adapters.errors import AdapterkitError, StoreError
from adapters.gguf_meta import GGUF_SUFFIX, converted_source, gguf_sha256
from adapters.paths import atomic_path, cache_dir

PREFIX = "sha256:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of one file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- base model
def model_files(path: str | Path) -> list[Path]:
    """The files that define a model's weights: config.json and every weight file (sorted).

    path: a model folder, or a single-file model such as a .gguf. Raises StoreError when it is
    neither, or the folder holds no weight file.
    """
    path = Path(path)
    if path.is_file():  # a single-file model, e.g. a .gguf
        return [path]
    if not path.is_dir():
        raise StoreError(f"cannot fingerprint model {str(path)!r}: not a local folder or file")
    files = [
        p
        for p in sorted(path.iterdir())
        if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES))
    ]
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in files):
        raise StoreError(
            f"cannot fingerprint model folder {path}: no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})"
        )
    return files


def fingerprint_model(path: str | Path) -> str:
    """Fingerprint ("sha256:<hex>") of a model folder's config.json and weight files; cached across calls
    and processes. Raises StoreError as model_files.

    A GGUF backbone's fingerprint is the sha256 of the GGUF file itself, whether given the file or
    the folder converted from it (adapters.modeling.gguf records the file's sha256 in the folder):
    an adapter trained on one GGUF is refused on another, and accepted on the same file anywhere.
    """
    source = converted_source(path) if Path(path).is_dir() else None
    if source and isinstance(source.get("sha256"), str):
        _CONVERTED[PREFIX + source["sha256"]] = Path(path)
        return PREFIX + source["sha256"]
    if Path(path).is_file() and str(path).lower().endswith(GGUF_SUFFIX):
        try:
            return PREFIX + gguf_sha256(path)
        except (AdapterkitError, OSError) as err:  # an unreadable file: a store error here, not a config one
            raise StoreError(f"cannot fingerprint model {str(path)!r}: {err}") from None
    files = model_files(path)
    return _cached("model", Path(path), files, lambda: _hash_named_files(files))


# GGUF fingerprint -> the folder converted from it, seen by fingerprint_model in this process.
_CONVERTED: dict[str, Path] = {}


def legacy_fingerprint(fingerprint: str | None) -> str | None:
    """The content fingerprint ("sha256:<hex>" of config.json + weights) of the folder converted from the
    GGUF whose fingerprint is ``fingerprint``, or None when no such folder was fingerprinted here.

    Adapters published before GGUF backbones were fingerprinted by their file recorded this value
    for the built-in SmolLM2 (its converted weights are byte-identical), so they still load.
    """
    folder = _CONVERTED.get(fingerprint or "")
    if folder is None:
        return None
    files = model_files(folder)
    return _cached("model", folder, files, lambda: _hash_named_files(files))


def _hash_named_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return PREFIX + h.hexdigest()


# ---------------------------------------------------------------- tokenizer
def fingerprint_tokenizer(path_or_tokenizer: Any) -> str:
    """Fingerprint of what a tokenizer does: its vocabulary, merges, normalisation, special
    tokens and chat template. The same tokenizer gives the same fingerprint whether passed as a
    loaded object or as a folder (a folder is loaded with AutoTokenizer; the result is cached).

    Returns "sha256:<hex>". Raises StoreError for a path that is not a folder holding tokenizer files.
    """
    if isinstance(path_or_tokenizer, (str, os.PathLike)):
        folder = Path(path_or_tokenizer)
        if not folder.is_dir():
            raise StoreError(f"cannot fingerprint tokenizer {str(folder)!r}: not a local folder")
        files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
        if not files:
            raise StoreError(
                f"cannot fingerprint tokenizer folder {folder}: "
                f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)"
            )

        def compute() -> str:
            # transformers takes seconds to import; here only on a fingerprint cache miss, not on store CLI start-up.
            from transformers import AutoTokenizer

            return _tokenizer_digest(AutoTokenizer.from_pretrained(str(folder)))

        return _cached("tokenizer", folder, files, compute)
    return _tokenizer_digest(path_or_tokenizer)


def _tokenizer_digest(tok: Any) -> str:
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    state: dict[str, Any] = {}
    if backend is not None and hasattr(backend, "to_str"):
        spec = json.loads(backend.to_str())
        # Padding/truncation are call-time settings that a tokenizer object carries, not behaviour.
        spec.pop("padding", None)
        spec.pop("truncation", None)
        state["backend"] = spec
    else:  # a pure-python tokenizer: its vocabulary is what it does
        state["vocab"] = sorted(tok.get_vocab().items())
    state["special_tokens"] = {k: str(v) for k, v in sorted(getattr(tok, "special_tokens_map", {}).items())}
    state["chat_template"] = getattr(tok, "chat_template", None)
    state["class"] = type(tok).__name__.replace("Fast", "")
    return PREFIX + hashlib.sha256(_canonical_json(state).encode()).hexdigest()


# ---------------------------------------------------------------- data
def fingerprint_dataset(data: Any) -> str:
    """Content hash of the rows given, in order: a datasets.Dataset or an iterable of dict rows.

    Not datasets' own ``_fingerprint`` (which tracks transform history, not content): a Dataset
    and a list holding the same rows give the same fingerprint. Returns "sha256:<hex>"; raises
    StoreError for a row that is not a dict or holds a value JSON cannot represent.
    """
    h = hashlib.sha256()
    count = 0
    for row in _rows(data):
        if not isinstance(row, dict):
            raise StoreError(f"fingerprint_dataset: rows must be dicts, got {type(row).__name__}")
        h.update(_canonical_json(row).encode())
        h.update(b"\n")
        count += 1
    h.update(f"rows={count}".encode())
    return PREFIX + h.hexdigest()


def _rows(data: Any) -> Iterable[dict]:
    if hasattr(data, "iter") and hasattr(data, "column_names"):  # datasets.Dataset: batched is far faster
        for batch in data.iter(batch_size=1000):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                yield dict(zip(keys, values))
    else:
        yield from data


# ---------------------------------------------------------------- helpers
def _canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_jsonable, allow_nan=True
    )


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    raise StoreError(f"fingerprint: cannot hash a value of type {type(value).__name__}")


def _cached(kind: str, where: Path, files: list[Path], compute) -> str:
    """Return compute()'s fingerprint, remembered under a key of (kind, path, sizes, mtimes)."""
    stats = []
    for f in files:
        st = f.stat()
        stats.append([f.name, st.st_size, st.st_mtime_ns])
    key_src = _canonical_json({"kind": kind, "path": str(where.resolve()), "files": stats})
    key = hashlib.sha256(key_src.encode()).hexdigest()
    folder = cache_dir() / "fingerprints"
    entry = folder / f"{key}.json"
    try:
        cached = json.loads(entry.read_text())
        if cached.get("key") == key_src and str(cached.get("fingerprint", "")).startswith(PREFIX):
            return cached["fingerprint"]
    except (OSError, ValueError):
        pass
    fingerprint = compute()
    folder.mkdir(parents=True, exist_ok=True)
    try:  # a concurrent reader sees the old entry or the whole new one, never half
        with atomic_path(entry, fsync=False) as tmp:
            tmp.write_text(json.dumps({"key": key_src, "fingerprint": fingerprint}))
    except OSError:  # a read-only cache only costs speed
        pass
    return fingerprint
