"""Adapter references: ``name`` (its ``latest`` tag, else its newest version), ``name@3``,
``name@prod``, or a folder path (anything with a '/' or starting with '.' or '~').

Names and tags are validated here, before any of them becomes part of a path in the store.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.errors import ConfigError, StoreError
from adapters.paths import validate_name

LATEST = "latest"
_VERSION = re.compile(r"[1-9][0-9]{0,17}")  # matched in full (`$` would accept "3\n"); < 2**63


@dataclass(frozen=True)
class AdapterRef:
    """One stored version: ``str(ref)`` is the reference that finds it again (``name@version``).

    path: the version's folder in the store.
    """

    name: str
    version: int
    path: Path

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


def is_version(text: str) -> bool:
    """True for a version number as written in a reference or folder name: 1, 2, ... (no sign, no leading 0,
    at most 18 digits)."""
    return isinstance(text, str) and bool(_VERSION.fullmatch(text))


def is_path_ref(ref: str | os.PathLike) -> bool:
    """A reference is a folder path when it is a Path, holds a separator, or starts with '.' or '~'."""
    if isinstance(ref, os.PathLike):
        return True
    return "/" in ref or os.sep in ref or ref.startswith((".", "~"))


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'name' -> (name, None); 'name@3' / 'name@prod' -> (name, '3' / 'prod').

    Raises StoreError for an empty or non-string reference, an invalid name or tag, or nothing after '@'.
    """
    if not isinstance(ref, str) or not ref:
        raise StoreError(f"invalid adapter reference {ref!r}: use name, name@<version>, name@<tag> or a folder path")
    name, sep, selector = ref.partition("@")
    check_name(name, "adapter name")
    if sep:
        if not selector:
            raise StoreError(f"invalid adapter reference {ref!r}: nothing after '@' (use name@<version> or name@<tag>)")
        if not is_version(selector):
            check_name(selector, "tag")
        return name, selector
    return name, None


def select_version(name: str, selector: str | None, versions: list[int], tags: dict[str, int], root: Path) -> int:
    """The version a parsed reference (name, selector) names, given the name's stored versions and tags
    in the store folder root.

    No selector: the ``latest`` tag, exactly as name@latest (a dangling one is refused, not silently
    replaced by another version); the newest version only when the name has no ``latest`` tag. Raises
    StoreError when there is no such version or tag, or the tag points at a removed version.
    """
    if selector is None:
        if LATEST in tags:
            selector = LATEST
        elif versions:
            return versions[-1]
        else:
            raise StoreError(f"adapter {name!r} has no versions in {root}")
    if is_version(selector):
        version = int(selector)
        if version not in versions:
            raise StoreError(
                f"adapter {name!r} has no version {version}; versions: {', '.join(map(str, versions)) or '(none)'}"
            )
        return version
    if selector not in tags:
        raise StoreError(f"adapter {name!r} has no tag {selector!r}; tags: {', '.join(sorted(tags)) or '(none)'}")
    if tags[selector] not in versions:
        raise StoreError(
            f"tag {name}@{selector} points at version {tags[selector]}, which was removed; "
            f"versions: {', '.join(map(str, versions)) or '(none)'} (move the tag, or remove it)"
        )
    return tags[selector]


def check_name(name: Any, what: str) -> str:
    """name, if it is a valid adapter name or tag (adapters.paths.validate_name); else StoreError."""
    try:
        return validate_name(name, what)
    except ConfigError as err:
        raise StoreError(str(err)) from None


def check_tag(tag: Any) -> str:
    """tag, if it is a valid name that is not a number (name@3 means version 3); else StoreError."""
    check_name(tag, "tag")
    if tag.isdigit():
        raise StoreError(f"invalid tag {tag!r}: a tag cannot be a number (name@{tag} means version {tag})")
    return tag
