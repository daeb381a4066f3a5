"""The hostile-archive corpus (archives/cases.yaml): `adapterkit store import` refuses every case with exit
status 2 and one `error:` line, without a traceback; nothing is written to the store (byte-identical, no
staging left behind) nor outside it; and afterwards the store still lists and loads good, and a good export
still imports."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import tarfile
import tempfile
from pathlib import Path

import pytest

import adapters.store.archive as archive_module
from adapters.store.manifest import MANIFEST, MANIFEST_DIGEST
from tests.bad_inputs.cli_cases import assert_refused, load_cases
from tests.bad_inputs.store_cases import (
    assert_still_works,
    build_store,
    copy_store,
    run_store_cli,
    run_store_subprocess,
    snapshot,
)

KIND = Path(__file__).parent / "archives"
CASES = load_cases(KIND)
TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "sparse": tarfile.GNUTYPE_SPARSE,
}
_TEMPLATE: list[Path] = []


@pytest.fixture()
def template(tmp_path_factory, make_adapter_folder) -> Path:
    """good@1, good@2, bad@1 (prod), bad@2: built once per module, copied per case."""
    if not _TEMPLATE:
        _TEMPLATE.append(build_store(tmp_path_factory.mktemp("template") / "store", make_adapter_folder).root)
    return _TEMPLATE[0]


def good_members(store, tmp_path: Path) -> dict[str, bytes]:
    """{member name: bytes} of a real export of good@1 (top folder good-1/, with its manifest digest)."""
    folder = store.export("good@1", Path(tempfile.mkdtemp(dir=tmp_path)) / "good-export")
    return {f"good-1/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in sorted(folder.rglob("*"))}


def _header(name: str, kind: int, size: int, linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode, info.mtime = kind, size, linkname, 0o644, 0
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def tar_bytes(spec: dict, good: dict[str, bytes]) -> bytes:
    """The uncompressed tar a case's `archive` spec describes, written header by header (so a header can lie)."""
    good = {k: v for k, v in good.items() if k not in spec.get("drop", [])}
    good.update({k: v.encode() for k, v in spec.get("replace", {}).items()})
    if "edit_manifest" in spec:
        manifest = json.loads(good[f"good-1/{MANIFEST}"])
        for dotted, value in spec["edit_manifest"].items():
            *parents, last = dotted.split(".")
            target = manifest
            for key in parents:
                target = target[key]
            target[last] = value
        good[f"good-1/{MANIFEST}"] = (json.dumps(manifest, indent=2) + "\n").encode()
        if spec.get("fix_digest"):
            digest = hashlib.sha256(good[f"good-1/{MANIFEST}"]).hexdigest()
            good[f"good-1/{MANIFEST_DIGEST}"] = f"{digest}  {MANIFEST}\n".encode()
    out = bytearray()
    if "longname_claim" in spec:
        out += _header("././@LongLink", tarfile.GNUTYPE_LONGNAME, spec["longname_claim"])
        out += _padded(b"a" * 100 + b"\0" * (spec["longname_claim"] - 100))
    for item in spec.get("members", []):
        if item == "good":
            for name, data in good.items():
                out += _header(name, tarfile.REGTYPE, len(data)) + _padded(data)
            continue
        kind = TYPES[item.get("type", "file")]
        data = b"\0" * item["zeros"] if "zeros" in item else item.get("data", "").encode()
        if kind not in (tarfile.REGTYPE, tarfile.GNUTYPE_SPARSE):
            data = b""
        out += _header(item["name"], kind, item.get("size", len(data)), item.get("linkname", ""))
        out += _padded(data)
    for i in range(spec.get("many", 0)):
        out += _header(f"good-1/many/{i}", tarfile.REGTYPE, 0)
    return bytes(out + b"\0" * (2 * tarfile.BLOCKSIZE))


