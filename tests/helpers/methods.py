"""Helpers shared by the method tests: tiny backbones for each task, a fixed batch, a short training loop.

Plain functions (imported relatively), not fixtures: the folders come from tests/conftest.py fixtures.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapters.config import ModelConfig
from adapters.modeling.backbone import load_backbone

LABEL2ID = {"negative": 0, "neutral": 1, "positive": 2}

# backbone kind -> (task, fixture folder name, pooling)
BACKBONES = {
    "llama-lm": ("causal-lm", "tiny_llama_dir", "auto"),
    "bert-cls": ("sequence-classification", "tiny_bert_dir", "mean"),  # MeanPoolingClassifier, like MiniLM
    "llama-cls": ("sequence-classification", "tiny_llama_dir", "auto"),  # LlamaForSequenceClassification
}


def backbones_for(task: str) -> list[str]:
    return [kind for kind, (t, _, _) in BACKBONES.items() if t == task]


def load_tiny(kind: str, folders: dict):
    """A fresh tiny backbone of `kind` through adapters.modeling.backbone.load_backbone -> (model, ModelConfig).

    `folders` maps the conftest fixture names (tiny_llama_dir, tiny_bert_dir) to their folders."""
    task, fixture, pooling = BACKBONES[kind]
    cfg = ModelConfig(name=str(folders[fixture]), pooling=pooling)
    torch.manual_seed(0)
    return load_backbone(cfg, task, LABEL2ID if task == "sequence-classification" else None), cfg


def make_batch(model, task: str, seq_len: int = 12, rows: int = 4) -> dict:
    """A fixed batch with real padding (row 0 is 3 tokens shorter, padded on the right).

    input_ids / attention_mask [rows, seq_len]; labels [rows, seq_len] (causal-lm, -100 on padding) or [rows]."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (rows, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    pad = getattr(model.config, "pad_token_id", None)
    ids[mask == 0] = pad if pad is not None else 0
    if task == "causal-lm":
        labels = ids.clone()
        labels[mask == 0] = -100
    else:
        labels = torch.arange(rows) % len(LABEL2ID)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def logits_of(model, batch):
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits.float()


def train_steps(model, batch, steps: int = 10, lr: float = 1e-2) -> tuple[float, float]:
    """AdamW on the trainable parameters over one fixed batch; returns eval-mode loss before and after."""
    before = eval_loss(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "the method left nothing trainable"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return before, eval_loss(model, batch)


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
