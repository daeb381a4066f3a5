"""Packing (``train.packing``): several tokenized causal-lm rows per training row of up to
``data.max_length`` tokens, so that batches carry little padding.

Rows are assigned to packed rows by best-fit decreasing bin packing (the longest row first, each into
the fullest packed row it still fits; TRL's "bfd" strategy). A packed row keeps its rows' tokens and
labels end to end, with ``position_ids`` restarting at 0 at each row's first token; the model then
keeps the rows apart (adapters.modeling.packed). Batches are right-padded with padding whose
positions also restart at 0, so padding forms blocks of its own that no real token sees. The first
token of each row is never a target, as in an unpacked row (nothing predicts it), so the summed loss
and its gradients equal those of the same rows unpacked (tests/data/test_packing.py).

The padding share (padding tokens / all tokens of the epoch's batches) is measured for the rows
packed and unpacked, in the batches the run's sampler makes, and goes to the data report.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
from datasets import Dataset

from adapters.data.loading import train_dataloader
from adapters.errors import ConfigError

PACKED_COLUMNS = ("input_ids", "labels", "position_ids", "length", "sequences")


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of `lengths` grouped into bins of at most `capacity` tokens,
    each bin's rows in the order they were placed. Raises ValueError for a row longer than capacity."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a row of {max(lengths)} tokens does not fit packed rows of {capacity}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
            continue
        left, b = free.pop(at)
        bins[b].append(i)
        bisect.insort(free, (left - lengths[i], b))
    return bins


def pack_dataset(ds: Dataset, max_length: int) -> Dataset:
    """Tokenized causal-lm rows (input_ids, labels) -> packed rows of at most `max_length` tokens:
    input_ids, labels, position_ids (restarting at 0 for each row), length, and sequences (rows packed).
    Other columns are dropped. Raises ConfigError for a row longer than max_length."""
    input_ids, labels = list(ds["input_ids"][:]), list(ds["labels"][:])
    try:
        bins = pack_lengths([len(ids) for ids in input_ids], max_length)
    except ValueError as err:
        raise ConfigError(f"train.packing: {err} (data.max_length)") from None
    out: dict[str, list] = {column: [] for column in PACKED_COLUMNS}
    for rows in bins:
        ids, targets, positions = [], [], []
        for i in rows:
            ids += input_ids[i]
            targets += [-100] + list(labels[i][1:])  # nothing predicts a row's first token
            positions += list(range(len(input_ids[i])))
        out["input_ids"].append(ids)
        out["labels"].append(targets)
        out["position_ids"].append(positions)
        out["length"].append(len(ids))
        out["sequences"].append(len(rows))
    return Dataset.from_dict(out)


def packed_collator(pad_token_id: int):
    """rows of a packed data set -> a right-padded batch: input_ids, labels (padding -100),
    position_ids (padding counts 0, 1, ... as a block of its own) and attention_mask [batch, longest]
    (1 on real tokens: what token counts read; the model is not given it)."""

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        batch = {key: [] for key in ("input_ids", "labels", "position_ids", "attention_mask")}
        for r in rows:
            pad = longest - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [pad_token_id] * pad)
            batch["labels"].append(list(r["labels"]) + [-100] * pad)
            batch["position_ids"].append(list(r["position_ids"]) + list(range(pad)))
            batch["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}

    return collate


def packed_train_dataloader(packed: Dataset, tokenizer, batch_size: int, seed: int, group_by_length: bool):
    """Seeded batches of packed rows, ordered by the same samplers as unpacked training
    (adapters.data.loading.train_dataloader), collated by packed_collator."""
    sampler = train_dataloader(packed, "causal-lm", tokenizer, batch_size, seed, group_by_length).sampler
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return torch.utils.data.DataLoader(
        packed, batch_size=batch_size, sampler=sampler, collate_fn=packed_collator(pad), drop_last=False
    )


def padding_share(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Padding tokens / all tokens when rows of `lengths` are batched `batch_size` at a time in `order`,
    each batch padded to its longest row (0.0 for no rows)."""
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1 - real / padded if padded else 0.0


def packing_stats(
    unpacked: Dataset, packed: Dataset, tokenizer, batch_size: int, seed: int, group_by_length: bool, max_length: int
) -> dict[str, Any]:
    """What packing did to the training split, for the data report: rows before and after, and the
    padding share of the first epoch's batches both ways (same sampler kind, seed and batch size)."""
    shares = {}
    for name, ds in (("unpacked", unpacked), ("packed", packed)):
        lengths = list(ds["length"][:])
        order = list(iter(train_dataloader(ds, "causal-lm", tokenizer, batch_size, seed, group_by_length).sampler))
        shares[name] = round(padding_share(lengths, order, batch_size), 4)
    return {
        "max_length": max_length,
        "rows": len(unpacked),
        "packed_rows": len(packed),
        "tokens": int(sum(packed["length"][:])),
        "padding_share": shares["packed"],
        "padding_share_unpacked": shares["unpacked"],
    }
