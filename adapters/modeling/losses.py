"""Training objectives: what the loss is computed on, how many targets it covers, and how to avoid
computing the rest.

On CPU, causal-lm batches are left-padded, so every response sits at the end of its row. The
vocabulary projection (49k x 576 for SmolLM2, ~20% of a step) is then computed only for the
last K positions that hold response tokens, instead of for every prompt token. The same code
is exact for right-padded batches (used on CUDA); it then keeps nearly every position.

Every loss can be summed over its targets (reduction "sum") and counted (``target_count``), so
the training loop divides by the number of targets in the whole optimizer step's batch
(adapters.training.step) instead of averaging per micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters.modeling.packed import packed_forward

# peft prompt-learning types that feed virtual tokens as keys/values, not as extra input positions.
_KV_PREFIX_TYPES = ("PREFIX_TUNING", "CARTRIDGE")


def _active_peft_config(model):
    """The active peft config of the (possibly DDP- or DeepSpeed-wrapped) model, or None."""
    return getattr(getattr(model, "module", model), "active_peft_config", None)


def _is_prompt_learning(model) -> bool:
    """Whether the (possibly DDP-wrapped) model's active peft adapter is prompt tuning / prefix / P-tuning."""
    return bool(getattr(_active_peft_config(model), "is_prompt_learning", False))


def prepended_virtual_tokens(model) -> int:
    """How many virtual token positions peft puts before each row's input: num_virtual_tokens for
    prompt tuning and P-tuning (prepended input embeddings, with labels -100), 0 for prefix tuning
    (keys/values only) and for every other model."""
    cfg = _active_peft_config(model)
    if not getattr(cfg, "is_prompt_learning", False):
        return 0
    if str(getattr(cfg.peft_type, "value", cfg.peft_type)) in _KV_PREFIX_TYPES:
        return 0
    return int(cfg.num_virtual_tokens)


def response_target_count(model, labels: torch.Tensor) -> int:
    """The number of tokens causal_lm_response_loss sums over for `labels` [batch, seq] (-100 = no target).

    Position t predicts token t + 1, so a label in column 0 has no prediction, unless peft prepends
    virtual tokens (prompt tuning, P-tuning): the last of them predicts it.
    """
    predicted = labels if prepended_virtual_tokens(model) else labels[:, 1:]
    return int((predicted != -100).sum())


def _right_aligned(batch: dict) -> dict:
    """The batch with each row's real tokens moved to its start (padding at the end), order kept.

    peft gives prompt-learning inputs positions 0, 1, ... from the first virtual token and ignores
    position_ids; on a left-padded row the text's positions would then depend on how much padding
    the batch needs. Right-aligned, they are those of the unpadded row, whatever the batch.
    """
    order = torch.argsort((batch["attention_mask"] == 0).int(), dim=1, stable=True)  # [batch, seq]
    return {k: torch.gather(batch[k], 1, order) for k in ("input_ids", "attention_mask", "labels")}


def _prompt_learning_loss(model, batch: dict, reduction: str):
    """Response cross-entropy of a peft prompt-learning model, from its logits (not peft's mean loss).

    The logits are [batch, V + seq, vocab] with V = prepended_virtual_tokens(model); the labels are
    shifted by one after V columns of -100 are put in front, as peft does before the base model's loss.
    """
    batch = _right_aligned(batch)
    labels = batch["labels"]  # [batch, seq]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    virtual = prepended_virtual_tokens(model)
    if out.logits.shape[1] != labels.shape[1] + virtual:
        raise ValueError(
            f"prompt learning: logits cover {out.logits.shape[1]} positions, expected {labels.shape[1]} tokens "
            f"+ {virtual} virtual ones"
        )
    full = torch.cat([labels.new_full((labels.shape[0], virtual), -100), labels], dim=1)  # [batch, V + seq]
    logits = out.logits[:, :-1].float()  # [batch, V + seq - 1, vocab]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), full[:, 1:].reshape(-1), ignore_index=-100, reduction=reduction
    )
    return loss, out


def causal_lm_response_loss(model, batch: dict, reduction: str = "mean"):
    """Next-token cross-entropy on response tokens only (labels != -100), logits only where they are needed.

    batch: input_ids, attention_mask, labels [batch, seq] (labels = input_ids on the response, -100
    elsewhere). reduction: "mean" over the target tokens, or "sum" (nats; the loop divides it by the
    target count of the whole optimizer step, see response_target_count). Returns (loss, the model
    output): a scalar, and logits [batch, keep, vocab] for the last `keep` positions only (all
    positions, virtual tokens included, for prompt learning).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if _is_prompt_learning(model):
        return _prompt_learning_loss(model, batch, reduction)
    if "position_ids" in batch:
        return _packed_loss(model, batch, reduction)
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
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
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction=reduction
    )
    return loss, out


def _packed_loss(model, batch: dict, reduction: str):
    """Response cross-entropy of packed rows (adapters.data.packing): input_ids, labels, position_ids
    [batch, seq], positions restarting at 0 for each packed row; packed_forward keeps the rows apart.
    Logits are computed only at the positions that predict a target: out.logits is [targets, vocab]."""
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)  # [batch, seq]: position t predicts token t + 1
    predicts[:, :-1] = labels[:, 1:] != -100
    out = packed_forward(model, batch["input_ids"], batch["position_ids"], predicts)
    targets = labels[:, 1:][predicts[:, :-1]]  # [targets], in the order of out.logits' rows
    return F.cross_entropy(out.logits.float(), targets, reduction=reduction), out


def classification_loss(model, batch: dict, label_smoothing: float = 0.0, reduction: str = "mean"):
    """Cross-entropy of a sequence classifier: logits [batch, num_labels], labels [batch] (class ids).

    Returns (loss, the model output); the loss is the mean over rows ("mean") or their sum ("sum",
    nats; one target per row), with label smoothing (Szegedy et al. 2016) when `label_smoothing` > 0.
    The plain mean is the model's own loss.
    """
    out = model(**batch)
    if label_smoothing or reduction == "sum":
        logits = out.logits.float()  # [batch, num_labels]
        return F.cross_entropy(logits, batch["labels"], label_smoothing=label_smoothing, reduction=reduction), out
    return out.loss, out
