"""A copy-on-write file mapping that can be re-pointed, in place, at another file of the same layout.

The inference engine keeps an evicted adapter's layers and fills them with the next adapter of
the same shape. When a slot's weights are one buffer laid out like its adapter file, switching
that buffer to another adapter's file is one ``mmap(MAP_FIXED)`` over the same addresses: every
tensor viewing the buffer now reads the new file's pages straight from the page cache, without
copying ~10 MB (a LoRA r=8 on every SmolLM2 projection). The pages fault in on first use.

Only for files that never change in place: published store versions (read-only files, replaced
only by new versions). A write into the mapping stays private to this process (MAP_PRIVATE);
the file is never modified. Linux and macOS; elsewhere ``supported()`` is False and callers copy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys

import torch

_PROT = getattr(mmap, "PROT_READ", 0) | getattr(mmap, "PROT_WRITE", 0)
_MAP_FIXED = {"linux": 0x10, "darwin": 0x10}.get(sys.platform)


def _libc():
    if _MAP_FIXED is None:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def supported() -> bool:
    """Whether FileMapping works here (Linux or macOS with a libc exposing mmap); else callers copy."""
    return _LIBC is not None


class FileMapping:
    """The first ``length`` bytes of a file, mapped private and writable; ``tensor`` views them as uint8."""

    def __init__(self, path: str | os.PathLike, length: int):
        if not supported():
            raise OSError("file remapping needs mmap with MAP_FIXED (Linux or macOS)")
        self.length = int(length)
        with open(path, "rb") as fh:
            _check_size(fh.fileno(), self.length, path)
            # Python's mmap owns the address range and unmaps it when the last view is gone.
            self._mmap = mmap.mmap(fh.fileno(), self.length, flags=mmap.MAP_PRIVATE, prot=_PROT)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)

    def remap(self, fd: int, path: str | os.PathLike = "file") -> None:
        """Map another open file over the same addresses (same length); views see its bytes."""
        _check_size(fd, self.length, path)
        got = _LIBC.mmap(self.address, self.length, _PROT, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
        if got != self.address:
            err = ctypes.get_errno()
            # A failed MAP_FIXED may have unmapped the range already: put zero pages there so no
            # view can fault on a hole. The caller must drop this buffer (its contents are gone).
            _LIBC.mmap(self.address, self.length, _PROT, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
            raise OSError(err, f"mmap of {path} over the slot buffer failed: {os.strerror(err)}")


def _check_size(fd: int, length: int, path) -> None:
    # Reading a mapped page past the end of a file raises SIGBUS: refuse a short file up front.
    size = os.fstat(fd).st_size
    if size < length:
        raise OSError(f"{path}: {size} bytes, the slot's layout needs {length}")
