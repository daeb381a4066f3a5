"""GGUF export through llama.cpp's own converters, and parity of the GGUF files with adapterkit.

The LoRA GGUF is read back without llama.cpp: transformers loads the base GGUF and the LoRA tensors
are applied as llama.cpp applies them (adapters.serving.gguf.apply_gguf_lora). On the tiny Llama
(4 query heads, 2 key/value heads: the converter permutes q and k rows) that must equal peft's merge
weight for weight; on SmolLM2 `adapterkit parity --runtime gguf` must pass for an adapter trained by our loop.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.cli.export import main as export_main
from adapters.cli.parity import main as parity_main
from adapters.errors import ConfigError
from adapters.serving.gguf import (
    ADAPTER_GGUF,
    BASE_GGUF,
    GGUF_INFO,
    MODEL_GGUF,
    converters_dir,
    export_gguf,
    load_gguf_model,
    lora_gguf_problems,
)
from adapters.store.store import AdapterStore
from tests.helpers.runtimes import need_runtime, trained_smol_lora
from tests.helpers.serving import make_adapter

pytestmark = [pytest.mark.real_model, pytest.mark.runtime]


@pytest.fixture(scope="module")
def converters():
    need_runtime(converters_dir)


def _peft_merged(base_dir, adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def _max_weight_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def test_lora_gguf_applies_exactly_as_peft_merges(tmp_path, tiny_llama_dir, converters):
    store = AdapterStore(tmp_path / "store")
    src = make_adapter(tiny_llama_dir, tmp_path / "tiny-lora", std=0.2)
    store.publish(src, "tiny", tags=["prod"])

    out = export_gguf("tiny@prod", tmp_path / "gguf", store=store)
    info = json.loads((out / GGUF_INFO).read_text())
    assert info["kind"] == "lora" and info["adapter"] == "tiny@1"
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_GGUF, BASE_GGUF, GGUF_INFO])

    from_gguf = load_gguf_model(out / BASE_GGUF, out / ADAPTER_GGUF)
    reference = _peft_merged(tiny_llama_dir, src)
    assert _max_weight_diff(from_gguf, reference) < 1e-6
    # The check has teeth: the base GGUF alone is far from the merge.
    base_only = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=BASE_GGUF, dtype=torch.float32)
    assert _max_weight_diff(base_only, reference) > 1e-2


def test_what_llama_cpp_lora_cannot_hold_is_exported_merged(tmp_path, tiny_llama_dir, converters):
    src = make_adapter(tiny_llama_dir, tmp_path / "rslora", std=0.2, options={"use_rslora": True})
    config = json.loads((src / "adapter_config.json").read_text())
    assert lora_gguf_problems(config, {}) == ["rsLoRA's alpha / sqrt(r) scale (use_rslora)"]

    out = export_gguf(src, tmp_path / "gguf")
    info = json.loads((out / GGUF_INFO).read_text())
    assert info["kind"] == "merged" and info["files"] == {"model": MODEL_GGUF}
    assert _max_weight_diff(load_gguf_model(out / MODEL_GGUF), _peft_merged(tiny_llama_dir, src)) < 1e-6


def test_export_refuses_an_existing_folder_and_a_classifier_export(tmp_path, converters):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        export_gguf("anything", tmp_path / "taken")
    merged = tmp_path / "merged-classifier"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "adapterkit_export.json").write_text(json.dumps({"task": "sequence-classification"}))
    with pytest.raises(ConfigError, match="causal LMs only"):
        export_gguf(merged, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.gguf-*"))


def test_export_and_parity_cli_on_a_trained_smollm2_lora(tmp_path_factory, tmp_path, smollm2_dir, converters, capsys):
    """A LoRA trained by our loop (not random weights), exported by `adapterkit export --to gguf`, on its own
    held-out rows: the GGUF files give the engine's logprobs within 1e-4, far less than the training moved them."""
    store, ref = trained_smol_lora(tmp_path_factory, smollm2_dir)
    out = tmp_path / "smol-gguf"
    assert export_main([ref, str(out), "--to", "gguf", "--store", str(store.root)]) == 0
    assert json.loads((out / GGUF_INFO).read_text())["kind"] == "lora"

    report = tmp_path / "parity.json"
    capsys.readouterr()
    args = [ref, "--runtime", "gguf", "--artifact", str(out), "--store", str(store.root), "--json", str(report)]
    code = parity_main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    got = json.loads(report.read_text())
    assert got["passed"] and len(got["rows"]) == 8 and got["max_diff"] <= 1e-4
    assert got["effect"] > 1e-2, got["effect"]
    shutil.rmtree(out)  # 270 MB
