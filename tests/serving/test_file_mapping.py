"""FileMapping: re-pointing a private mapping at another file changes what every view reads, never the files."""

from __future__ import annotations

import os

import pytest
import torch

from adapters.serving import file_mapping

pytestmark = pytest.mark.skipif(not file_mapping.supported(), reason="MAP_FIXED remapping is Linux/macOS only")

SIZE = 3 * 4096 + 100  # not a whole number of pages


def _file(path, seed):
    data = torch.randint(0, 256, (SIZE,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    path.write_bytes(data.numpy().tobytes())
    return data


def test_remap_changes_what_existing_views_read(tmp_path):
    a, b = _file(tmp_path / "a", 1), _file(tmp_path / "b", 2)
    mapping = file_mapping.FileMapping(tmp_path / "a", SIZE)
    view = mapping.tensor[100:].view(-1)  # like a weight view into the slot buffer
    address = view.data_ptr()
    assert torch.equal(mapping.tensor, a)
    with open(tmp_path / "b", "rb") as fh:
        mapping.remap(fh.fileno(), tmp_path / "b")
    assert view.data_ptr() == address and torch.equal(view, b[100:]) and torch.equal(mapping.tensor, b)


def test_writes_stay_private_and_a_short_file_is_refused(tmp_path):
    a = _file(tmp_path / "a", 1)
    mapping = file_mapping.FileMapping(tmp_path / "a", SIZE)
    mapping.tensor[:10] = 0
    assert (tmp_path / "a").read_bytes() == a.numpy().tobytes()  # the file is untouched
    (tmp_path / "short").write_bytes(b"x" * (SIZE - 1))
    fd = os.open(tmp_path / "short", os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="needs"):
            mapping.remap(fd, tmp_path / "short")
    finally:
        os.close(fd)
    assert torch.equal(mapping.tensor[10:], a[10:])  # the old mapping is intact
    with pytest.raises(OSError, match="needs"):
        file_mapping.FileMapping(tmp_path / "short", SIZE)
