"""A name's tags file, ``<name>/tags.json``: ``{"tags": {"latest": 3, "prod": 2}, "history": {"prod": [1]},
"last_version": 3}``.

``history`` keeps, per tag, the versions it pointed at before each move (oldest first), for rollback;
``last_version`` is the highest version ever assigned, so a removed version's number is never reused.
The store changes the file only while holding the name's lock; the functions here take no lock.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from adapters.errors import StoreError
from adapters.paths import read_bounded_text
from adapters.store.manifest import write_json_atomic
from adapters.store.refs import LATEST, check_tag

TAGS_FILE = "tags.json"
#: A tags file is a few hundred bytes; refuse to parse a huge one (a damaged or hostile file).
MAX_TAGS_BYTES = 1 << 20
_SHAPE = '{"tags": {...}, "history": {...}, "last_version": N}'
_REPAIR = "repair it, or delete it to drop the name's tags (its versions stay)"


def read_state(name_dir: Path) -> dict:
    """The tags file of a name's folder, or an empty state when there is none.

    Raises StoreError, naming the file and what was expected, when the file exists but is not a
    plain file, cannot be read or parsed, or does not have the shape in the module doc.
    """
    path = name_dir / TAGS_FILE
    state = {"tags": {}, "history": {}, "last_version": 0}
    if not os.path.lexists(path):
        return state
    if path.is_symlink() or not path.is_file():
        raise StoreError(f"{path}: damaged tags file: not a plain file (a link, folder or device); {_REPAIR}")
    text = read_bounded_text(
        path,
        MAX_TAGS_BYTES,
        StoreError,
        unreadable=f"{{path}}: unreadable tags file ({{reason}}); {_REPAIR}",
        too_large=f"{{path}}: damaged tags file: larger than {{limit}} bytes; {_REPAIR}",
        not_utf8=f"{{path}}: damaged tags file: not valid UTF-8 JSON ({{reason}}); {_REPAIR}",
    )
    try:
        loaded = json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0]
        raise StoreError(f"{path}: damaged tags file: not valid UTF-8 JSON ({reason}); {_REPAIR}") from None
    problem = state_problem(loaded)
    if problem:
        raise StoreError(f"{path}: damaged tags file: {problem}; {_REPAIR}")
    state.update({k: loaded[k] for k in state if loaded.get(k) is not None})
    return state


def _is_version_number(value: object) -> bool:
    return type(value) is int and value >= 1  # bool is an int subclass; true is no version


def state_problem(loaded: object) -> str | None:
    """What is wrong with a parsed tags file (None when nothing): the expected shape is
    {"tags": {tag: version >= 1}, "history": {tag: [version >= 1, ...]}, "last_version": int >= 0},
    every key optional, tags valid names."""
    if not isinstance(loaded, dict):
        return f"expected a JSON object {_SHAPE}, got {_kind(loaded)}"
    tags, history, last = loaded.get("tags", {}), loaded.get("history", {}), loaded.get("last_version", 0)
    if not isinstance(tags, dict):
        return f"'tags' must be an object mapping tag names to version numbers >= 1, got {_kind(tags)}"
    for tag, version in tags.items():
        if not _valid_tag(tag):
            return f"'tags' holds an invalid tag name {tag[:80]!r}"
        if not _is_version_number(version):
            return f"'tags'.{tag} must be a version number >= 1, got {_kind(version)}"
    if not isinstance(history, dict):
        return f"'history' must be an object mapping tag names to lists of version numbers, got {_kind(history)}"
    for tag, versions in history.items():
        if not _valid_tag(tag):
            return f"'history' holds an invalid tag name {tag[:80]!r}"
        if not isinstance(versions, list) or not all(_is_version_number(v) for v in versions):
            return f"'history'.{tag} must be a list of version numbers >= 1, got {_kind(versions)}"
    if last is not None and (type(last) is not int or last < 0):
        return f"'last_version' must be a whole number >= 0, got {_kind(last)}"
    return None


def _valid_tag(tag: str) -> bool:
    try:
        check_tag(tag)
    except StoreError:
        return False
    return True


def _kind(value: object) -> str:
    """A value as a message shows it: its JSON type and a short excerpt."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    if value is None:
        return "null"
    text = json.dumps(value)
    return f"{names.get(type(value), type(value).__name__)} {text[:40] + ('...' if len(text) > 40 else '')}"


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

    versions: the name's stored versions. Raises StoreError when the name has no such tag, or the tag
    has no such earlier version.
    """
    if tag not in state["tags"]:
        raise StoreError(f"adapter {name!r} has no tag {tag!r}; tags: {', '.join(sorted(state['tags'])) or '(none)'}")
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


def dangling_tags(state_tags: dict[str, int], versions: list[int]) -> dict[str, int]:
    """The {tag: version} of a name's tags whose version is not among versions (removed by hand, or lost)."""
    return {t: v for t, v in sorted(state_tags.items()) if v not in versions}


def tags_on(state_tags: dict[str, int], version: int) -> list[str]:
    """The tags (sorted) that point at version, given a {tag: version} map."""
    return sorted(t for t, v in state_tags.items() if v == version)
