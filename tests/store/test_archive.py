"""Export and import: folder and archive round trips, hostile archives refused."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from adapters.errors import StoreError
from adapters.store.manifest import read_manifest
from adapters.store.store import AdapterStore


@pytest.mark.parametrize("dest_name", ["exported", "exported.tar.gz"])
def test_export_import_round_trip(dest_name, store_root, make_adapter_folder, tmp_path):
    store = AdapterStore(store_root)
    store.publish(make_adapter_folder(), "clf")
    store.publish(make_adapter_folder(metrics={"accuracy": 0.9}), "clf")
    dest = store.export("clf@2", tmp_path / dest_name)
    assert dest.exists()
    with pytest.raises(StoreError, match="already exists"):
        store.export("clf@2", dest)

    other = AdapterStore(tmp_path / "other-store")
    ref = other.import_(dest)
    assert str(ref) == "clf@1"  # versions are per store
    original = read_manifest(store_root / "clf" / "2")
    imported = read_manifest(ref.path)
    assert imported["files"] == original["files"]
    assert imported["metrics"] == {"accuracy": 0.9}
    assert {k: v for k, v in imported.items() if k != "version"} == {
        k: v for k, v in original.items() if k != "version"
    }
    assert other.verify() == {"clf@1": []}
    assert other.import_(dest, name="renamed", tags=("latest", "prod")).name == "renamed"
    assert other.tags("renamed") == {"latest": 1, "prod": 1}
    assert sorted(p.name for p in other.root.iterdir()) == ["clf", "renamed"]  # no import leftovers


def _archive_with(tmp_path, member: tarfile.TarInfo, payload: bytes = b"x") -> Path:
    archive = tmp_path / "hostile.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        manifest = json.dumps({"format": "adapterkit.manifest/1"}).encode()
        info = tarfile.TarInfo("pkg/manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        if member.isfile():
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
        else:
            tar.addfile(member)
    return archive


def _member(name, kind=tarfile.REGTYPE, target=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    "member,reason",
    [
        (_member("../escaped.txt"), "unsafe path"),
        (_member("/tmp/adapterkit-escaped.txt"), "unsafe path"),
        (_member("pkg/../../escaped.txt"), "unsafe path"),
        (_member("pkg/link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link; archives may hold plain files"),
        (_member("pkg/hard", tarfile.LNKTYPE, "/etc/passwd"), "hard link; archives may hold plain files"),
        (_member("pkg/fifo", tarfile.FIFOTYPE), "FIFO; archives may hold plain files"),
    ],
)
def test_import_refuses_hostile_archives(member, reason, store_root, tmp_path):
    archive = _archive_with(tmp_path, member)
    store = AdapterStore(store_root)
    with pytest.raises(StoreError, match=reason):
        store.import_(archive)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()
    assert not Path("/tmp/adapterkit-escaped.txt").exists()
    assert list(store_root.iterdir()) == []


def test_import_refuses_an_archive_whose_files_do_not_match_the_manifest(store_root, make_adapter_folder, tmp_path):
    store = AdapterStore(store_root)
    store.publish(make_adapter_folder(), "clf")
    dest = store.export("clf", tmp_path / "copy")
    (dest / "adapter_config.json").chmod(0o644)
    (dest / "adapter_config.json").write_text("{}")  # tampered in transit
    with pytest.raises(StoreError, match="does not match its manifest"):
        AdapterStore(tmp_path / "other").import_(dest)


@pytest.mark.parametrize("cut", [8, 20])
def test_import_refuses_a_real_export_missing_its_last_bytes(cut, store_root, make_adapter_folder, tmp_path):
    """tarfile stops at the end-of-archive blocks, before gzip's CRC and length; a real export cut there must
    be refused, while the whole export imports (so the refusal is the cut's doing)."""
    store = AdapterStore(store_root)
    store.publish(make_adapter_folder(), "clf")
    whole = store.export("clf@1", tmp_path / "whole.tar.gz")
    cut_path = tmp_path / "cut.tar.gz"
    cut_path.write_bytes(whole.read_bytes()[:-cut])
    other = AdapterStore(tmp_path / "other-store")
    with pytest.raises(StoreError, match=r"cut\.tar\.gz is (not a readable tar archive, or is )?truncated or corrupt"):
        other.import_(cut_path)
    assert other.names() == [] and list(other.root.iterdir()) == []
    assert str(other.import_(whole)) == "clf@1"


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ("x.zip", r"cannot write .*x\.zip: \.zip is not a format export writes; use \.tar\.gz or \.tgz"),
        ("x.tar.xz", r"\.xz is not a format export writes"),
        ("missing/dir/x.tar.gz", r"cannot write .*x\.tar\.gz: the folder .*missing/dir does not exist"),
    ],
)
def test_export_refuses_unwritten_formats_and_missing_folders(dest, message, store_root, make_adapter_folder, tmp_path):
    store = AdapterStore(store_root)
    store.publish(make_adapter_folder(), "clf")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StoreError, match=message):
        store.export("clf", out / dest)
    assert list(out.iterdir()) == [], "a refused export wrote something"
    assert store.export("clf", out / "X.TGZ").is_file()  # the suffix is matched whatever its case: an archive
    assert tarfile.is_tarfile(out / "X.TGZ")
