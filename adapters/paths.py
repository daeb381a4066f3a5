"""Where things live on disk, the rule for names that become paths, and how files are replaced atomically."""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # matched in full: `$` would accept a trailing newline


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
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"invalid {what} {name!r}: use 1-128 ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..' or path separators"
        )
    return name


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or new entry in folder durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(
    path: str | os.PathLike, *, fsync: bool = True, mode: int | None = None, sync_dir: bool = False
) -> Iterator[Path]:
    """A temporary path next to ``path``; when the block succeeds, it replaces ``path`` in one rename,
    so readers see the old file or the whole new one, never half. On an error it is removed.

    fsync: flush the data to disk before the rename (off for caches, which only cost time when lost).
    mode: chmod the file (mkstemp makes 0600 files). sync_dir: also make the rename itself durable.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def read_bounded_text(
    path: str | os.PathLike,
    limit: int,
    error: type[Exception] = ConfigError,
    *,
    unreadable: str = "{path}: cannot be read ({reason})",
    too_large: str = "{path}: larger than {limit:,} bytes",
    not_utf8: str = "{path}: not UTF-8 text (byte 0x{byte:02x} on line {line}); save the file as UTF-8",
) -> str:
    """The text of a UTF-8 file of at most ``limit`` bytes, read without loading more than limit + 1 bytes
    (a huge, damaged or hostile file costs no memory).

    Raises ``error`` with one message, a ``str.format`` template the caller may replace:
    ``unreadable`` when the file cannot be opened or read (a folder, a missing file, no permission;
    fields: path, reason = the OS's words, error = the whole OSError), ``too_large`` when it holds more
    than ``limit`` bytes (fields: path, limit), ``not_utf8`` when its bytes are not UTF-8 (fields: path,
    byte = the first bad byte, line = its 1-based line, reason = the codec's message).
    Callers check first whether the path should exist and be a plain file: opening a FIFO waits for a writer.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as err:
        raise error(unreadable.format(path=path, reason=err.strerror or err, error=err)) from None
    if len(data) > limit:
        raise error(too_large.format(path=path, limit=limit))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise error(not_utf8.format(path=path, byte=data[err.start], line=line, reason=err)) from None


def package_dir(dist: str, module: str) -> Path:
    """Folder of the installed package `module` (PyPI distribution `dist`), found without importing it.

    Raises ConfigError naming the distribution to install when it is missing.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"built-in needs the PyPI package {dist!r}: install it with `pip install --no-deps {dist}`")
    return Path(list(spec.submodule_search_locations)[0])
