"""Every method on the real MiniLM classifier; the LoRA family, IA3 and prompt learning on real SmolLM2.

Tiny budgets: one short fixed batch, a few steps; each backbone is loaded once per module and
deep-copied for every attach and every reload.
"""

from __future__ import annotations

import copy

import pytest
import torch

from adapters.config import ModelConfig
from adapters.methods import list_methods, method_of_folder
from adapters.modeling.backbone import load_backbone
from tests.helpers.methods import logits_of, train_steps

pytestmark = pytest.mark.real_model

TREC_LABELS = {"ABBR": 0, "DESC": 1, "ENTY": 2, "HUM": 3, "LOC": 4, "NUM": 5}
QUESTIONS = [
    ("What does NASA stand for ?", "ABBR"),
    ("How do you make a paper airplane ?", "DESC"),
    ("What color is a giraffe 's tongue ?", "ENTY"),
    ("Who wrote Hamlet ?", "HUM"),
    ("Where is the Eiffel Tower ?", "LOC"),
    ("How many legs does a spider have ?", "NUM"),
]
SMOLLM2_METHODS = {"lora", "dora", "loha", "lokr", "vera", "ia3", "prompt-tuning", "prefix-tuning", "p-tuning"}
# Small budgets per method: a few steps must show the loss falling on one fixed batch.
LR = {"full": 1e-4, "partial": 1e-3}


def _batch(tokenizer, task):
    texts = [q for q, _ in QUESTIONS]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if task == "causal-lm":
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([TREC_LABELS[label] for _, label in QUESTIONS])
    return batch


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    from adapters.modeling.backbone import load_tokenizer

    cfg = ModelConfig(name="minilm-l6")
    torch.manual_seed(0)
    base = load_backbone(cfg, "sequence-classification", TREC_LABELS)
    return base, _batch(load_tokenizer(cfg), "sequence-classification")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from adapters.modeling.backbone import load_tokenizer

    cfg = ModelConfig(name="smollm2-135m-instruct")
    base = load_backbone(cfg, "causal-lm")
    return base, _batch(load_tokenizer(cfg), "causal-lm")


def _train_save_reload(method, base, batch, task, tmp_path, steps):
    options = method.parse_options({})
    model = method.attach(copy.deepcopy(base), options, task)
    before, after = train_steps(model, batch, steps=steps, lr=LR.get(method.name, 5e-3))
    assert after < before, f"{method.name}: loss did not fall ({before:.4f} -> {after:.4f})"
    expected = logits_of(model, batch)
    method.save(model, tmp_path / "adapter")
    del model
    assert method_of_folder(tmp_path / "adapter").name == method.name
    reloaded = method.load(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(logits_of(reloaded, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method_name", [m.name for m in list_methods() if "sequence-classification" in m.tasks])
def test_every_method_on_minilm_classification(method_name, minilm, tmp_path):
    method = next(m for m in list_methods() if m.name == method_name)
    base, batch = minilm
    _train_save_reload(method, base, batch, "sequence-classification", tmp_path, steps=4)


@pytest.mark.parametrize("method_name", sorted(SMOLLM2_METHODS))
def test_lora_family_ia3_and_prompt_learning_on_smollm2(method_name, smollm2, tmp_path):
    method = next(m for m in list_methods() if m.name == method_name)
    base, batch = smollm2
    _train_save_reload(method, base, batch, "causal-lm", tmp_path, steps=2)
