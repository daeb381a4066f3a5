"""Per-token log-probabilities of a completion under a causal LM: what preference and RL objectives
compare (adapters.training.objectives) and what preference evaluation ranks (adapters.evaluation.preference).

A row is prompt + completion with labels = input_ids on the completion and -100 elsewhere, as the
causal-lm rows of adapters.data.loading. As in adapters.modeling.losses, left-padded rows put every
completion at the end, so the vocabulary projection runs only for the last positions that predict
a completion token.
"""

from __future__ import annotations

import torch

from adapters.modeling.losses import prepended_virtual_tokens


def _prompt_learning(model) -> bool:
    """Whether the (possibly DDP-wrapped) model's active peft adapter is prompt tuning / prefix / P-tuning."""
    config = getattr(getattr(model, "module", model), "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def completion_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token | everything before it) of each labelled token.

    input_ids, attention_mask, labels: [rows, seq] (labels -100 where nothing is scored).
    temperature: the logits are divided by it first (GRPO scores its samples at the sampling
    temperature, as TRL's GRPOTrainer does). Returns (logps, mask), both [rows, K] for the last K
    predicted positions: logps in nats (0 where mask is False), mask True on scored tokens. Sum
    logps over K for a sequence log-probability, divide by mask.sum(1) for the per-token mean.
    """
    if _prompt_learning(model):
        # peft numbers prompt-learning positions from the first virtual token, ignoring position_ids:
        # right-align the rows so each keeps the positions it has alone.
        order = torch.argsort((attention_mask == 0).int(), dim=1, stable=True)  # [rows, seq]
        input_ids, attention_mask, labels = (torch.gather(t, 1, order) for t in (input_ids, attention_mask, labels))
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out.logits[:, prepended_virtual_tokens(model) :][:, :-1]  # [rows, seq - 1, vocab]
        targets = labels[:, 1:]
    else:
        length = input_ids.shape[1]
        has_label = labels != -100  # [rows, seq]
        first = torch.where(has_label.any(1), has_label.float().argmax(1), torch.full_like(labels[:, 0], length))
        keep = max(2, min(int(length - first.min().item() + 1), length))
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: count from the first token
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep)
        logits = out.logits[:, :-1]  # [rows, keep - 1, vocab]: position t predicts token t + 1
        targets = labels[:, length - keep + 1 :]  # [rows, keep - 1]
    logits = logits.float() / temperature
    mask = targets != -100
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [rows, K]
    logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return logps, mask
