"""manifest.json: building, atomic writing with checksums, reading, verifying."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from adapters.errors import ConfigError, StoreError
from adapters.store.manifest import (
    FORMAT,
    MANIFEST,
    MANIFEST_KEYS,
    build_manifest,
    data_entry,
    file_checksums,
    read_manifest,
    verify_folder,
    write_json_atomic,
    write_manifest,
)

BASE = {"name": "tiny", "fingerprint": "sha256:" + "1" * 64}


def test_build_manifest_fills_the_contract():
    from pydantic import BaseModel

    class Train(BaseModel):
        lr: float = 1e-3

    m = build_manifest(
        task="causal-lm", method="lora", base_model=BASE, training=Train(), metrics={"acc": 0.5}, labels=("a", "b")
    )
    assert set(MANIFEST_KEYS) - {"reference"} <= set(m)
    assert m["format"] == FORMAT
    assert m["method"] == {"name": "lora", "options": {}}
    assert m["base_model"]["fingerprint"] == BASE["fingerprint"] and m["base_model"]["revision"] is None
    assert m["training"] == {"lr": 1e-3}
    assert m["labels"] == ["a", "b"]
    assert m["data"]["num_train"] is None and m["prompt"]["system_prompt"] is None
    assert m["created_at"].endswith("+00:00")
    for lib in ("adapterkit", "python", "torch", "transformers", "peft"):
        assert m["versions"][lib], lib
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[2], capture_output=True, text=True)
    assert m["code_revision"] == (head.stdout.strip() if head.returncode == 0 else None)
    json.dumps(m)  # JSON-ready


def test_build_manifest_rejects_bad_fields():
    with pytest.raises(ConfigError, match="unknown field.*colour.*valid fields"):
        build_manifest(task="causal-lm", method="lora", base_model=BASE, colour="red")
    with pytest.raises(ConfigError, match="task 'translation' is not one of causal-lm, sequence-classification"):
        build_manifest(task="translation", method="lora", base_model=BASE)
    with pytest.raises(ConfigError, match="missing required field.*base_model"):
        build_manifest(task="causal-lm", method="lora")
    with pytest.raises(ConfigError, match="cannot be stored as JSON"):
        build_manifest(task="causal-lm", method="lora", base_model=BASE, metrics={"loss": float("nan")})


def test_write_manifest_checksums_every_other_file(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.safetensors").write_bytes(b"weights")
    written = write_manifest(tmp_path, build_manifest(task="causal-lm", method="lora", base_model=BASE))
    assert set(written["files"]) == {"a.json", "sub/b.safetensors"}
    assert written["files"] == file_checksums(tmp_path)
    assert read_manifest(tmp_path) == written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    assert verify_folder(tmp_path) == []


def test_verify_folder_reports_changed_missing_and_unlisted_files(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "w.safetensors").write_bytes(b"weights")
    write_manifest(tmp_path, build_manifest(task="causal-lm", method="lora", base_model=BASE))
    (tmp_path / "w.safetensors").write_bytes(b"weightz")
    (tmp_path / "a.json").unlink()
    (tmp_path / "extra.txt").write_text("x")
    problems = verify_folder(tmp_path)
    assert any(p.startswith("w.safetensors: checksum mismatch") for p in problems), problems
    assert "a.json: missing" in problems
    assert "extra.txt: not listed in the manifest" in problems


def test_verify_folder_refuses_unsafe_paths_in_the_manifest(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"weights")
    m = write_manifest(tmp_path, build_manifest(task="causal-lm", method="lora", base_model=BASE))
    m["files"]["../outside"] = "0" * 64
    write_json_atomic(tmp_path / MANIFEST, m)
    assert "manifest lists an unsafe path '../outside'" in verify_folder(tmp_path)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(StoreError, match="has no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match="unreadable manifest"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(StoreError, match="format 'other/9' is not 'adapterkit.manifest/1'"):
        read_manifest(tmp_path)
    assert verify_folder(tmp_path) and "format" in verify_folder(tmp_path)[0]


def test_file_checksums_refuse_links(tmp_path):
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(StoreError, match="link is a link"):
        file_checksums(tmp_path)


def test_data_entry_counts_rows_and_fingerprints_every_split():
    train = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    test = [{"text": "c", "label": 0}]
    entry = data_entry("trec", train, test=test)
    assert entry["source"] == "trec"
    assert (entry["num_train"], entry["num_validation"], entry["num_test"]) == (2, None, 1)
    assert entry["fingerprint"].startswith("sha256:")
    assert data_entry("trec", train, test=test)["fingerprint"] == entry["fingerprint"]
    assert data_entry("trec", train, test=[{"text": "d", "label": 0}])["fingerprint"] != entry["fingerprint"]
    assert data_entry("trec", train, validation=test)["fingerprint"] != entry["fingerprint"]  # which split matters
    m = build_manifest(task="sequence-classification", method="lora", base_model=BASE, data=entry)
    assert m["data"] == entry
