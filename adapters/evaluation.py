"""Held-out evaluation: loss + metrics for classifiers, loss + exact match of generations for causal LMs."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".!?").split())


@torch.no_grad()
def evaluate_classification(model, dataloader, accelerator, labels: list[str], out_dir=None) -> dict:
    from adapters.metrics import classification_metrics, save_confusion_matrix

    model.eval()
    losses, preds, refs = [], [], []
    for batch in dataloader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        out = model(**batch)
        losses.append(out.loss.float().item() * len(batch["labels"]))
        preds += out.logits.argmax(-1).tolist()
        refs += batch["labels"].tolist()
    model.train()
    n = max(1, len(refs))
    metrics = {"loss": sum(losses) / n, **classification_metrics(preds, refs, labels)}
    if out_dir is not None and accelerator.is_main_process:
        save_confusion_matrix(preds, refs, labels, out_dir)
    return metrics


@torch.no_grad()
def evaluate_causal_lm(model, dataset, tokenizer, accelerator, batch_size: int, max_new_tokens: int, generate: bool = True) -> dict:
    """Mean response-token loss (and perplexity), and exact match of greedy generations."""
    from adapters.data import eval_dataloader
    from adapters.metrics import exact_match
    from adapters.objectives import causal_lm_response_loss

    model.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in eval_dataloader(dataset, "causal-lm", tokenizer, batch_size):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss, _ = causal_lm_response_loss(model, batch, reduction="sum")
        total_loss += loss.item()
        total_tokens += int((batch["labels"][:, 1:] != -100).sum())
    mean_loss = total_loss / max(1, total_tokens)
    metrics = {"loss": mean_loss, "perplexity": math.exp(min(mean_loss, 50))}
    if generate:
        predictions = generate_answers(model, tokenizer, list(dataset["prompt_ids"]), accelerator.device, batch_size, max_new_tokens)
        metrics["exact_match"] = exact_match(predictions, list(dataset["target"]))
        metrics["examples"] = [
            {"target": t, "prediction": p} for t, p in list(zip(dataset["target"], predictions))[:5]
        ]
    model.train()
    return metrics


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], device, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy generation, batched with left padding (sorted by length so batches pad little)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    unwrapped = getattr(model, "module", model)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            input_ids[row, width - len(p) :] = torch.tensor(p)
            attention[row, width - len(p) :] = 1
        out = unwrapped.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, i in enumerate(idx):
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            results[i] = text.split("\n")[0].strip()
    return results


def adapter_disabled(model):
    """Context in which a peft model runs as its bare base (for the before/after comparison)."""
    unwrapped = getattr(model, "module", model)
    if hasattr(unwrapped, "disable_adapter"):
        return unwrapped.disable_adapter()
    return nullcontext()
