"""A name's tags file, ``<name>/tags.json``: ``{"tags": {"latest": 3, "prod": 2}, "history": {"prod": [1]},
"last_version": 3}``.

``history`` keeps, per tag, the versions it pointed at before each move (oldest first), for rollback;
``last_version`` is the highest version ever assigned, so a removed version's number is never reused.
The store changes the file only while holding the name's lock; the functions here take no lock.
"""

from __future__ import annotations

import json
from pathlib import Path

from adapters.errors import StoreError
from adapters.store.manifest import write_json_atomic
from adapters.store.refs import LATEST

TAGS_FILE = "tags.json"


def read_state(name_dir: Path) -> dict:
    """The tags file of a name's folder, or an empty state when there is none.

    Raises StoreError when the file exists but cannot be read or parsed.
    """
    path = name_dir / TAGS_FILE
    state = {"tags": {}, "history": {}, "last_version": 0}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise StoreError(f"{path}: unreadable ({err})") from err
        state.update({k: loaded[k] for k in state if k in loaded})
    return state


def write_state(name_dir: Path, state: dict) -> None:
    """Replace the name's tags file atomically (readers see the old or the new file)."""
    write_json_atomic(name_dir / TAGS_FILE, state)


def move_tag(state: dict, tag: str, version: int) -> None:
    """Point tag at version in state, remembering where it pointed before."""
    previous = state["tags"].get(tag)
    if previous is not None and previous != version:
        state["history"].setdefault(tag, []).append(previous)
    state["tags"][tag] = version


def remove_tag(state: dict, name: str, tag: str) -> None:
    """Drop tag and its history from state; StoreError when the name has no such tag."""
    if tag not in state["tags"]:
        raise StoreError(f"adapter {name!r} has no tag {tag!r}; tags: {', '.join(sorted(state['tags'])) or '(none)'}")
    del state["tags"][tag]
    state["history"].pop(tag, None)


def roll_back(state: dict, name: str, tag: str, versions: list[int]) -> int:
    """Point tag back at the newest earlier version that still exists; returns that version.

    versions: the name's stored versions. Raises StoreError when the tag has no such earlier version.
    """
    history = [v for v in state["history"].get(tag, []) if v in versions]
    if not history:
        raise StoreError(f"{name}@{tag} has no earlier version to roll back to")
    version = history.pop()
    state["tags"][tag] = version
    state["history"][tag] = history
    return version


def forget_version(state: dict, version: int, remaining: list[int]) -> None:
    """Drop a removed version from state: the tags on it go (``latest`` moves to the newest of
    remaining, if any) and it leaves every tag's history."""
    pointing = [t for t, v in state["tags"].items() if v == version]
    for t in pointing:
        del state["tags"][t]
    if LATEST in pointing and remaining:
        state["tags"][LATEST] = remaining[-1]
    state["history"] = {t: [v for v in h if v != version] for t, h in state["history"].items()}


def tags_on(state_tags: dict[str, int], version: int) -> list[str]:
    """The tags (sorted) that point at version, given a {tag: version} map."""
    return sorted(t for t, v in state_tags.items() if v == version)
