"""Preference rows: (prompt, chosen, rejected) tokenized for dpo, orpo, kto and simpo, and batched.

A preference row is a causal-lm row (prompt -> chosen, with the same prompt format, truncation and
generation-eval columns as adapters.data.loading) plus the rejected response after the same prompt:
``rejected_input_ids`` / ``rejected_attention_mask`` / ``rejected_labels``. So every causal-lm
evaluation (response loss, exact match against the chosen response, the drift reference) runs on
preference data unchanged, and adapters.evaluation.preference adds the pairwise metrics.

The collators stack a batch of B pairs into 2B rows, chosen first then rejected (TRL's DPOTrainer
order), padded to one width; pair_collator(kto=True) adds the mismatched rows KTO's KL estimate
needs (prompt i with the completion of row i - 1, as TRL's KTO collator cycles them).
"""

from __future__ import annotations

import torch

from adapters.config import DataConfig
from adapters.data.prompts import (
    PromptFormat,
    build_prompt_ids,
    cut_prompt,
    prompt_budget,
    prompt_parts,
    response_suffix_ids,
)
from adapters.errors import ConfigError

PAIR_COLUMNS = ("rejected_input_ids", "rejected_attention_mask", "rejected_labels")


def check_preference_rows(columns: list[str], data: DataConfig, objective: str, conversational: bool) -> None:
    """Raise ConfigError unless rows with `columns` can train a preference `objective`: plain-string
    preference rows (or text rows) with data.text_field, the target column and data.rejected_field."""
    if conversational:
        raise ConfigError(
            f"train.objective {objective!r}: preference rows made of messages are not supported yet; "
            "give prompt, chosen and rejected as plain strings"
        )
    needed = (data.text_field, data.response_field or data.label_field, data.rejected_field)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ConfigError(
            f"train.objective {objective!r} trains on preference rows (prompt, chosen, rejected): column(s) "
            f"{', '.join(missing)} missing (data.text_field / response_field / rejected_field); "
            f"columns: {', '.join(columns)}"
        )


def preference_encoder(tokenizer, data: DataConfig, max_new_tokens: int, words: dict[str, str]):
    """batch of rows -> the causal-lm columns of prompt -> chosen (input_ids, attention_mask, labels,
    length, prompt_ids, target) plus PAIR_COLUMNS for prompt -> rejected, and the flags
    input_truncated / response_truncated.

    Columns: data.text_field (prompt), data.response_field or data.label_field (chosen),
    data.rejected_field (rejected); `words` rewrites label values as answer words (data.label_names).
    Both responses follow the same prompt, cut (data.truncation) to leave room for the longer one;
    a response longer than that room is cut at its end, or the row is left out under
    long_response "drop". Raises ConfigError when the prompt markup alone fills data.max_length.
    """
    chosen_field, rejected_field = data.response_field or data.label_field, data.rejected_field
    suffix = response_suffix_ids(tokenizer)
    fmt = PromptFormat.from_data_config(data)
    drop = data.truncation.long_response == "drop"
    eval_budget = prompt_budget(data.max_length, max_new_tokens)

    def answer_ids(value) -> tuple[str, list[int]]:
        text = words.get(str(value), str(value))
        return text, tokenizer(text, add_special_tokens=False)["input_ids"] + suffix

    def encode(batch):
        keys = (
            "input_ids",
            "attention_mask",
            "labels",
            "length",
            "prompt_ids",
            "target",
            *PAIR_COLUMNS,
            "input_truncated",
            "response_truncated",
        )
        out = {key: [] for key in keys}
        columns = (batch[data.text_field], batch[chosen_field], batch[rejected_field])
        for text, chosen_value, rejected_value in zip(*columns):
            target, chosen = answer_ids(chosen_value)
            rejected = answer_ids(rejected_value)[1]
            full = build_prompt_ids(tokenizer, str(text), fmt)
            longest = max(len(chosen), len(rejected))
            parts = None
            if len(full) + longest > data.max_length or len(full) > eval_budget:
                parts = prompt_parts(tokenizer, str(text), fmt)
            room = data.max_length - (len(parts[0]) + len(parts[2]) if parts else 0)  # for text + response
            if parts and room < 1:
                raise ConfigError(
                    f"data.max_length={data.max_length} leaves no room for a response: the prompt format alone "
                    f"takes {data.max_length - room} tokens; raise data.max_length or shorten the prompt format"
                )
            if longest > room and drop:
                continue
            chosen, rejected = chosen[:room], rejected[:room]
            prompt = full
            if parts is not None:
                prompt = cut_prompt(parts, data.max_length - max(len(chosen), len(rejected)), fmt.prompt_side)
            for prefix, ids in (("", chosen), ("rejected_", rejected)):
                out[f"{prefix}input_ids"].append(prompt + ids)
                out[f"{prefix}attention_mask"].append([1] * (len(prompt) + len(ids)))
                out[f"{prefix}labels"].append([-100] * len(prompt) + ids)
            out["length"].append(len(prompt) + max(len(chosen), len(rejected)))
            out["prompt_ids"].append(full if parts is None else cut_prompt(parts, eval_budget, fmt.prompt_side))
            out["target"].append(target)
            out["input_truncated"].append(len(prompt) < len(full))
            out["response_truncated"].append(longest > room)
        return out

    return encode


def pad_rows(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
    """[len(rows), longest] long tensor of the rows padded with `value` on `side` ("left" or "right")."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if side == "left":
                out[i, width - len(row) :] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out


def padding_side() -> str:
    """Left on CPU (completions end every row, so the vocabulary projection runs only there), right on
    CUDA (left-padded rows start with fully masked queries, which some SDPA kernels turn into NaN):
    adapters.data.loading.collator_for's reasons."""
    return "right" if torch.cuda.is_available() else "left"


def rows_batch(sequences: list[list[int]], labels: list[list[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels [rows, longest] of token rows and their labels, padded on `side`."""
    return {
        "input_ids": pad_rows(sequences, pad_id, side),
        "attention_mask": pad_rows([[1] * len(s) for s in sequences], 0, side),
        "labels": pad_rows(labels, -100, side),
    }


def _split_row(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a row whose labels are -100 on the prompt."""
    start = next((i for i, label in enumerate(labels) if label != -100), len(labels))
    return ids[:start], ids[start:]


def pair_collator(tokenizer, kto: bool = False):
    """rows of preference_encoder -> a batch of 2B rows (B chosen, then their B rejected):
    input_ids / attention_mask / labels [2B, longest].

    kto: also kl_input_ids / kl_attention_mask / kl_labels [2B, longest'], row i = the prompt of row
    i followed by the completion of row i - 1 (cyclically): mismatched pairs, from which KTO
    estimates the KL term of its reference point (Ethayarajh et al. 2024; TRL's KTO collator).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = padding_side()

    def collate(rows):
        sequences = [r["input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        labels = [r["labels"] for r in rows] + [r["rejected_labels"] for r in rows]
        batch = rows_batch(sequences, labels, pad, side)
        if kto:
            split = [_split_row(s, lab) for s, lab in zip(sequences, labels)]
            shifted = [split[i - 1][1] for i in range(len(split))]  # row i gets the completion of row i - 1
            kl = rows_batch(
                [p + c for (p, _), c in zip(split, shifted)],
                [[-100] * len(p) + c for (p, _), c in zip(split, shifted)],
                pad,
                side,
            )
            batch.update({f"kl_{k}": v for k, v in kl.items()})
        return batch

    return collate
