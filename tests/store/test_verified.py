"""Verified-folder stamps: a version verified once is not hashed again, and any change to a file is."""

from __future__ import annotations

import os

import pytest

import adapters.store.verified as verified
from adapters.store.store import AdapterStore


@pytest.fixture()
def hash_calls(monkeypatch, tmp_path):
    """Count real hashing passes; stamps go to a private cache, trusted as soon as they are written."""
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "RACY_SECONDS", 0.0)
    calls = []
    real = verified.verify_folder

    def counting(folder):
        calls.append(str(folder))
        return real(folder)

    monkeypatch.setattr(verified, "verify_folder", counting)
    return calls


def test_a_verified_folder_is_not_hashed_again(make_adapter_folder, hash_calls):
    folder = make_adapter_folder()
    assert verified.verify_folder_cached(folder) == []
    assert verified.verify_folder_cached(folder) == []
    assert len(hash_calls) == 1
    assert verified.verify_folder_cached(folder, recheck=True) == []  # an explicit verify always hashes
    assert len(hash_calls) == 2


def test_a_rewritten_file_is_hashed_again_even_with_its_old_mtime(make_adapter_folder, hash_calls):
    folder = make_adapter_folder()
    assert verified.verify_folder_cached(folder) == []
    weights = folder / "adapter_model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # same size, one weight becomes +inf
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # ctime still moves
    problems = verified.verify_folder_cached(folder)
    assert any("checksum mismatch" in p for p in problems), problems
    assert verified.verify_folder_cached(folder)  # a failure is never recorded
    assert len(hash_calls) == 3


def test_an_added_file_is_hashed_again(make_adapter_folder, hash_calls):
    folder = make_adapter_folder()
    assert verified.verify_folder_cached(folder) == []
    (folder / "extra.bin").write_bytes(b"x")
    assert any("not listed" in p for p in verified.verify_folder_cached(folder))


def test_files_written_just_now_are_not_trusted_yet(make_adapter_folder, hash_calls, monkeypatch):
    monkeypatch.setattr(verified, "RACY_SECONDS", 60.0)  # timestamps tick coarsely: fresh files may still change
    folder = make_adapter_folder()
    assert verified.verify_folder_cached(folder) == []
    assert verified.verify_folder_cached(folder) == []
    assert len(hash_calls) == 2
    assert not verified.is_verified(folder)


def test_a_broken_record_means_hashing_again(make_adapter_folder, hash_calls):
    folder = make_adapter_folder()
    assert verified.verify_folder_cached(folder) == []
    verified._entry(os.path.realpath(folder)).write_text("{not json")
    assert verified.verify_folder_cached(folder) == []
    assert len(hash_calls) == 2
    assert verified.is_verified(folder)  # rewritten by the second pass


def test_store_loads_skip_hashing_but_store_verify_does_not(make_adapter_folder, hash_calls, store_root):
    store = AdapterStore(store_root)
    ref = store.publish(make_adapter_folder(), "demo")
    assert store.verify("demo@1") == {str(ref): []}
    assert len(hash_calls) == 1
    for _ in range(3):  # what a new process resolving the version does
        AdapterStore(store_root).resolve("demo@1")
    assert len(hash_calls) == 1
    store.verify()
    assert len(hash_calls) == 2


def test_gc_forgets_records_of_removed_versions(make_adapter_folder, hash_calls, store_root):
    store = AdapterStore(store_root)
    store.publish(make_adapter_folder(), "demo")
    store.publish(make_adapter_folder(), "demo")
    store.verify()
    records = sorted((verified.cache_dir() / "verified").glob("*.json"))
    assert len(records) == 2
    assert store.gc(keep=1) == ["demo/1"]
    assert len(list((verified.cache_dir() / "verified").glob("*.json"))) == 1
    assert verified.is_verified(store_root / "demo" / "2")
