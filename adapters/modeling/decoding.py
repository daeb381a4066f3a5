"""Batched decoding with a KV cache: rows with their own adapters (peft's ``adapter_names``), sampling
settings, budgets and stop strings share each forward pass.

``DecodeState`` is a running batch that rows join and leave between steps, so a server can schedule at the
granularity of one token (iteration-level scheduling, Yu et al. 2022, "Orca: A Distributed Serving System for
Transformer-Based Generative Models"): ``add`` prefills new rows in a forward pass of their own and merges
their KV cache into the running batch's, ``step`` picks one token for every row, and rows that finish (or are
removed) leave the batch and the cache at once. ``decode_batch`` decodes a fixed batch to its end with it.
Rows are left-padded with position ids that skip the padding, so a row decodes to the same tokens in a batch
as alone, whenever it joins (greedy; up to float rounding across batch shapes).

Log-probabilities (``SamplingParams.logprobs`` / ``prompt_logprobs``) are the model's: log-softmax of
the logits at temperature 1 over the whole vocabulary, whatever the row's sampling settings, so they
equal a teacher-forced forward pass over prompt + output.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from adapters.errors import ConfigError
from adapters.modeling.generation import (
    FINISH_LENGTH,
    FINISH_STOP,
    DecodedRow,
    SamplingParams,
    TokenLogprobs,
    mean_token_confidence,
    score_prompt,
)
from adapters.modeling.prefix_cache import PrefixCache

# (row key, token emitted or None, finished row, the row's TokenLogprobs so far when asked: the last is this token's)
StepEvent = tuple[Hashable, "int | None", "DecodedRow | None", "TokenLogprobs | None"]


def _pick_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits [vocab] of one row -> the next token id: argmax, or a sample at the temperature within top_p."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        keep[0] = True  # the top token, even for a top_p below float32's smallest value
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class _Row:
    """One row's decoding state: its settings and generator, the tokens it emitted and their log-probabilities."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = _row_generator(params)
        self.tokens: list[int] = []
        self.logprob_sum = 0.0
        self.logprobs = TokenLogprobs() if params.logprobs is not None else None
        self.prompt_logprobs: TokenLogprobs | None = None

    def step(
        self, logits: torch.Tensor, logprobs: torch.Tensor, stop_token_ids: set[int], tokenizer
    ) -> int | DecodedRow:
        """Choose the next token from logits [vocab] (logprobs [vocab]: their log-softmax): the token to feed
        back, or the finished row."""
        p = self.params
        if len(self.tokens) >= p.max_new_tokens:  # a budget of 0: nothing to emit
            return self._done(tokenizer, FINISH_LENGTH)
        token = _pick_next(logits, p, self.generator)
        if token in stop_token_ids and not p.ignore_eos:
            return self._done(tokenizer, FINISH_STOP)
        self.tokens.append(token)
        if self.logprobs is not None:
            self.logprob_sum += self.logprobs.add(token, logprobs, p.logprobs)
        else:
            self.logprob_sum += float(logprobs[token])
        if p.stop:
            text = tokenizer.decode(self.tokens, skip_special_tokens=True)
            cut = min((text.find(s) for s in p.stop if s in text), default=-1)
            if cut >= 0:
                return self._done(tokenizer, FINISH_STOP, text[:cut])
        if len(self.tokens) >= p.max_new_tokens:
            return self._done(tokenizer, FINISH_LENGTH)
        return token

    def _done(self, tokenizer, finish_reason: str, text: str | None = None) -> DecodedRow:
        if text is None:
            text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        confidence = mean_token_confidence(self.logprob_sum, len(self.tokens))
        return DecodedRow(self.tokens, text, finish_reason, confidence, self.logprobs, self.prompt_logprobs)


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids per row -> input_ids [rows, width] left-padded with pad_id, attention_mask [rows, width]."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # DecodeState.add refused empty prompts; a cached prefix leaves >= 1 token
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return input_ids, mask


def _row_generator(params: SamplingParams) -> torch.Generator | None:
    """A CPU generator seeded with the row's seed (a random one without), or None for greedy rows."""
    if params.temperature == 0:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,))))
    return g


