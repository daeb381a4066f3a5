"""Export and import of adapter versions as folders or .tar.gz archives.

An archive holds one top folder ``<name>-<version>/`` with the version's files. Import checks every
header before extracting anything (safe_extract): it refuses absolute paths, '..', links and special
files, duplicate members, and archives over MAX_MEMBERS members, MAX_MEMBER_BYTES per file or
MAX_TOTAL_BYTES in all, so an archive can neither write outside its folder nor fill the disk.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import tarfile
import uuid
import zlib
from pathlib import Path, PurePosixPath

from adapters.constants import MANIFEST
from adapters.errors import StoreError
from adapters.paths import fsync_dir
from adapters.store.manifest import safe_relative

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
#: Limits on an imported archive, checked from its headers before anything is extracted. An adapter
#: folder holds a handful of files; its weights are rarely above a few GB even for 70B-parameter bases.
MAX_MEMBERS = 1000
MAX_MEMBER_BYTES = 16 << 30
MAX_TOTAL_BYTES = 32 << 30
MAX_PATH_BYTES = 1024
#: Bytes of tar headers allowed per member on top of the files' sizes (a header block, long-name and pax records).
HEADER_ALLOWANCE = 4096


#: Suffixes of archive and compression formats export does not write: such a dest is refused, not made a folder.
OTHER_ARCHIVE_SUFFIXES = (
    ".zip", ".tar", ".gz", ".bz2", ".xz", ".zst", ".lz4", ".7z", ".rar", ".tbz", ".tbz2", ".txz", ".tzst",
)  # fmt: skip


def check_export_dest(dest: Path) -> None:
    """Refuse an export destination that exists, has an archive suffix export does not write, or whose
    parent folder does not exist (as cp and tar do). Raises StoreError naming dest and the valid choices."""
    lower = dest.name.lower()
    if not lower.endswith(ARCHIVE_SUFFIXES) and lower.endswith(OTHER_ARCHIVE_SUFFIXES):
        suffix = next(s for s in OTHER_ARCHIVE_SUFFIXES if lower.endswith(s))
        raise StoreError(
            f"export: cannot write {dest}: {suffix} is not a format export writes; "
            f"use {' or '.join(ARCHIVE_SUFFIXES)} for a gzipped tar, or a path without an archive suffix for a folder"
        )
    if os.path.lexists(dest):
        raise StoreError(f"export: {dest} already exists; choose a new path")
    if not dest.parent.is_dir():
        raise StoreError(f"export: cannot write {dest}: the folder {dest.parent} does not exist; create it first")


def write_export(folder: Path, dest: Path, label: str) -> Path:
    """Copy folder to dest: a folder, or a gzipped tar with top folder label if dest ends in .tar.gz / .tgz.

    Written under a temporary name beside dest, fsynced, then renamed: dest appears whole or not
    at all. Returns dest. Raises StoreError for a dest check_export_dest refuses, or one that
    cannot be written (naming dest and the system's reason).
    """
    check_export_dest(dest)
    tmp = dest.parent / f".export-{uuid.uuid4().hex[:12]}"
    try:
        _write_to(folder, dest, tmp, label)
    except OSError as err:  # the temporary name means nothing to the user: name dest
        raise StoreError(f"export: cannot write {dest}: {err.strerror or err}") from None
    return dest


def _write_to(folder: Path, dest: Path, tmp: Path, label: str) -> None:
    """write_export's body: write tmp, fsync it, rename it to dest; tmp is removed whatever happens."""
    try:
        if dest.name.lower().endswith(ARCHIVE_SUFFIXES):
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


class _BoundedReader(io.RawIOBase):
    """A read-only view of a (decompressing) stream that refuses to go past `limit` bytes, so that
    neither a gzip bomb nor a header that claims gigabytes (a GNU long name, a pax header) is read
    into memory or decompressed beyond the archive limits."""

    def __init__(self, raw, limit: int, archive: Path):
        self._raw, self._limit, self._archive = raw, limit, archive

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._raw.tell()

    def _refuse(self) -> StoreError:
        return StoreError(
            f"import: {self._archive} expands to more than {self._limit} bytes (limit: "
            f"{MAX_TOTAL_BYTES} bytes of files plus headers); refusing it"
        )

    def read(self, size: int = -1) -> bytes:
        room = self._limit - self._raw.tell()
        if room < 0:
            raise self._refuse()
        data = self._raw.read(room + 1 if size is None or size < 0 or size > room else size)
        if self._raw.tell() > self._limit:
            raise self._refuse()
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._raw.tell() + offset if whence == io.SEEK_CUR else None
        if target is None or target > self._limit:
            raise self._refuse()  # tarfile seeks forward over member data: that is decompressing it too
        return self._raw.seek(target)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_decompressed(archive: Path):
    """The archive's bytes, decompressed by its magic number (gzip, bzip2, xz or none), as a seekable stream."""
    with open(archive, "rb") as fh:
        magic = fh.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(archive, "rb")
    if magic[:3] == b"BZh":
        return bz2.open(archive, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(archive, "rb")
    return open(archive, "rb")


def _member_path(member: tarfile.TarInfo, archive: Path) -> PurePosixPath | None:
    """The member's normalised relative path (None for the archive's top '.'); StoreError when it is unsafe."""
    name = member.name
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise StoreError(f"import: {archive} holds a member name with control characters {name[:80]!r}; refusing it")
    if name.startswith("/") or not safe_relative(name.rstrip("/") or "."):
        raise StoreError(f"import: {archive} holds an unsafe path {name[:200]!r} (absolute or with '..'); refusing it")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES or any(
        len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts
    ):
        raise StoreError(f"import: {archive} holds a member path longer than the file system allows; refusing it")
    return PurePosixPath(*parts) if parts else None


def _check_kind(member: tarfile.TarInfo, archive: Path) -> None:
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
        kind = {
            tarfile.SYMTYPE: "a symbolic link",
            tarfile.LNKTYPE: "a hard link",
            tarfile.CHRTYPE: "a character device",
            tarfile.BLKTYPE: "a block device",
            tarfile.FIFOTYPE: "a FIFO",
            tarfile.GNUTYPE_SPARSE: "a sparse file",
        }.get(member.type, f"a member of type {member.type!r}")
        raise StoreError(
            f"import: {archive} holds {member.name[:200]!r}, {kind}; archives may hold plain files and folders only"
        )


def scan_members(tar: tarfile.TarFile, archive: Path) -> list[tuple[tarfile.TarInfo, PurePosixPath]]:
    """Every member of an open archive with its normalised path, checked from the headers alone:
    safe paths, plain files and folders only, no duplicates, at most MAX_MEMBERS members, each file
    at most MAX_MEMBER_BYTES and all together at most MAX_TOTAL_BYTES. Raises StoreError otherwise.

    Members are read one header at a time and checked before the next is read, so an archive that
    breaks a limit is refused before the data past that limit is decompressed.
    """
    members: list[tuple[tarfile.TarInfo, PurePosixPath]] = []
    files: set[PurePosixPath] = set()
    dirs: set[PurePosixPath] = set()
    total = 0
    while (member := tar.next()) is not None:
        if len(members) >= MAX_MEMBERS:
            raise StoreError(f"import: {archive} holds more than {MAX_MEMBERS} members; refusing it")
        _check_kind(member, archive)
        path = _member_path(member, archive)
        if path is None:
            continue
        if path in files:
            raise StoreError(f"import: {archive} holds {str(path)!r} twice; refusing it")
        if (member.isfile() and path in dirs) or any(parent in files for parent in path.parents):
            raise StoreError(f"import: {archive} holds {str(path)!r} both as a file and as a folder; refusing it")
        dirs.update(path.parents)
        if member.isfile():
            if member.size > MAX_MEMBER_BYTES:
                raise StoreError(
                    f"import: {archive}: member {str(path)!r} is {member.size} bytes, over the limit of "
                    f"{MAX_MEMBER_BYTES} bytes per file; refusing it"
                )
            total += member.size
            if total > MAX_TOTAL_BYTES:
                raise StoreError(
                    f"import: {archive} holds more than {MAX_TOTAL_BYTES} bytes of files in all; refusing it"
                )
            files.add(path)
        else:
            dirs.add(path)
        members.append((member, path))
    return members


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive (uncompressed, gzip, bzip2 or xz) into the empty folder dest.

    Everything is checked from the headers (scan_members) before the first byte is written:
    unsafe paths, links and special files, duplicates, member count and sizes, and free space
    at dest. While extracting, bytes are counted again, so a member that yields more than its
    header said is refused too. Raises StoreError for any of these and for an unreadable,
    truncated or corrupt archive; dest may then hold a partial extraction (the caller discards it).
    """
    try:
        raw = _open_decompressed(archive)
    except OSError as err:
        raise StoreError(f"import: {archive}: cannot read it ({err.strerror or err})") from None
    bounded = _BoundedReader(raw, MAX_TOTAL_BYTES + (MAX_MEMBERS + 2) * HEADER_ALLOWANCE, archive)
    try:
        with tarfile.open(fileobj=bounded, mode="r:") as tar:
            members = scan_members(tar, archive)
            _check_space(dest, sum(m.size for m, _ in members if m.isfile()), archive)
            _extract_members(tar, members, dest)
            _read_to_end(bounded, archive)
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StoreError(
            f"import: {archive} is not a readable tar archive, or is truncated or corrupt ({reason})"
        ) from None
    finally:
        bounded.close()


def _read_to_end(stream, archive: Path) -> None:
    """Decompress what follows the tar's end-of-archive blocks, so that gzip (bz2, xz) checks its trailer:
    tarfile stops reading at the end-of-archive marker, and a stream cut after it, or whose CRC or length
    does not match, would otherwise pass. stream is bounded, so trailing padding cannot be a bomb."""
    try:
        while stream.read(1 << 20):
            pass
    except (EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StoreError(
            f"import: {archive} is truncated or corrupt: its compressed stream fails its end check ({reason}); "
            "refusing it"
        ) from None


def _check_space(dest: Path, needed: int, archive: Path) -> None:
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise StoreError(f"import: {archive} needs {needed} bytes but {dest} has {free} free; refusing it")


def _extract_members(tar: tarfile.TarFile, members: list, dest: Path) -> None:
    """Write the scanned members under dest, counting bytes against each header's size."""
    for member, rel in members:
        target = dest.joinpath(*rel.parts)
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with tar.extractfile(member) as fin, open(target, "xb") as fout:
            while chunk := fin.read(1 << 20):
                written += len(chunk)
                if written > member.size:
                    raise StoreError(f"import: {rel} yields more bytes than its header's {member.size}; refusing it")
                fout.write(chunk)
        if written != member.size:
            raise StoreError(f"import: {rel} is truncated ({written} of {member.size} bytes)")


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
