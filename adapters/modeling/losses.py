"""Training objectives: what the loss is computed on, and how to avoid computing the rest.

On CPU, causal-lm batches are left-padded, so every response sits at the end of its row. The
vocabulary projection (49k x 576 for SmolLM2, ~20% of a step) is then computed only for the
last K positions that hold response tokens, instead of for every prompt token. The same code
is exact for right-padded batches (used on CUDA); it then keeps nearly every position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _is_prompt_learning(model) -> bool:
    unwrapped = getattr(model, "module", model)
    cfg = getattr(unwrapped, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))


def causal_lm_response_loss(model, batch: dict, reduction: str = "mean"):
    """Cross-entropy on response tokens only (labels != -100), logits only where they are needed."""
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if _is_prompt_learning(model):
        # peft prepends virtual tokens / prefixes and aligns labels itself.
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        if reduction == "mean":
            return out.loss, out
        n = int((labels[:, 1:] != -100).sum())
        return out.loss * n, out
    length = input_ids.shape[1]
    has_label = labels != -100
    first = torch.where(has_label.any(1), has_label.float().argmax(1), torch.full_like(labels[:, 0], length))
    keep = int(length - first.min().item() + 1)
    keep = max(2, min(keep, length))
    # Left padding: positions count from each row's first real token, as in generation.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep)
    logits = out.logits[:, :-1].float()
    targets = labels[:, length - keep + 1 :]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum" if reduction == "sum" else "mean")
    return loss, out


def classification_loss(model, batch: dict, label_smoothing: float = 0.0):
    out = model(**batch)
    if label_smoothing:
        return F.cross_entropy(out.logits.float(), batch["labels"], label_smoothing=label_smoothing), out
    return out.loss, out