def build_archive(spec: dict, good: dict[str, bytes], path: Path) -> Path:
    """Write a case's archive to path: tar (or raw text), compressed, then truncated or altered as the spec says."""
    data = spec["raw"].encode() if "raw" in spec else tar_bytes(spec, good)
    compress = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress, "none": lambda b: b}
    data = compress[spec.get("compress", "gz")](data)
    if "cut_bytes" in spec:
        data = data[: spec["cut_bytes"]]
    if "cut_fraction" in spec:
        data = data[: int(len(data) * spec["cut_fraction"])]
    if "cut_tail" in spec:
        data = data[: -spec["cut_tail"]]
    if "flip_byte" in spec:  # one byte of the compressed file inverted (e.g. -8: the gzip CRC-32)
        data = bytearray(data)
        data[spec["flip_byte"]] ^= 0xFF
        data = bytes(data)
    path.write_bytes(data)
    return path


def test_the_corpus_is_large_enough_and_covers_the_issue():
    ids = {case["id"] for case in CASES}
    assert len(CASES) >= 30
    assert {"not-an-archive", "truncated-gzip", "member-parent-traversal", "member-absolute-path"} <= ids
    assert {"member-symlink", "member-hardlink", "member-char-device", "too-many-members"} <= ids
    assert {"member-claims-20-gib", "total-over-limit-three-files", "long-name-record-bomb", "duplicate-member"} <= ids
    assert {"missing-manifest", "weights-do-not-match-manifest", "manifest-edited-after-export"} <= ids


def test_the_builder_makes_an_archive_that_imports(template, tmp_path, capsys, make_adapter_folder):
    """The cases are the good archive plus one fault each: the good archive itself imports, and its
    import equals the export (so a refusal is the fault's doing, not the builder's)."""
    store = copy_store(template, tmp_path / "store")
    path = build_archive({"members": ["good"]}, good_members(store, tmp_path), tmp_path / "good.tar.gz")
    outcome = run_store_cli(["--store", str(store.root), "import", str(path), "--name", "imported"], capsys)
    assert outcome.status == 0, outcome
    assert store.verify("imported@1") == {"imported@1": []}
    assert store.resolve("imported")[1]["files"] == store.resolve("good@1")[1]["files"]


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_archive_is_refused_with_one_line(case, template, tmp_path, make_adapter_folder, capsys, monkeypatch):
    monkeypatch.delenv("ADAPTERKIT_DEBUG", raising=False)
    for name, value in case.get("limits", {}).items():
        assert hasattr(archive_module, name), name
        monkeypatch.setattr(archive_module, name, value)
    store = copy_store(template, tmp_path / "store")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    if "file" in case:
        path = incoming / case["file"]
        path.write_bytes((KIND / case["file"]).read_bytes())
    elif case.get("missing"):
        path = incoming / "missing.tar.gz"
    else:
        path = build_archive(case["archive"], good_members(store, tmp_path), incoming / f"{case['id']}.tar.gz")
    argv = ["--store", str(store.root), "import", str(path), *case.get("args", [])]
    before, outside = snapshot(store.root), snapshot(tmp_path)

    assert_refused(run_store_cli(argv, capsys), case["expect"], case["id"])
    if case.get("subprocess"):
        assert_refused(run_store_subprocess(argv, tmp_path), case["expect"], case["id"])
    assert snapshot(store.root) == before, "a refused import changed the store"
    assert snapshot(tmp_path) == outside, "a refused import wrote outside the store"
    assert not Path("/tmp/adapterkit-escaped.txt").exists()
    monkeypatch.undo()  # the real limits again: the store must still take a good archive
    assert_still_works(store, capsys, make_adapter_folder)
    good = build_archive({"members": ["good"]}, good_members(store, tmp_path), tmp_path / "good.tar.gz")
    assert run_store_cli(["--store", str(store.root), "import", str(good)], capsys).status == 0
    assert store.versions("good") == [1, 2, 3, 4]