@torch.inference_mode()
def decode_batch(
    forward: Callable[..., Any],
    tokenizer,
    prompts: list[list[int]],
    params: list[SamplingParams],
    stop_token_ids: set[int],
    adapter_names: list[str] | None = None,
    device: torch.device | str = "cpu",
    prefix_cache: PrefixCache | None = None,
    owners: list[Hashable | None] | None = None,
) -> list[DecodedRow]:
    """Decode every row of a batch with a KV cache: greedy or sampled per row, each with its own budget and stops.

    forward(input_ids [rows, seq], attention_mask [rows, past + seq], position_ids [rows, seq],
    past_key_values, use_cache, logits_to_keep, adapter_names) is the (peft) model call; its
    ``.logits`` are [rows, kept positions, vocab] (all positions of the prompt pass when a row asks for
    prompt_logprobs, else the last). prompts: token ids per row (any lengths; left-padded here).
    params: one SamplingParams per row. adapter_names (one per row) is passed to forward when given,
    so one forward pass can serve rows of different adapters. ``prefix_cache`` / ``owners``: reuse of
    prefilled prompt prefixes, see DecodeState. Rows that finish leave the batch and the cache. Returns one
    DecodedRow per prompt, in order. Raises ConfigError for an empty prompt.
    """
    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop_token_ids), 0)
    state = DecodeState(tokenizer, stop_token_ids, pad_id, device, prefix_cache)
    state.add(forward, list(range(len(prompts))), prompts, params, adapter_names, owners)
    results: list[DecodedRow | None] = [None] * len(prompts)
    while len(state):
        for row, _, done, _ in state.step(forward):
            if done is not None:
                results[row] = done
    return results  # type: ignore[return-value]


