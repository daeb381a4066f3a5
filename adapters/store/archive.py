"""Export and import of adapter versions as folders or .tar.gz archives.

An archive holds one top folder ``<name>-<version>/`` with the version's files. Extraction refuses
absolute paths, '..', links and special files, so an archive cannot write outside its folder.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import uuid
from pathlib import Path

from adapters.constants import MANIFEST
from adapters.errors import StoreError
from adapters.paths import fsync_dir
from adapters.store.manifest import safe_relative

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


def write_export(folder: Path, dest: Path, label: str) -> Path:
    """Copy folder to dest: a folder, or a gzipped tar with top folder label if dest ends in .tar.gz / .tgz.

    Written under a temporary name beside dest, fsynced, then renamed: dest appears whole or not
    at all. Returns dest. Raises StoreError if dest already exists.
    """
    if dest.exists():
        raise StoreError(f"export: {dest} already exists; choose a new path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".export-{uuid.uuid4().hex[:12]}"
    try:
        if dest.name.endswith(ARCHIVE_SUFFIXES):
            with tarfile.open(tmp, "w:gz") as tar:
                for path in sorted(folder.rglob("*")):
                    if path.is_file():
                        tar.add(path, arcname=f"{label}/{path.relative_to(folder).as_posix()}", recursive=False)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            shutil.copytree(folder, tmp)
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return dest


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive (any compression tarfile reads) into the folder dest.

    Raises StoreError, before writing anything, when the archive is unreadable or holds an
    absolute path, '..', a link or a special file; and for any member that would land outside dest.
    """
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise StoreError(f"import: {archive} is not a readable tar archive ({err})") from err
    with tar:
        members = tar.getmembers()
        for m in members:
            if m.name.startswith("/") or not safe_relative(m.name.rstrip("/")):
                raise StoreError(
                    f"import: {archive} holds an unsafe path {m.name!r} (absolute or with '..'); refusing it"
                )
            if not (m.isfile() or m.isdir()):
                raise StoreError(f"import: {archive} holds {m.name!r}, a link or special file; refusing it")
        dest_resolved = dest.resolve()
        for m in members:
            target = (dest / m.name).resolve()
            if dest_resolved not in target.parents and target != dest_resolved:
                raise StoreError(f"import: {m.name!r} would land outside the extraction folder; refusing it")
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fin = tar.extractfile(m)
            with fin, open(target, "xb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)


def adapter_root(extracted: Path, archive: Path) -> Path:
    """The adapter folder in an extracted archive: extracted itself, or its one subfolder with a manifest.

    Raises StoreError when there is no such folder or more than one.
    """
    if (extracted / MANIFEST).is_file():
        return extracted
    candidates = [p for p in extracted.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
    if len(candidates) != 1:
        raise StoreError(f"import: {archive} must hold one adapter folder with a {MANIFEST}; found {len(candidates)}")
    return candidates[0]
