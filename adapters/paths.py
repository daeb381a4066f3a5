"""Where things live on disk, and the rule for names that become paths."""

from __future__ import annotations

import os
import re
from pathlib import Path

from adapters.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def cache_dir() -> Path:
    """Root of everything adapterkit caches: converted models, fingerprints, the default store."""
    root = os.environ.get("ADAPTERKIT_CACHE")
    if root:
        path = Path(root).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
        path = Path(base) / "adapterkit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def validate_name(name: str, what: str = "name") -> str:
    """Accept a name that is safe to use as one path component, or raise ConfigError.

    Letters, digits, '.', '_' and '-'; must start with a letter or digit; no '..'.
    """
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ConfigError(
            f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..' or path separators"
        )
    return name