class DecodeState:
    """A batch being decoded one token at a time; rows join (``add``) and leave (finish, ``remove``) between steps.

    ``forward(input_ids [rows, seq], attention_mask [rows, past + seq], position_ids [rows, seq],
    past_key_values, use_cache, logits_to_keep, adapter_names)`` is the model call, as for decode_batch;
    ``adapter_names`` is one name per row of the call (the ``names`` given to ``add``). ``stop_token_ids``: ids
    that end a row (EOS). ``pad_id``: the token under the left padding. Not thread-safe: one caller at a time
    (the caller holds the model's lock around ``add``, ``step`` and ``remove``).

    Between calls the batch holds, per row: its key, adapter name and _Row (settings, emitted tokens), the
    attention mask [rows, width] over the KV cache (left padding 0), the next position [rows, 1], and either
    the logits [rows, vocab] of its next token or the tokens picked last step, not yet fed to the model.

    ``prefix_cache`` (adapters.modeling.prefix_cache): rows added with an owner copy the keys and values of the
    longest prefix of their prompt that owner prefilled before, and prefill only the rest; their prompts are
    stored for later rows. Rows that score their prompt (prompt_logprobs) prefill it whole.
    """

    def __init__(
        self,
        tokenizer,
        stop_token_ids: set[int],
        pad_id: int,
        device: torch.device | str = "cpu",
        prefix_cache: PrefixCache | None = None,
    ):
        self.tokenizer, self.stop_token_ids, self.pad_id, self.device = tokenizer, stop_token_ids, pad_id, device
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.max_bytes > 0 else None
        self.keys: list[Hashable] = []
        self.names: list[str | None] = []
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, width]
        self._next_pos: torch.Tensor | None = None  # [rows, 1]
        self._logits: torch.Tensor | None = None  # [rows, vocab], when the rows' next tokens are not picked yet
        self._pending: list[int] | None = None  # tokens picked by the last step, one per row, not yet fed

    def __len__(self) -> int:
        return len(self.keys)

    def can_join(self) -> bool:
        """Whether rows may join now: the batch is empty, or its KV cache is one whose layers can be merged
        (transformers' DynamicLayer: keys/values [rows, heads, width, head_dim]; not sliding-window layers)."""
        return not self.keys or _mergeable(self._cache)

    @torch.inference_mode()
    def add(
        self,
        forward: Callable[..., Any],
        keys: list[Hashable],
        prompts: list[list[int]],
        params: list[SamplingParams],
        names: list[str | None] | None = None,
        owners: list[Hashable | None] | None = None,
    ) -> None:
        """Prefill ``prompts`` (token ids per row) in one forward pass and merge the rows into the batch.

        ``keys``: one hashable per row, naming it in step()'s events and in remove(). ``params``: one
        SamplingParams per row; ``names``: one adapter name per row (None: ``adapter_names`` is not passed).
        ``owners``: per row, whose weights make its keys and values (the base, one load of an adapter) for the
        prefix cache; None (or a None entry): no reuse.
        The running rows' last picked tokens are fed first. Raises ConfigError for an empty prompt and
        RuntimeError when rows cannot join now (see can_join); on any error the running rows go on unharmed.
        """
        if not prompts:
            return
        if not self.can_join():
            raise RuntimeError("this model's KV cache cannot take rows while others decode")
        if any(not p for p in prompts):
            raise ConfigError("empty prompt: nothing to continue from")
        rows = [_Row(p) for p in params]
        scored = [i for i, p in enumerate(params) if p.prompt_logprobs is not None]
        owners = owners if owners is not None and self.prefix_cache is not None else [None] * len(prompts)
        hits = [
            (0, []) if owner is None or p.prompt_logprobs is not None else self.prefix_cache.lookup(owner, ids)
            for owner, ids, p in zip(owners, prompts, params)
        ]
        cached = [n for n, _ in hits]  # per row: prompt tokens whose keys/values are copied, not computed
        input_ids, mask = _left_pad([ids[n:] for ids, n in zip(prompts, cached)], self.pad_id)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        # [new rows, width]: a row's positions go on after its cached prefix; padding does not advance them
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + torch.tensor(cached, device=self.device).unsqueeze(1)
        past = _prefix_past(hits, self.device)
        if past is not None:
            mask = torch.cat([past[1], mask], dim=1)  # [new rows, prefix width + width]
        self._feed(forward)
        out = forward(  # every position's logits only when a prompt is scored (0 keeps all)
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past[0] if past is not None else None,
            use_cache=True,
            logits_to_keep=0 if scored else 1,
            **_names_kwarg(names),
        )
        self._store_prefixes(out.past_key_values, owners, prompts, cached, input_ids.shape[1])
        for i in scored:  # row i's prompt is the last len(prompts[i]) positions (left padding; nothing cached)
            rows[i].prompt_logprobs = score_prompt(
                out.logits[i, -len(prompts[i]) :], prompts[i], params[i].prompt_logprobs
            )
        logits = out.logits[:, -1, :]  # [new rows, vocab]
        if self.keys:
            self._mask = _merge_caches(self._cache, self._mask, out.past_key_values, mask)
            self._next_pos = torch.cat([self._next_pos, positions[:, -1:] + 1])
            self._logits = torch.cat([self._logits, logits])
        else:
            self._cache, self._mask, self._logits = out.past_key_values, mask, logits
            self._next_pos = positions[:, -1:] + 1
        self.keys.extend(keys)
        self.names.extend(names if names is not None else [None] * len(keys))
        self._rows.extend(rows)

    @torch.inference_mode()
    def step(self, forward: Callable[..., Any]) -> list[StepEvent]:
        """Pick one token for every row: feed the tokens picked last step (one forward pass), then choose.

        Returns one event per row, in batch order: (key, token, None) for a row that goes on, (key, token or
        None, DecodedRow) for one that finished (the token is None when it ended on EOS or its budget without
        emitting one), each with the row's TokenLogprobs so far (None unless asked). Finished rows leave the
        batch and the KV cache.
        """
        self._feed(forward)
        if self._logits is None:
            return []
        logprobs = torch.log_softmax(self._logits.float(), dim=-1)  # [rows, vocab]
        events: list[StepEvent] = []
        keep, picked = [], []
        for b, row in enumerate(self._rows):
            emitted = len(row.tokens)
            result = row.step(self._logits[b], logprobs[b], self.stop_token_ids, self.tokenizer)
            token = row.tokens[-1] if len(row.tokens) > emitted else None
            if isinstance(result, DecodedRow):
                events.append((self.keys[b], token, result, row.logprobs))
            else:
                events.append((self.keys[b], token, None, row.logprobs))
                keep.append(b)
                picked.append(result)
        self._logits = None
        self._select(keep)
        self._pending = picked if keep else None
        return events

    def _store_prefixes(
        self, cache: Any, owners: list[Hashable | None], prompts: list[list[int]], cached: list[int], width: int
    ) -> None:
        """Give the prefix cache each owned row's prompt keys/values: its cached prefix's columns (right-aligned
        before the ``width`` columns just prefilled) and its new ones (right-aligned after them)."""
        if self.prefix_cache is None or not _mergeable(cache):  # a sliding window keeps no whole prompt
            return
        total = cache.layers[0].keys.shape[-2]
        for i, (owner, ids, n) in enumerate(zip(owners, prompts, cached)):
            if owner is None or self.prefix_cache.covered(owner, ids):
                continue
            start, fresh = total - width - n, total - (len(ids) - n)
            kv = [
                tuple(torch.cat([t[i, :, start : total - width], t[i, :, fresh:]], dim=-2) for t in (L.keys, L.values))
                for L in cache.layers
            ]
            self.prefix_cache.store(owner, ids, kv)

    def remove(self, keys: set[Hashable]) -> None:
        """Drop the rows named by ``keys`` (cancelled) from the batch and the KV cache; unknown keys are ignored."""
        keep = [b for b, key in enumerate(self.keys) if key not in keys]
        if len(keep) == len(self.keys):
            return
        if self._pending is not None:
            self._pending = [self._pending[b] for b in keep] or None
        if self._logits is not None:
            self._logits = self._logits[keep] if keep else None
        self._select(keep)

    def _feed(self, forward: Callable[..., Any]) -> None:
        """Run the tokens picked last step through the model; their logits become the rows' next ones."""
        if self._pending is None:
            return
        step_ids = torch.tensor(self._pending, dtype=torch.long, device=self._mask.device).unsqueeze(1)  # [rows, 1]
        self._mask = torch.cat([self._mask, self._mask.new_ones((self._mask.shape[0], 1))], dim=1)
        out = forward(
            input_ids=step_ids,
            attention_mask=self._mask,
            position_ids=self._next_pos,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
            **_names_kwarg(self.names),
        )
        self._cache, self._logits, self._pending = out.past_key_values, out.logits[:, -1, :], None
        self._next_pos = self._next_pos + 1

    def _select(self, keep: list[int]) -> None:
        """Keep rows ``keep`` (batch indices, in order) and drop the cache columns no kept row attends to."""
        if len(keep) == len(self.keys):
            return
        self.keys = [self.keys[b] for b in keep]
        self.names = [self.names[b] for b in keep]
        self._rows = [self._rows[b] for b in keep]
        if not keep:
            self._cache = self._mask = self._next_pos = self._logits = self._pending = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask, self._next_pos = self._mask[index], self._next_pos[index]
        if _mergeable(self._cache):  # left columns padding for every kept row: cut them
            first = int(self._mask.any(dim=0).nonzero()[0])
            if first > 0:
                self._mask = self._mask[:, first:]
                for layer in self._cache.layers:
                    layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]


