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
    """Whether the (possibly DDP-wrapped) model's active peft adapter is prompt tuning / prefix / P-tuning."""
    unwrapped = getattr(model, "module", model)
    cfg = getattr(unwrapped, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))


def causal_lm_response_loss(model, batch: dict, reduction: str = "mean"):
    """Next-token cross-entropy on response tokens only (labels != -100), logits only where they are needed.

    batch: input_ids, attention_mask, labels [batch, seq] (labels = input_ids on the response, -100
    elsewhere). reduction: "mean" over the target tokens, or "sum" (for averaging over several
    micro-batches by their token counts). Returns (loss, the model output): a scalar, and logits
    [batch, keep, vocab] for the last `keep` positions only (all positions for prompt learning).
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if _is_prompt_learning(model):
        # peft prepends virtual tokens / prefixes and aligns labels itself.
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        if reduction == "mean":
            return out.loss, out
        n = int((labels[:, 1:] != -100).sum())
        return out.loss * n, out
    length = input_ids.shape[1]
    has_label = labels != -100  # [batch, seq]
    # The earliest response token of any row; logits from one position before it predict it.
    first = torch.where(has_label.any(1), has_label.float().argmax(1), torch.full_like(labels[:, 0], length))  # [batch]
    keep = int(length - first.min().item() + 1)
    keep = max(2, min(keep, length))
    # Left padding: positions count from each row's first real token, as in generation.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep)
    logits = out.logits[:, :-1].float()  # [batch, keep - 1, vocab]: position t predicts token t + 1
    targets = labels[:, length - keep + 1 :]  # [batch, keep - 1]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum" if reduction == "sum" else "mean",
    )
    return loss, out


def classification_loss(model, batch: dict, label_smoothing: float = 0.0):
    """Cross-entropy of a sequence classifier: logits [batch, num_labels], labels [batch] (class ids).

    Returns (loss, the model output); the loss is the mean over rows, with label smoothing
    (Szegedy et al. 2016) when `label_smoothing` > 0, else the model's own loss.
    """
    out = model(**batch)
    if label_smoothing:
        return F.cross_entropy(out.logits.float(), batch["labels"], label_smoothing=label_smoothing), out
    return out.loss, out
