"""The store's listing: one row per version, and one row per damaged entry, so damage never hides the rest.

A damaged tags file, a tag pointing at a removed version, an unreadable manifest or one edited after
publish (its digest no longer matches), a link or file where a name's folder should be, or a
folder whose name is no valid adapter name each become a row with an ``error`` key saying what is
wrong; every other name and version is listed as usual.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapters.errors import ConfigError, StoreError
from adapters.paths import validate_name
from adapters.store import tags as tagfile
from adapters.store.manifest import digest_problems, read_manifest
from adapters.store.refs import is_version


def list_rows(root: Path, names: list[str] | None = None) -> list[dict]:
    """Rows of the store at root (list of dicts: name, version, tags, created_at, task, method, base,
    metrics, and error for damage), for the given names or (None) every entry of the root.

    Never raises StoreError for damage inside the store; names must be valid names (the caller checks).
    """
    rows: list[dict] = []
    if names is None:
        names = []
        for entry in _entries(root):
            problem = _entry_problem(root, entry)
            if problem:
                rows.append(damaged_row(entry, None, problem))
            else:
                names.append(entry)
    for name in names:
        rows += _name_rows(root / name, name)
    return rows


def damaged_row(name: str, version: int | None, error: str) -> dict:
    """A listing row for something that cannot be listed normally; error says what is wrong with it."""
    return {**_row(name, version, [], {}), "error": error}


def _entries(root: Path) -> list[str]:
    try:
        return sorted(e for e in os.listdir(root) if not e.startswith("."))  # hidden: staging folders, locks
    except OSError as err:
        raise StoreError(f"cannot list the store root {root} ({err.strerror or err})") from None


def _entry_problem(root: Path, entry: str) -> str | None:
    """Why a visible entry of the root is no adapter name's folder (None when it is one)."""
    try:
        validate_name(entry, "adapter name")
    except ConfigError as err:
        return f"{root}: entry {entry!r} is not an adapter folder: {err}"
    path = root / entry
    if path.is_symlink():
        return f"{path}: a link; the store holds plain folders only (remove it, or replace it by the folder)"
    if not path.is_dir():
        return f"{path}: a file where an adapter name's folder should be"
    return None


def _name_rows(name_dir: Path, name: str) -> list[dict]:
    rows = []
    try:
        tags = tagfile.read_state(name_dir)["tags"]
    except StoreError as err:  # the versions are still listed, without tags
        rows.append(damaged_row(name, None, str(err)))
        tags = {}
    try:
        entries = sorted(os.listdir(name_dir))
    except OSError as err:
        return rows + [damaged_row(name, None, f"{name_dir}: cannot list ({err.strerror or err})")]
    versions = sorted(int(e) for e in entries if is_version(e))
    for version in versions:
        folder = name_dir / str(version)
        if folder.is_symlink() or not folder.is_dir():
            rows.append(damaged_row(name, version, f"{folder}: not a version folder (a link or a file); ignored"))
            continue
        try:
            manifest = read_manifest(folder)
        except StoreError as err:
            rows.append(damaged_row(name, version, str(err)))
            continue
        problems = digest_problems(folder, manifest)  # one small file: cheap enough to check on every listing
        if problems:
            rows.append(damaged_row(name, version, f"{folder}: {'; '.join(problems)}; its fields are not shown"))
            continue
        rows.append(_row(name, version, tagfile.tags_on(tags, version), manifest))
    stored = [v for v in versions if (name_dir / str(v)).is_dir() and not (name_dir / str(v)).is_symlink()]
    for tag, version in tagfile.dangling_tags(tags, stored).items():
        rows.append(
            damaged_row(
                name,
                None,
                f"tag {name}@{tag} points at version {version}, which was removed; "
                f"move it (store tag {name}@<version> {tag}) or remove it (store untag {name} {tag})",
            )
        )
    return rows


def _row(name: str, version: int | None, tags: list[str], manifest: dict) -> dict:
    return {
        "name": name,
        "version": version,
        "tags": tags,
        "created_at": manifest.get("created_at"),
        "task": manifest.get("task"),
        "method": (manifest.get("method") or {}).get("name"),
        "base": (manifest.get("base_model") or {}).get("name"),
        "metrics": manifest.get("metrics") or {},
    }