def _prefix_past(hits: list[tuple[int, list]], device: torch.device | str) -> tuple[Any, torch.Tensor] | None:
    """The KV cache of the new rows' cached prefixes, left-padded with zeros to the longest (transformers'
    DynamicCache, layers [rows, kv heads, width, head dim]) and its attention mask [rows, width]; None when no
    row has one."""
    width = max(n for n, _ in hits)
    if width == 0:
        return None
    layers = len(next(kv for n, kv in hits if n))
    mask = torch.zeros((len(hits), width), dtype=torch.long, device=device)
    for i, (n, _) in enumerate(hits):
        if n:
            mask[i, width - n :] = 1
    data = []
    for layer in range(layers):
        pair = []
        for j in (0, 1):  # keys, values
            like = next(kv[layer][j] for n, kv in hits if n)
            empty = like.new_zeros((*like.shape[:-2], 0, like.shape[-1]))
            pair.append(torch.stack([_pad_left(kv[layer][j] if n else empty, width) for n, kv in hits]).to(device))
        data.append(tuple(pair))
    return DynamicCache(ddp_cache_data=data), mask


def _names_kwarg(names: list[str | None] | None) -> dict:
    """forward's ``adapter_names`` argument: one name per row, or nothing when the rows were added without."""
    return {} if names is None or None in names else {"adapter_names": list(names)}


def _mergeable(cache: Any) -> bool:
    """Whether ``cache`` is a KV cache of filled full-attention DynamicLayers (their tensors can be padded and
    joined; a sliding-window layer keeps only its window)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.keys is not None for layer in layers)


def _merge_caches(cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor) -> torch.Tensor:
    """Append ``new_cache``'s rows to ``cache`` (in place), left-padding the shorter one's keys and values with
    zeros to one width; returns the joined attention mask [rows + new rows, width] (padding 0)."""
    width = max(mask.shape[1], new_mask.shape[1])
    for layer, new in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([_pad_left(layer.keys, width), _pad_left(new.keys, width)])
        layer.values = torch.cat([_pad_left(layer.values, width), _pad_left(new.values, width)])
    return torch.cat([_pad_left(mask, width, dim=1), _pad_left(new_mask, width, dim=1)])


def _pad_left(x: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """``x`` with zeros before its entries along ``dim`` up to ``width`` (keys/values [rows, heads, seq, dim]: -2)."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
