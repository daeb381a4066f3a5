"""Prefix caching: the KV cache of prompts already prefilled, reused by later prompts that start the same way.

Chat prompts repeat their markup (the chat template's system prompt, an adapter's instruction), so a prompt's
first tokens were often prefilled moments ago. Causal attention makes the keys and values of a prefix depend
on the prefix alone, so they can be copied instead of computed (automatic prefix caching, as vLLM's, after
Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with PagedAttention", and
SGLang's RadixAttention, Zheng et al. 2024). They also depend on the weights: entries belong to an ``owner``
(the base, or one load of one adapter), and a prompt reuses only its own owner's.

Entries are whole prompts ([layers] of keys/values [kv heads, tokens, head dim], cloned), matched on their
longest common token prefix with the new prompt; least recently used entries go first when the cache holds
more than ``max_bytes``. Not thread-safe: the engine uses it under its model lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

MIN_PREFIX_TOKENS = 8  # a shorter match is computed again: copying it saves less than it costs
_INDEX_TOKENS = MIN_PREFIX_TOKENS  # entries are found by their owner and first tokens


@dataclass
class _Entry:
    tokens: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [kv heads, len(tokens), head dim]
    nbytes: int


class PrefixCache:
    """KV of prefilled prompts by owner, reused for prompts that share a prefix with one of them.

    ``max_bytes``: the most the entries' tensors hold (0 disables the cache). ``hits`` / ``hit_tokens`` count
    lookups that found a reusable prefix and the prompt tokens they saved; ``lookups`` all lookups.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (got {max_bytes})")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()  # (owner, tuple(tokens)) -> entry, LRU first
        self._index: dict[tuple, set[tuple]] = {}  # (owner, first tokens) -> entry keys
        self.nbytes = 0
        self.lookups = self.hits = self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, owner: Hashable, prompt: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The longest cached prefix of ``prompt`` for ``owner``: (its length, per-layer keys/values [kv heads,
        length, head dim], views of the entry's tensors: do not modify them). At most ``len(prompt) - 1``
        tokens (the last one is computed, for its logits) and at least MIN_PREFIX_TOKENS, else (0, [])."""
        self.lookups += 1
        best, best_key = self._longest(owner, prompt)
        best = min(best, len(prompt) - 1)
        if best < MIN_PREFIX_TOKENS:
            return 0, []
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.hit_tokens += best
        return best, [(k[:, :best], v[:, :best]) for k, v in self._entries[best_key].kv]

    def covered(self, owner: Hashable, prompt: list[int]) -> bool:
        """Whether an entry of ``owner`` already starts with all of ``prompt`` (storing it would add nothing)."""
        return self._longest(owner, prompt)[0] == len(prompt)

    def store(self, owner: Hashable, prompt: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Remember ``prompt``'s per-layer keys/values [kv heads, len(prompt), head dim] (cloned here) for
        ``owner``. Prompts shorter than MIN_PREFIX_TOKENS, already covered, or larger than the whole budget
        are not stored; least recently used entries leave until the cache fits ``max_bytes``."""
        if len(prompt) < MIN_PREFIX_TOKENS or self.covered(owner, prompt):
            return
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.max_bytes:
            return
        while self._entries and self.nbytes + nbytes > self.max_bytes:
            self._evict(next(iter(self._entries)))
        key = (owner, tuple(prompt))
        self._entries[key] = _Entry(list(prompt), [(k.clone(), v.clone()) for k, v in kv], nbytes)
        self._index.setdefault((owner, tuple(prompt[:_INDEX_TOKENS])), set()).add(key)
        self.nbytes += nbytes

    def drop(self, owner: Hashable) -> None:
        """Forget every entry of ``owner`` (its adapter was unloaded or evicted: a later load is another owner,
        so they would only hold memory until least-recently-used eviction reached them)."""
        for key in [k for k in self._entries if k[0] == owner]:
            self._evict(key)

    def clear(self) -> None:
        """Forget every entry (the counters stay)."""
        self._entries.clear()
        self._index.clear()
        self.nbytes = 0

    def stats(self) -> dict:
        """Entries, bytes held, lookups, hits and prompt tokens reused since the start."""
        return {
            "entries": len(self._entries),
            "bytes": self.nbytes,
            "max_bytes": self.max_bytes,
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_tokens": self.hit_tokens,
        }

    def _longest(self, owner: Hashable, prompt: list[int]) -> tuple[int, tuple | None]:
        """The entry of ``owner`` sharing the most leading tokens with ``prompt``: (how many, its key), or (0, None)."""
        best, best_key = 0, None
        for key in self._index.get((owner, tuple(prompt[:_INDEX_TOKENS])), ()):
            n = _common_prefix(self._entries[key].tokens, prompt)
            if n > best:
                best, best_key = n, key
        return best, best_key

    def _evict(self, key: tuple) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        index_key = (key[0], tuple(entry.tokens[:_INDEX_TOKENS]))
        self._index[index_key].discard(key)
        if not self._index[index_key]:
            del self._index[index_key]


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
