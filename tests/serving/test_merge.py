"""Merge-and-export: the standalone folder loads with plain transformers and matches base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from adapters.errors import ConfigError
from adapters.modeling.decoding import decode_batch
from adapters.modeling.generation import SamplingParams, encode_prompt
from adapters.serving.engine import ClassificationRequest, GenerationRequest, InferenceEngine
from adapters.serving.merge import load_exported, merge_and_export
from tests.helpers.serving import make_adapter


def test_lora_merge_matches_base_plus_adapter(tiny_llama_dir, tmp_path, store_root):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "lora", seed=41, options={"target_modules": "all"})
    report = merge_and_export(str(tiny_llama_dir), str(adapter), tmp_path / "merged", store=store_root)
    assert report["check"]["passed"] and report["check"]["max_abs_diff"] < 1e-4
    out = tmp_path / "merged"
    assert not (out / "adapter_config.json").exists() and (out / "adapterkit_export.json").is_file()
    assert json.loads((out / "adapter_manifest.json").read_text())["name"] == "lora"
    # plain transformers, no peft: greedy output equals the engine serving base + adapter
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    engine = InferenceEngine(str(tiny_llama_dir), store=store_root)
    served = engine.generate(
        [GenerationRequest(adapter=str(adapter), prompt="Tell me a story", params=SamplingParams(max_new_tokens=8))]
    )[0]
    ids = encode_prompt(
        engine.tokenizer, "Tell me a story", None, json.loads((adapter / "manifest.json").read_text())["prompt"]
    )
    alone = decode_batch(merged, engine.tokenizer, [ids], [SamplingParams(max_new_tokens=8)], engine._stop_ids)[0]
    assert alone.token_ids == served.token_ids
    with pytest.raises(ConfigError, match="already exists"):
        merge_and_export(str(tiny_llama_dir), str(adapter), out, store=store_root)


def test_qlora_merge_dequantizes_and_optionally_requantizes(tiny_llama64_dir, tmp_path, store_root):
    q4 = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    adapter = make_adapter(tiny_llama64_dir, tmp_path / "qlora", seed=42, quantization=q4, std=0.05)
    # the manifest says the adapter was trained on a 4-bit base: merge dequantizes that base
    report = merge_and_export(str(tiny_llama64_dir), str(adapter), tmp_path / "merged", store=store_root)
    assert report["quantization"]["bits"] == 4 and not report["requantized"]
    assert report["check"]["passed"] and report["check"]["max_abs_diff"] < 2e-2
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a float model
    with pytest.warns(UserWarning, match="re-quantizing"):
        re4 = merge_and_export(
            str(tiny_llama64_dir), str(adapter), tmp_path / "merged4", store=store_root, requantize=True
        )
    assert re4["requantized"] and "max_abs_diff" in re4["check"]
    assert json.loads((tmp_path / "merged4" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    reloaded = load_exported(tmp_path / "merged4")
    assert type(reloaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with pytest.raises(ConfigError, match="requantize needs a quantized base"):
        merge_and_export(
            str(tiny_llama64_dir),
            str(make_adapter(tiny_llama64_dir, tmp_path / "fp", seed=1)),
            tmp_path / "x",
            store=store_root,
            requantize=True,
        )


def test_classifier_merge_keeps_its_head_and_labels(tiny_bert_dir, tmp_path, store_root):
    adapter = make_adapter(
        tiny_bert_dir, tmp_path / "cls", task="sequence-classification", seed=43, labels=["neg", "neu", "pos"]
    )
    report = merge_and_export(str(tiny_bert_dir), str(adapter), tmp_path / "merged", store=store_root)
    assert report["check"]["passed"] and report["labels"] == ["neg", "neu", "pos"]
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    assert merged.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    engine = InferenceEngine(str(tiny_bert_dir), task="sequence-classification", store=store_root)
    served = engine.classify([ClassificationRequest(str(adapter), "a fine day")])[0]
    ids = engine.tokenizer("a fine day", return_tensors="pt")
    with torch.no_grad():
        logits = merged(**ids).logits[0]
    torch.testing.assert_close(logits, torch.tensor(served.logits), atol=1e-4, rtol=1e-4)


def test_engine_serves_qlora_adapters_on_a_4bit_base(tiny_llama64_dir, tmp_path, store_root):
    q4 = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    a = make_adapter(tiny_llama64_dir, tmp_path / "q1", seed=44, quantization=q4)
    b = make_adapter(tiny_llama64_dir, tmp_path / "q2", seed=45, quantization=q4)
    engine = InferenceEngine(str(tiny_llama64_dir), quantization=4, capacity=2, store=store_root)
    assert type(engine._layers.base_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    import bitsandbytes as bnb  # serving never trains: bitsandbytes may pack for its fast CPU kernel again

    four_bit = [m for m in engine._layers.base_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.support_avx512bf16_for_cpu == m.bnb_cpu_packing_default for m in four_bit)
    requests = [
        GenerationRequest(adapter=ref, prompt=p, params=SamplingParams(max_new_tokens=6))
        for ref, p in ((str(a), "Hello there"), ("base", "The capital of France is"), (str(b), "Hello there"))
    ]
    mixed = engine.generate(requests)
    for req, got in zip(requests, mixed):
        assert got.token_ids == engine.generate([req])[0].token_ids
    assert mixed[0].token_ids != mixed[2].token_ids
