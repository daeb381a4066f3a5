"""Staging folders: where a publish, import, removal or export is assembled before one rename makes it visible.

Each staging folder ``<parent>/<prefix><random>`` is guarded by a file lock ``<folder>.lock`` that
its process holds while it lives. A killed process leaves the folder but its lock dies with it,
so `gc` can tell a leftover (lock free) from work in progress (lock held).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from adapters.paths import fsync_dir

STAGING_PREFIXES = (".publish-", ".import-", ".trash-", ".export-")


@contextmanager
def staging(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh folder under parent, removed on exit, guarded by a lock that `gc` tests to tell live from dead.

    The lock is taken before the folder exists, so gc never sees an unlocked live folder.
    """
    path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    guard = FileLock(str(path) + ".lock")
    guard.acquire()
    try:
        path.mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        guard.release()
        Path(str(path) + ".lock").unlink(missing_ok=True)


def discard(folder: Path) -> None:
    """Delete folder: renamed first, so it disappears atomically; a crash mid-delete leaves a .trash- folder for gc."""
    trash = folder.parent / f".trash-{folder.name}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, trash)
    fsync_dir(folder.parent)
    shutil.rmtree(trash)


def remove_leftovers(root: Path, places: Iterable[Path], dry_run: bool = False) -> list[str]:
    """Remove staging folders (and orphaned guards) in places that no live process holds.

    Returns their paths relative to root; with dry_run only lists them.
    """
    removed = []
    for place in places:
        for path in sorted(place.iterdir()):
            if not path.name.startswith(STAGING_PREFIXES):
                continue
            if path.name.endswith(".lock"):  # a guard whose folder is gone (killed before mkdir)
                owner = path.with_name(path.name[: -len(".lock")])
                if path.exists() and not owner.exists() and _reclaim(owner, dry_run):
                    removed.append(str(path.relative_to(root)))
            elif _reclaim(path, dry_run):
                removed.append(str(path.relative_to(root)))
    return removed


def _reclaim(path: Path, dry_run: bool) -> bool:
    """Remove a staging leftover unless a live process still holds its lock."""
    guard = FileLock(str(path) + ".lock", timeout=0)
    try:
        guard.acquire()
    except Timeout:
        return False  # a publish in progress
    try:
        if dry_run:
            return True
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    finally:
        guard.release()
        if not path.exists():
            Path(str(path) + ".lock").unlink(missing_ok=True)
    return True
