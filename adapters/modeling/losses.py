"""Training objectives: what the loss is computed on, how many targets it covers, and how to avoid
computing the rest.

The vocabulary projection (49k x 576 for SmolLM2, ~20% of a step's FLOPs if done everywhere) runs
only on the hidden states of positions that predict a target (labels != -100 one step later),
gathered with transformers' boolean ``logits_to_keep``, whatever the padding side. For Llama-style
heads the projection and the cross-entropy are fused and chunked (fused_linear_cross_entropy), so
memory holds one chunk of logits instead of targets x vocabulary.

Every loss can be summed over its targets (reduction "sum") and counted (``target_count``), so
the training loop divides by the number of targets in the whole optimizer step's batch
(adapters.training.step) instead of averaging per micro-batch.
"""

from __future__ import annotations

import contextlib

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
    elsewhere), or packed rows with position_ids instead of attention_mask. reduction: "mean" over the
    target tokens, or "sum" (nats; the loop divides it by the target count of the whole optimizer
    step, see response_target_count). Returns (loss, the model output): a scalar, and the output whose
    logits are [targets, vocab] at the positions that predict a target (all positions [batch, V + seq,
    vocab] for prompt learning; None where the fused head computed the loss without keeping logits).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if _is_prompt_learning(model):
        return _prompt_learning_loss(model, batch, reduction)
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)  # [batch, seq]: position t predicts token t + 1
    predicts[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][predicts[:, :-1]]  # [targets], row-major: the order of the kept positions
    if "position_ids" in batch:
        # Packed rows; packed_forward keeps them apart.
        def forward(keep):
            return packed_forward(model, batch["input_ids"], batch["position_ids"], keep)
    else:
        # Left padding: positions count from each row's first real token, as in generation.
        position_ids = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)

        def forward(keep):
            return model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=position_ids,
                logits_to_keep=keep,
            )

    head = _fusable_head(model)
    if head is None:
        out = forward(predicts)
        return F.cross_entropy(out.logits.float(), targets, reduction=reduction), out
    with _head_returns_hidden_states(model, head):
        out = forward(predicts)  # out.logits: the final hidden states [targets, hidden]
    loss = fused_linear_cross_entropy(out.logits, head.weight, targets, head.bias)
    out.logits = None
    return (loss if reduction == "sum" else loss / max(int(targets.numel()), 1)), out


# Causal LMs whose logits are exactly lm_head(final hidden states): no soft-capping or scaling after it
# (Gemma 2/3, Cohere, Granite, MiniCPM do more, and keep the plain path).
_PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "olmo2")


def _fusable_head(model):
    """The model's lm_head when it is a plain torch Linear of a _PLAIN_HEAD_TYPES model (not wrapped by an
    adapter, not quantized), so that projection and loss can be fused; else None."""
    inner = getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = getattr(base, "lm_head", None)
    if type(head) is not torch.nn.Linear or getattr(base.config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    if type(head.weight) is not torch.nn.Parameter or hasattr(head.weight, "ds_id"):
        return None  # sharded (FSDP, DeepSpeed ZeRO-3): the full weight exists only inside the module's forward
    return head


class _HiddenStates(torch.nn.Module):
    """Stands in for lm_head during a forward pass: returns its input, the final hidden states."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextlib.contextmanager
def _head_returns_hidden_states(model, head):
    """Within the block, the model's forward returns the (kept) final hidden states as its logits."""
    inner = getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    base.lm_head = _HiddenStates()
    try:
        yield
    finally:
        base.lm_head = head


def _chunk_rows(vocab: int) -> int:
    """Rows of logits per chunk: about 2**24 logits (64 MiB in fp32) at a time."""
    return max(1, (1 << 24) // max(vocab, 1))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i), chunk by chunk; gradients computed in the forward
    pass (Liger Kernel's FusedLinearCrossEntropy, Hsu et al. 2024; cut cross-entropy, Wijmans et al.
    2024) so that no [rows, vocab] tensor outlives its chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = hidden.new_zeros((), dtype=torch.float32)
        step = _chunk_rows(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            h, t = hidden[start : start + step], targets[start : start + step]
            logits = F.linear(h, weight, bias).float()  # [chunk, vocab]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None])[:, 0]).sum()
            if not (need_h or need_w or need_b):
                continue
            g = torch.softmax(logits, dim=-1)  # d(sum CE)/d logits = softmax - one_hot(target)
            g[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            if need_h:
                grad_h[start : start + step] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += g.t() @ h.float()
            if need_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
            None if grad_w is None else (grad_w * grad_out).to(w_dtype),
            None,
            None if grad_b is None else (grad_b * grad_out).to(b_dtype),
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed cross-entropy (nats) of the logits hidden @ weight.T (+ bias) against `targets`, without
    materializing all of them: hidden [rows, hidden_size], weight [vocab, hidden_size], targets [rows]
    (class ids, no ignore_index), bias [vocab] or None. Logits are upcast to fp32 as in the plain path;
    memory holds one chunk of ~2**24 logits. Equals F.cross_entropy(F.linear(hidden, weight, bias).float(),
    targets, reduction="sum") in value and gradients (to rounding)."""
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # zero, with a (zero) gradient path to both
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, bias)
    step = _chunk_rows(weight.shape[0])
    return sum(
        F.cross_entropy(F.linear(hidden[i : i + step], weight, bias).float(), targets[i : i + step], reduction="sum")
        for i in range(0, hidden.shape[0], step)
    )


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
