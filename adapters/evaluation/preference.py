"""Held-out preference metrics: does the model give the chosen response a higher log-probability
than the rejected one? Measured on splits tokenized from preference rows (adapters.data.pairs)."""

from __future__ import annotations

import torch

from adapters.data.pairs import pair_collator
from adapters.modeling.logprobs import completion_logps


@torch.no_grad()
def evaluate_preference(model, dataset, tokenizer, accelerator, batch_size: int) -> dict[str, float]:
    """{"preference_accuracy": share of pairs with log p(chosen | prompt) > log p(rejected | prompt)
    (sums over the response tokens; a tie counts as wrong), "logp_margin": their mean difference, in nats}.

    dataset: rows with input_ids/labels (chosen) and rejected_input_ids/rejected_labels; batch_size
    in pairs. The model is left in train mode, as the other evaluators leave it.
    """
    model.eval()
    collate = pair_collator(tokenizer)
    lengths = list(dataset["length"][:])
    order = sorted(range(len(lengths)), key=lengths.__getitem__)  # batches of similar length pad little
    right, margin_sum = 0, 0.0
    for start in range(0, len(order), batch_size):
        batch = collate([dataset[i] for i in order[start : start + batch_size]])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        logps = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0].sum(1)
        pairs = logps.shape[0] // 2
        margin = logps[:pairs] - logps[pairs:]
        right += int((margin > 0).sum())
        margin_sum += float(margin.sum())
    model.train()
    n = max(1, len(order))
    return {"preference_accuracy": right / n, "logp_margin": margin_sum / n}
