"""The model calls of one prepared pass that adapters.modeling.decoding.decode_batch does not cover:
class logits of a batch of texts, and generation through a prompt-learning adapter. Call under the
engine's lock, after planner.prepare_pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from adapters.modeling.generation import DecodedRow, SamplingParams, mean_token_confidence


def classify_logits(
    forward: Callable, tokenizer, encoded: list[list[int]], names: list[str] | None, device: torch.device
) -> torch.Tensor:
    """Class logits [rows, num_labels] (on the CPU) of ``encoded`` (token ids per row, right-padded
    into one batch), through ``forward`` with per-row peft adapter ``names`` (None: one adapter)."""
    pad_id = tokenizer.pad_token_id or 0
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # [rows, width]
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):  # right padding: encoders and last-token pooling both handle it
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    extra = {"adapter_names": names} if names is not None else {}
    out = forward(input_ids=ids.to(device), attention_mask=mask.to(device), **extra)
    return out.logits.detach().cpu()


def generate_prompt_learning(
    peft_model, tokenizer, prompt: list[int], params: SamplingParams, stop_ids: set[int], device: torch.device
) -> DecodedRow:
    """Generate for one row (``prompt``: token ids) through peft's generate with the active prompt-learning adapter.

    Prompt-learning methods prepend virtual tokens inside peft's generate; their rows never mix,
    and a single row needs no padding. ``stop_ids``: end-of-sequence token ids (dropped from the
    output, finish reason "stop"). The confidence is that of decode_batch: the geometric mean
    probability of the emitted tokens under the raw logits (temperature 1).
    """
    ids = torch.tensor([prompt], device=device)  # [1, prompt tokens]
    kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if params.temperature > 0:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
    else:
        kwargs.update(do_sample=False)
    if params.stop:
        kwargs.update(stop_strings=params.stop, tokenizer=tokenizer)
    with torch.inference_mode():
        out = peft_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    new = [int(t) for t in out.sequences[0, len(prompt) :]]
    finish = "length"
    if new and new[-1] in stop_ids:
        new, finish = new[:-1], "stop"
    # out.logits: one [1, vocab] tensor per step
    logprob_sum = sum(float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, new))
    text = tokenizer.decode(new, skip_special_tokens=True)
    for s in params.stop:
        if s in text:
            text, finish = text[: text.find(s)], "stop"
    return DecodedRow(new, text, finish, mean_token_confidence(logprob_sum, len(new)))
