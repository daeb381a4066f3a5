"""manifest.json: what an adapter is, what it was trained on and with, and the checksum of every file.

The format is the shared contract between training (writes it), the store (versions it) and
inference (checks it before loading). Keys are listed in MANIFEST_KEYS; ``files`` maps each
other file's path (relative, '/'-separated) to its sha256 hex digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from adapters import __version__
from adapters.constants import MANIFEST, TASKS
from adapters.errors import ConfigError, StoreError
from adapters.paths import atomic_path, read_bounded_text
from adapters.store.fingerprint import (
    PREFIX,
    fingerprint_dataset,
    fingerprint_model,
    fingerprint_tokenizer,
    sha256_file,
)

FORMAT = "adapterkit.manifest/1"
#: Beside a published manifest.json: its sha256, in `sha256sum` format, written at publish. The manifest lists
#: every other file's checksum; this file covers the manifest itself (its base fingerprint, metrics, ...).
MANIFEST_DIGEST = "manifest.json.sha256"
#: Key a publish adds to the manifest, naming the digest file, so that deleting that file is noticed too.
DIGEST_KEY = "manifest_digest"
#: Types of the manifest keys readers index into (None always allowed): a manifest with another type is damaged.
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "version": (int,),
    "created_at": (str,),
    "task": (str,),
    "method": (dict,),
    "base_model": (dict,),
    "labels": (list, dict),
    "prompt": (dict,),
    "training": (dict,),
    "data": (dict,),
    "metrics": (dict,),
    "parent": (str,),
    "versions": (dict,),
    "code_revision": (str,),
    "files": (dict,),
    "run_id": (str,),
    DIGEST_KEY: (str,),
}
#: A manifest is a few KB; refuse to parse a huge one.
MAX_MANIFEST_BYTES = 16 << 20
MANIFEST_KEYS = (
    "format",
    "name",
    "version",
    "created_at",
    "task",
    "method",
    "base_model",
    "labels",
    "prompt",
    "training",
    "data",
    "metrics",
    "parent",
    "versions",
    "code_revision",
    "files",
    "reference",
    "objective",
)
#: Keys a manifest may lack: written by later versions than some stored adapters.
OPTIONAL_KEYS = ("reference", "objective")
BASE_MODEL_KEYS = ("name", "path", "revision", "fingerprint", "tokenizer_fingerprint")
PROMPT_KEYS = ("system_prompt", "instruction", "label_names")
DATA_KEYS = ("source", "fingerprint", "num_train", "num_validation", "num_test")
# Distributions whose versions decide whether an adapter reloads the same way.
TRACKED_LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "accelerate",
    "datasets",
    "tokenizers",
    "bitsandbytes",
)
_SETTABLE = tuple(k for k in MANIFEST_KEYS if k not in ("format", "files"))


def build_manifest(**fields: Any) -> dict:
    """The manifest dict for an adapter, with created_at, versions and code_revision filled in.

    Required: task, method ({name, options} or a method name), base_model ({name, path, revision,
    fingerprint, tokenizer_fingerprint}). Optional: every other key of MANIFEST_KEYS except
    format and files (write_manifest fills files). Pydantic models are dumped to plain dicts.
    Raises ConfigError for an unknown or missing field, an invalid task or method, or a value JSON cannot hold.
    """
    unknown = sorted(set(fields) - set(_SETTABLE))
    if unknown:
        raise ConfigError(
            f"build_manifest: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(_SETTABLE)}"
        )
    missing = [k for k in ("task", "method", "base_model") if fields.get(k) is None]
    if missing:
        raise ConfigError(f"build_manifest: missing required field(s) {', '.join(missing)}")
    task = fields["task"]
    if task not in TASKS:
        raise ConfigError(f"build_manifest: task {task!r} is not one of {', '.join(TASKS)}")

    method = _plain(fields["method"])
    if isinstance(method, str):
        method = {"name": method, "options": {}}
    if not isinstance(method, dict) or not method.get("name"):
        raise ConfigError("build_manifest: method must be a method name or a dict {name, options}")
    method = {"name": method["name"], "options": dict(method.get("options") or {})}

    manifest = {
        "format": FORMAT,
        "name": fields.get("name"),
        "version": fields.get("version"),
        "created_at": fields.get("created_at") or utc_now(),
        "task": task,
        "method": method,
        "base_model": _with_keys(_plain(fields["base_model"]), BASE_MODEL_KEYS, "base_model"),
        "labels": _plain(fields.get("labels")),
        "prompt": _with_keys(_plain(fields.get("prompt") or {}), PROMPT_KEYS, "prompt"),
        "training": _plain(fields.get("training")),
        "data": _with_keys(_plain(fields.get("data") or {}), DATA_KEYS, "data"),
        "metrics": _plain(fields.get("metrics") or {}),
        "parent": _plain(fields.get("parent")),
        "objective": _plain(fields.get("objective")),  # {"name": "dpo", "reference": ...}: how it was trained
        "versions": _plain(fields.get("versions")) or library_versions(),
        "code_revision": fields["code_revision"] if "code_revision" in fields else code_revision(),
        "files": {},
    }
    if fields.get("reference") is not None:
        manifest["reference"] = _plain(fields["reference"])
    try:  # fail here, not at publish time, on a value JSON cannot hold
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"build_manifest: a value cannot be stored as JSON ({err})") from None
    return manifest


def base_model_entry(name: str, path: str | os.PathLike, revision: str | None = None, tokenizer: Any = None) -> dict:
    """The manifest's base_model dict for a local base folder: fingerprints of its weights
    (cached) and of its tokenizer (the loaded `tokenizer` if given, else the folder's).

    Raises StoreError when path holds no weights or tokenizer files.
    """
    return {
        "name": name,
        "path": os.fspath(path),
        "revision": revision,
        "fingerprint": fingerprint_model(path),
        "tokenizer_fingerprint": fingerprint_tokenizer(tokenizer if tokenizer is not None else path),
    }


def data_entry(source: str, train: Any, validation: Any = None, test: Any = None) -> dict:
    """The manifest's data dict: row counts per split and one fingerprint over all given splits
    (a change to the evaluation rows changes what the metrics mean, so it counts too).

    train, validation, test: datasets.Dataset or lists of dict rows (None for a missing split).
    """
    splits = {"train": train, "validation": validation, "test": test}
    h = hashlib.sha256()
    for split, rows in splits.items():
        if rows is not None:
            h.update(f"{split}={fingerprint_dataset(rows)}\n".encode())
    return {
        "source": source,
        "fingerprint": PREFIX + h.hexdigest(),
        **{f"num_{split}": (len(rows) if rows is not None else None) for split, rows in splits.items()},
    }


def utc_now() -> str:
    """The current UTC time as ISO 8601 with seconds, e.g. 2025-01-31T12:00:00+00:00."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str | None]:
    """Versions of adapterkit, python and the libraries that shape a saved adapter (None if absent)."""
    versions: dict[str, str | None] = {"adapterkit": __version__, "python": platform.python_version()}
    for dist in TRACKED_LIBRARIES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def code_revision() -> str | None:
    """The git commit of the adapterkit checkout in use, or None outside a git checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if len(sha) in (40, 64) else None


def _with_keys(value: Any, keys: tuple[str, ...], what: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"build_manifest: {what} must be a dict with keys {', '.join(keys)}")
    return {**{k: None for k in keys}, **value}


def _plain(value: Any) -> Any:
    """Pydantic models, Paths, tuples and numpy scalars → JSON-ready values."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


# ---------------------------------------------------------------- files on disk
def _walk(folder: Path):
    """(relative posix path, absolute path) of every entry under folder except the top-level manifest and its digest."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(filenames) + [d for d in dirnames if (base / d).is_symlink()]:
            path = base / name
            rel = path.relative_to(folder).as_posix()
            if rel not in (MANIFEST, MANIFEST_DIGEST):
                yield rel, path


def file_checksums(folder: str | Path) -> dict[str, str]:
    """{relative path: sha256 hex} of every file in folder except manifest.json. Links are refused."""
    folder = Path(folder)
    sums = {}
    for rel, path in _walk(folder):
        if path.is_symlink() or not path.is_file():
            raise StoreError(f"{folder}: {rel} is a link or special file; an adapter folder holds plain files only")
        sums[rel] = sha256_file(path)
    return sums


def write_json_atomic(path: str | Path, value: Any, mode: int = 0o644) -> None:
    """Write JSON so that readers see the old file or the complete new one: temp + fsync + rename."""
    with atomic_path(path, mode=mode, sync_dir=True) as tmp:  # mode: manifests are meant to be read by others
        tmp.write_text(json.dumps(value, indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")


def write_manifest(folder: str | Path, manifest: dict) -> dict:
    """Write folder/manifest.json atomically with ``files`` set to the sha256 of every other file.

    Returns the manifest as written. Raises StoreError when folder is not a folder, the manifest is
    invalid (manifest_problems) or the folder holds a link or special file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StoreError(f"write_manifest: {folder} is not a folder")
    problems = manifest_problems(manifest, require_files=False)
    if problems:
        raise StoreError(f"write_manifest: invalid manifest: {'; '.join(problems)}")
    written = {**manifest, "files": file_checksums(folder)}
    write_json_atomic(folder / MANIFEST, written)
    return written


def read_manifest(folder: str | Path) -> dict:
    """The manifest of an adapter folder.

    Raises StoreError, naming the file, when it is missing, not a plain file, unreadable, not JSON,
    not this format, or a key readers use has the wrong type (manifest_type_problems).
    """
    path = Path(folder) / MANIFEST
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise StoreError(f"{path}: not a plain file (a link, folder or device); a manifest must be a plain file")
    if not path.is_file():
        raise StoreError(f"{folder} has no {MANIFEST}: not an adapterkit adapter folder")
    text = read_bounded_text(
        path,
        MAX_MANIFEST_BYTES,
        StoreError,
        unreadable="{path}: unreadable manifest ({error})",
        too_large="{path}: unreadable manifest (larger than {limit} bytes)",
        not_utf8="{path}: unreadable manifest ({reason})",
    )
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0]
        raise StoreError(f"{path}: unreadable manifest ({reason})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(f"{path}: format {str(got)[:80]!r} is not {FORMAT!r}")
    problems = manifest_type_problems(manifest)
    if problems:
        raise StoreError(f"{path}: damaged manifest: {'; '.join(problems)}")
    return manifest


def manifest_type_problems(manifest: dict) -> list[str]:
    """Keys of a manifest dict whose value has a type readers cannot use (each key may be null)."""
    problems = []
    for key, types in _KEY_TYPES.items():
        value = manifest.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            expected = " or ".join(
                {dict: "an object", list: "a list", str: "a string", int: "a number"}[t] for t in types
            )
            problems.append(f"{key!r} must be {expected} or null, got {type(value).__name__}")
    method = manifest.get("method")
    if isinstance(method, dict) and not isinstance(method.get("name"), str):
        problems.append("'method' must name its method as a string ('method.name')")
    files = manifest.get("files")
    if isinstance(files, dict) and not all(isinstance(v, str) for v in files.values()):
        problems.append("'files' must map each relative path to a sha256 hex string")
    return problems


def manifest_digest(folder: str | Path) -> str:
    """The sha256 hex of folder's manifest.json as stored (its bytes, not its parsed value)."""
    return sha256_file(Path(folder) / MANIFEST)


def write_manifest_digest(folder: str | Path, mode: int = 0o444) -> None:
    """Record manifest.json's sha256 beside it (MANIFEST_DIGEST, `sha256sum -c` can check it), atomically."""
    with atomic_path(Path(folder) / MANIFEST_DIGEST, mode=mode, sync_dir=True) as tmp:
        tmp.write_text(f"{manifest_digest(folder)}  {MANIFEST}\n", encoding="ascii")


def digest_problems(folder: str | Path, manifest: dict | None = None) -> list[str]:
    """What is wrong with the manifest's digest (empty when it matches, or when the folder never had one:
    see has_manifest_digest). manifest: read_manifest(folder) if the caller has it."""
    folder = Path(folder)
    path = folder / MANIFEST_DIGEST
    if manifest is None:
        try:
            manifest = read_manifest(folder)
        except StoreError as err:
            return [str(err)]
    if not os.path.lexists(path):
        if manifest.get(DIGEST_KEY):
            return [f"{MANIFEST_DIGEST} is missing, but the manifest says it was published with one"]
        return []
    try:
        if path.is_symlink() or not path.is_file():
            raise ValueError("not a plain file")
        with open(path, "rb") as fh:
            recorded = fh.read(200).decode("ascii").split()[0].lower()
    except (OSError, ValueError, IndexError) as err:
        return [f"{MANIFEST_DIGEST}: unreadable ({err}); expected '<sha256 hex>  {MANIFEST}'"]
    actual = manifest_digest(folder)
    if recorded != actual:
        return [
            f"{MANIFEST}: digest mismatch (recorded at publish {recorded[:12]}..., now {actual[:12]}...); "
            "the manifest was edited after publish"
        ]
    return []


def has_manifest_digest(folder: str | Path) -> bool:
    """True when folder has a manifest digest (versions published before digests existed have none)."""
    return os.path.lexists(Path(folder) / MANIFEST_DIGEST)


def manifest_problems(manifest: Any, require_files: bool = True) -> list[str]:
    """What is wrong with a manifest dict's shape (empty list when nothing).

    require_files: ``files`` must list at least one checksum (false for a manifest not yet written).
    """
    if not isinstance(manifest, dict):
        return [f"manifest is a {type(manifest).__name__}, not a dict"]
    problems = []
    if manifest.get("format") != FORMAT:
        problems.append(f"format {manifest.get('format')!r} is not {FORMAT!r}")
    for key in MANIFEST_KEYS:
        if key not in OPTIONAL_KEYS and key not in manifest:
            problems.append(f"missing key {key!r}")
    if manifest.get("task") not in TASKS:
        problems.append(f"task {manifest.get('task')!r} is not one of {', '.join(TASKS)}")
    if not isinstance(manifest.get("base_model"), dict):
        problems.append("base_model is not a dict")
    files = manifest.get("files")
    if require_files and (not isinstance(files, dict) or not files):
        problems.append("files lists no checksums")
    return problems


def safe_relative(rel: str) -> bool:
    """True for a relative '/'-path that stays inside its folder."""
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel and not rel.startswith("~")


def verify_folder(folder: str | Path) -> list[str]:
    """Everything wrong with an adapter folder: manifest shape and digest (when it has one, digest_problems),
    missing, changed and unlisted files."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except StoreError as err:
        return [str(err)]
    problems = manifest_problems(manifest) + digest_problems(folder, manifest)
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    for rel, expected in sorted(files.items()):
        if not safe_relative(rel):
            problems.append(f"manifest lists an unsafe path {rel!r}")
            continue
        path = folder / rel
        if path.is_symlink() or (path.exists() and not path.is_file()):
            problems.append(f"{rel}: not a plain file")
        elif not path.is_file():
            problems.append(f"{rel}: missing")
        else:
            actual = sha256_file(path)
            if actual != expected:
                problems.append(f"{rel}: checksum mismatch (manifest {str(expected)[:12]}..., file {actual[:12]}...)")
    for rel, _path in _walk(folder):
        if rel not in files:
            problems.append(f"{rel}: not listed in the manifest")
    return problems


# ---------------------------------------------------------------- comparing
DIFF_SECTIONS = (
    "task",
    "method",
    "base_model",
    "labels",
    "prompt",
    "training",
    "data",
    "metrics",
    "parent",
    "versions",
    "objective",
)


def diff_manifests(a: dict, b: dict) -> dict[str, dict[str, list]]:
    """{section: {dotted key: [value in a, value in b]}} for every leaf of DIFF_SECTIONS that differs."""
    out = {}
    for section in DIFF_SECTIONS:
        fa, fb = _flatten(a.get(section)), _flatten(b.get(section))
        changes = {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
        if changes:
            out[section] = changes
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat = {}
        for k, v in value.items():
            flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return flat
    return {prefix or "(value)": value}
