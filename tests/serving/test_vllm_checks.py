"""What adapterkit checks before vLLM may load an adapter, and the server command it builds (no vLLM needed).

The same checks run inside vLLM in the resolver plugin (tests/serving/test_vllm.py runs a real server).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from adapters.cli.serve import main as serve_main
from adapters.errors import BaseMismatchError, ConfigError, StoreError
from adapters.serving.vllm_runtime import (
    PLUGIN_NAME,
    adapter_rank,
    lora_config,
    max_lora_rank,
    server_command,
    server_env,
    verified_lora,
)
from adapters.store.store import AdapterStore
from tests.helpers.serving import make_adapter


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_llama_dir, tiny_llama64_dir):
    """A store with lora@1 (tag prod), ia3@1, dora@1, other-base@1 (a LoRA of the 64-wide tiny Llama)."""
    tmp = tmp_path_factory.mktemp("vllm-checks")
    store = AdapterStore(tmp / "store")
    store.publish(make_adapter(tiny_llama_dir, tmp / "lora"), "lora", tags=["prod"])
    store.publish(make_adapter(tiny_llama_dir, tmp / "ia3", method="ia3"), "ia3")
    store.publish(make_adapter(tiny_llama_dir, tmp / "dora", method="dora"), "dora")
    store.publish(make_adapter(tiny_llama64_dir, tmp / "other"), "other-base")
    return store


def test_a_lora_on_its_base_passes(published, tiny_llama_dir):
    folder, manifest = verified_lora(published, "lora@prod", tiny_llama_dir)
    assert folder == published.root / "lora" / "1" and manifest["version"] == 1


def test_refusals_name_the_reason(published, tiny_llama_dir):
    with pytest.raises(StoreError, match="no adapter named 'missing'"):
        verified_lora(published, "missing", tiny_llama_dir)
    with pytest.raises(ConfigError, match="IA3 adapter: vLLM serves LoRA adapters only"):
        verified_lora(published, "ia3", tiny_llama_dir)
    with pytest.raises(ConfigError, match="DoRA adapter"):
        verified_lora(published, "dora", tiny_llama_dir)
    with pytest.raises(BaseMismatchError, match="was trained on base"):
        verified_lora(published, "other-base", tiny_llama_dir)


def test_a_tampered_version_is_refused(tmp_path, tiny_llama_dir):
    store = AdapterStore(tmp_path / "store")
    weights = store.publish(make_adapter(tiny_llama_dir, tmp_path / "a"), "a").path / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum mismatch"):
        verified_lora(store, "a", tiny_llama_dir)


def test_ranks_round_up_to_what_vllm_accepts(tmp_path):
    assert [max_lora_rank([r]) for r in (1, 4, 8, 9, 16, 300, 512)] == [8, 8, 8, 16, 16, 320, 512]
    with pytest.raises(ConfigError, match="above vLLM's largest"):
        max_lora_rank([1024])
    assert adapter_rank({"r": 4, "rank_pattern": {"q_proj": 12}}) == 12
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    assert lora_config(tmp_path)["r"] == 4


def test_server_command_and_environment(tmp_path, monkeypatch):
    python = tmp_path / "python"
    python.touch()
    monkeypatch.setenv("ADAPTERKIT_VLLM_PYTHON", str(python))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    argv = server_command("/models/base", port=9, lora_modules={"a@1": "/s/a/1"}, api_key="k", extra_args=["--x"])
    assert argv[:3] == [str(python), "-m", "vllm.entrypoints.openai.api_server"]
    assert " --dtype float32 " in " ".join(argv) and "--enable-lora" in argv
    assert " --dtype bfloat16 " in " ".join(server_command("/models/base", dtype="bfloat16"))  # serve --dtype
    assert argv[argv.index("--lora-modules") + 1] == "a@1=/s/a/1" and argv[-3:] == ["--api-key", "k", "--x"]
    env = server_env(tmp_path / "store")
    assert env["VLLM_PLUGINS"] == PLUGIN_NAME and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["ADAPTERKIT_STORE"] == str((tmp_path / "store").resolve())


def test_serve_refuses_what_vllm_does_not_have(capsys):
    assert serve_main(["--engine", "vllm", "--base", "x", "--traffic-log", "t.jsonl", "--quantization", "4"]) == 2
    assert "drop --quantization, --traffic-log" in capsys.readouterr().err


def test_serve_refuses_an_unknown_dtype(capsys):
    with pytest.raises(SystemExit) as exit_:
        serve_main(["--base", "x", "--dtype", "float8"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype: invalid choice: 'float8'" in err and "bfloat16" in err and "Traceback" not in err


@pytest.mark.parametrize("size", ["-1", "nan", "inf", "lots"])
def test_serve_refuses_a_bad_prefix_cache_size(size, capsys):
    with pytest.raises(SystemExit) as exit_:
        serve_main(["--base", "x", "--prefix-cache-mib", size])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--prefix-cache-mib: invalid size in MiB (a number >= 0) value: '{size}'" in err and "Traceback" not in err


def test_serve_refuses_a_preload_before_starting_vllm(published, tiny_llama_dir, capsys):
    args = ["--engine", "vllm", "--base", str(tiny_llama_dir), "--store", str(published.root), "--preload", "ia3"]
    assert serve_main(args) == 2
    assert "cannot preload 'ia3' on vLLM" in capsys.readouterr().err


def test_serve_refuses_a_vllm_python_without_vllm(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADAPTERKIT_VLLM_PYTHON", sys.executable)  # the test Python: adapterkit, no vllm
    assert serve_main(["--engine", "vllm", "--base", str(tiny_llama_dir), "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{sys.executable} has no vllm" in err and "make runtimes" in err and "Traceback" not in err
