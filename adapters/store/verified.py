"""Remember which adapter folders this machine has verified, so a new process need not hash them again.

Checking every file of an adapter against its manifest's sha256 costs milliseconds per MB, paid on
every first load in every new process (a server restart, a worker, a CLI call). A store version
never changes after publish, so once its files pass, we record a stamp of them under
``cache_dir()/verified``: for every file its size, mtime, ctime, inode and device. A later check
with the same stamp skips the hashing; any write to any file changes its ctime (which, unlike
mtime, cannot be set back by ``touch``/``os.utime``), so a changed file is hashed again.

A stamp is only recorded when every file is older than ``RACY_SECONDS``: file timestamps tick
coarsely (a kernel jiffy, up to 2 s on some file systems), so a write in the same tick as our
read could otherwise leave the stamp equal (git's "racy clean" problem). A fresh publish is thus
hashed once more on first use; from then on loads skip the hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from adapters.paths import atomic_path, cache_dir
from adapters.store.manifest import verify_folder

RACY_SECONDS = 2.0


def folder_stamp(folder: str | os.PathLike) -> list[list]:
    """[relative path, size, mtime_ns, ctime_ns, inode, device] of every entry under folder, sorted.

    Changes when any file is written, replaced, added or removed; [] when the folder is gone.
    """
    out: list[list] = []
    try:
        _stamp_into(os.fspath(folder), "", out)
    except OSError:
        return []
    return sorted(out)


def _stamp_into(folder: str, prefix: str, out: list[list]) -> None:
    with os.scandir(folder) as entries:  # scandir + lstat: no Path objects on this hot path
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                _stamp_into(entry.path, rel + "/", out)
            else:
                st = entry.stat(follow_symlinks=False)
                out.append([rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])


def _entry(real_path: str) -> Path:
    key = hashlib.sha256(real_path.encode()).hexdigest()[:40]
    return cache_dir() / "verified" / f"{key}.json"


def is_verified(folder: str | os.PathLike, stamp: list[list] | None = None) -> bool:
    """True when this machine verified exactly these files before (no hashing here)."""
    real = os.path.realpath(folder)
    stamp = folder_stamp(real) if stamp is None else stamp
    if not stamp:
        return False
    try:
        with open(_entry(real), encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("path") == real and record.get("files") == stamp


def _record(real: str, stamp: list[list], started_ns: int) -> None:
    racy_ns = started_ns - int(RACY_SECONDS * 1e9)
    if not stamp or any(max(f[2], f[3]) >= racy_ns for f in stamp):
        return  # a file changed too recently to trust its timestamps
    entry = _entry(real)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(entry, fsync=False) as tmp:  # readers see the old record or the whole new one
            tmp.write_text(json.dumps({"path": real, "files": stamp, "verified_at": time.time()}))
    except OSError:  # a read-only cache only costs speed
        pass


def verify_folder_cached(
    folder: str | os.PathLike, recheck: bool = False, stamp: list[list] | None = None
) -> list[str]:
    """verify_folder(folder), skipped when this machine verified the same files before.

    recheck=True always hashes (an explicit ``verify``). A clean result is recorded; problems never are.
    stamp: folder_stamp(folder) if the caller just took it.
    """
    folder = Path(folder)
    before = folder_stamp(folder) if stamp is None else stamp
    if not recheck and is_verified(folder, before):
        return []
    started_ns = time.time_ns()
    problems = verify_folder(folder)
    if not problems and folder_stamp(folder) == before:  # nothing changed while we hashed
        _record(os.path.realpath(folder), before, started_ns)
    return problems


def prune_records() -> int:
    """Forget records of folders that are gone or changed (store gc calls this). Returns how many were removed."""
    removed = 0
    for entry in sorted((cache_dir() / "verified").glob("*.json")):
        try:
            record = json.loads(entry.read_text())
            stale = not isinstance(record, dict) or folder_stamp(record.get("path") or "") != record.get("files")
        except (OSError, ValueError):
            stale = True
        if stale:
            entry.unlink(missing_ok=True)
            removed += 1
    return removed
