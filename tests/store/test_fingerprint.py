"""Fingerprints of base models (cached), tokenizers and data sets."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import adapters.store.fingerprint as fp
from adapters.errors import StoreError


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(cache))
    return cache


def _model_folder(tmp_path, weights=b"w" * 1000):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "README.md").write_text("not part of the weights")
    return folder


def test_model_fingerprint_covers_config_and_weights_only(tmp_path, isolated_cache):
    folder = _model_folder(tmp_path)
    first = fp.fingerprint_model(folder)
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    (folder / "README.md").write_text("edited docs do not change the model")
    assert fp.fingerprint_model(folder) == first
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert fp.fingerprint_model(copy) == first  # content, not location
    (copy / "model.safetensors").write_bytes(b"v" * 1000)  # same size, other weights
    os.utime(copy / "model.safetensors", ns=(1, 1))
    assert fp.fingerprint_model(copy) != first
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert fp.fingerprint_model(folder) != first


def test_model_fingerprint_is_cached_by_size_and_mtime(tmp_path, isolated_cache, monkeypatch):
    folder = _model_folder(tmp_path)
    first = fp.fingerprint_model(folder)
    assert len(list((isolated_cache / "fingerprints").glob("*.json"))) == 1

    hashed = []
    real = fp.sha256_file
    monkeypatch.setattr(fp, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert fp.fingerprint_model(folder) == first
    assert hashed == []  # served from the cache, nothing re-read

    (folder / "model.safetensors").write_bytes(b"x" * 999)  # new size -> new key -> re-hashed
    second = fp.fingerprint_model(folder)
    assert second != first and len(hashed) == 2


def test_model_fingerprint_errors(tmp_path, isolated_cache):
    with pytest.raises(StoreError, match="not a local folder"):
        fp.fingerprint_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(StoreError, match="no weight files"):
        fp.fingerprint_model(tmp_path)


def test_real_model_fingerprint_is_fast_after_the_first(tiny_llama_dir):
    import time

    first = fp.fingerprint_model(tiny_llama_dir)
    start = time.perf_counter()
    assert fp.fingerprint_model(tiny_llama_dir) == first
    assert time.perf_counter() - start < 0.5


def test_tokenizer_fingerprint_same_for_object_and_folder(tiny_llama_dir, smollm2_dir, tiny_bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    by_object = fp.fingerprint_tokenizer(tok)
    assert fp.fingerprint_tokenizer(tiny_llama_dir) == by_object
    assert fp.fingerprint_tokenizer(smollm2_dir) == by_object  # the tiny model saved SmolLM2's tokenizer
    assert fp.fingerprint_tokenizer(tiny_bert_dir) != by_object

    tok.chat_template = "{{ messages }}"
    assert fp.fingerprint_tokenizer(tok) != by_object  # prompts would be formatted differently
    with pytest.raises(StoreError, match="no tokenizer files"):
        fp.fingerprint_tokenizer(tiny_llama_dir.parent)


def test_dataset_fingerprint_is_content_based():
    from datasets import Dataset

    rows = [{"text": "hello", "label": 0}, {"text": "world", "label": 1}]
    ds = Dataset.from_list(rows)
    assert fp.fingerprint_dataset(ds) == fp.fingerprint_dataset(rows)
    assert fp.fingerprint_dataset(ds.map(lambda r: r)) == fp.fingerprint_dataset(
        ds
    )  # _fingerprint changes, content not
    assert fp.fingerprint_dataset(rows[::-1]) != fp.fingerprint_dataset(rows)
    assert fp.fingerprint_dataset([{"text": "hello", "label": 1}, rows[1]]) != fp.fingerprint_dataset(rows)
    assert fp.fingerprint_dataset(rows[:1]) != fp.fingerprint_dataset(rows)
    assert fp.fingerprint_dataset([{"label": 0, "text": "hello"}, rows[1]]) == fp.fingerprint_dataset(rows)  # key order
    assert fp.fingerprint_dataset([]) != fp.fingerprint_dataset(rows)
    with pytest.raises(StoreError, match="rows must be dicts"):
        fp.fingerprint_dataset(["just text"])


def test_converted_gguf_folder_keeps_accepting_adapters_published_on_its_content_fingerprint(tmp_path, isolated_cache):
    # Before GGUF backbones were fingerprinted by their file, the built-in SmolLM2's adapters recorded
    # the converted folder's content fingerprint; the conversion is byte-identical, so they must still load.
    from adapters.errors import BaseMismatchError
    from adapters.gguf_meta import CONVERTED_MARKER
    from adapters.store.loading import check_base

    folder = _model_folder(tmp_path)
    content = fp.fingerprint_model(folder)
    (folder / CONVERTED_MARKER).write_text(json.dumps({"sha256": "ab" * 32}))
    gguf = fp.fingerprint_model(folder)
    assert gguf == "sha256:" + "ab" * 32 != content
    assert fp.legacy_fingerprint(gguf) == content
    assert check_base({"base_model": {"fingerprint": content}}, gguf)
    assert check_base({"base_model": {"fingerprint": gguf}}, gguf)
    with pytest.raises(BaseMismatchError):
        check_base({"base_model": {"fingerprint": "sha256:" + "cd" * 32}}, gguf)
    assert fp.legacy_fingerprint("sha256:" + "ef" * 32) is None
