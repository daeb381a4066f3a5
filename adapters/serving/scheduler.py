"""Continuous batching for the engine: rows join and leave running decode batches between steps.

``DecodeScheduler.admit`` makes the rows' adapters resident, pins them (adapters.serving.slots: a pinned
adapter is never evicted, and an unload waits for its last row) and prefills the rows into a running
``adapters.modeling.decoding.DecodeState``; ``step`` picks one token for every running row; finished and
cancelled rows leave at once. Rows of mixable adapters (the LoRA family) and of the bare base share one
batch and each forward pass (per-row ``adapter_names``, as planner's mixed passes); each non-mixable adapter
decodes in a batch of its own, stepped in turn. Prompt-learning rows go through peft's generate at admission.

Every model call and every residency change runs under the engine's lock, taken per call: between steps
other engine calls (a load, an unload, a classification) run, and none of them sees a half-loaded adapter.
Each forward re-points the layers at its rows' adapters (planner.forward_for), since another call may have
moved them. Not thread-safe itself: one thread (the server's batcher) drives it.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from adapters.constants import PEFT_BASE
from adapters.modeling.decoding import DecodeState
from adapters.modeling.generation import DecodedRow, SamplingParams, TokenLogprobs
from adapters.modeling.prefix_cache import PrefixCache
from adapters.serving.passes import generate_prompt_learning
from adapters.serving.peft_layers import PeftLayers
from adapters.serving.planner import forward_for
from adapters.serving.resolver import ResolvedAdapter
from adapters.serving.slots import SlotPool

_MIXED = "mixed"  # the batch of base rows and rows of mixable adapters
_PROMPT_LEARNING = "prompt-learning:"  # rows generated whole at admission
_BASE_OWNER = ("base",)  # the prefix cache's owner of base rows (adapter owners are (folder key, load id))


@dataclass(eq=False)
class LiveRow:
    """A row admitted to a running batch: its reference, resolved adapter (None: the base), prompt token ids
    and settings. Compared by identity: it names the row in step() events and in cancel()."""

    ref: str
    adapter: ResolvedAdapter | None
    prompt_ids: list[int]
    params: SamplingParams
    batch: str = _MIXED  # which running batch holds it


@dataclass
class RowEvent:
    """What one step did to one row: the token it emitted (None: none), its DecodedRow once finished, or the
    error that ended it (its batch's forward pass failed). ``logprobs``: the row's token log-probabilities so
    far when its params asked (the last entry is this token's; streamed with it)."""

    row: LiveRow
    token: int | None = None
    done: DecodedRow | None = None
    error: BaseException | None = None
    logprobs: TokenLogprobs | None = None


class DecodeScheduler:
    """Running decode batches over one engine's model: admit rows, step them, cancel them.

    ``lock``: the engine's model lock. ``pool`` / ``layers``: its resident adapters and peft layers.
    ``stop_token_ids``: EOS ids; ``device``: where inputs go. ``prefix_cache``: the engine's (shared with its
    window batches), or None.
    """

    def __init__(
        self,
        lock: threading.RLock,
        pool: SlotPool,
        layers: PeftLayers,
        tokenizer,
        stop_token_ids: set[int],
        device: torch.device,
        prefix_cache: PrefixCache | None = None,
    ):
        self._lock, self._pool, self._layers, self.prefix_cache = lock, pool, layers, prefix_cache
        self.tokenizer, self.stop_token_ids, self.device = tokenizer, stop_token_ids, device
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop_token_ids), 0)
        self._batches: dict[str, DecodeState] = {}
        self._rows: dict[str, dict[LiveRow, str]] = {}  # batch -> {row: its peft adapter name}
        self._finished: list[RowEvent] = []  # rows done at admission (prompt learning), reported by the next step
        self._mixed_key: tuple | None = None  # (adapter names, loads) the mixed-LoRA stacks were built for

    def running(self) -> int:
        """Rows admitted and not finished or cancelled yet."""
        return sum(map(len, list(self._rows.values()))) + len(self._finished)  # a snapshot: other threads may ask

    def adapters(self) -> set[str]:
        """The folder keys of the adapters running rows use."""
        return {row.adapter.key for rows in self._rows.values() for row in rows if row.adapter is not None}

    def fits(self, adapters: list[ResolvedAdapter | None], capacity: int, mix: bool = True) -> bool:
        """Whether rows of ``adapters`` can join now: the running rows' adapters and theirs leave one of the
        ``capacity`` slots unpinned (when capacity > 1), so a load or another engine call can always make
        room, and the batches they join can take rows (see DecodeState.can_join)."""
        keys = self.adapters() | {a.key for a in adapters if a is not None}
        if len(keys) > max(capacity - 1, 1):
            return False
        batches = {_batch_of(a, mix) for a in adapters}
        return all(b not in self._batches or self._batches[b].can_join() for b in batches)

    def admit(
        self,
        refs: list[str],
        adapters: list[ResolvedAdapter | None],
        prompts: list[list[int]],
        params: list[SamplingParams],
        mix: bool = True,
    ) -> list[LiveRow]:
        """Admit rows (a reference, its resolved adapter or None for the base, prompt token ids and settings
        each): make their adapters resident, pin them and prefill the rows into their running batch.

        ``mix``: rows of different mixable adapters share a batch (off: one batch per adapter). Returns one
        LiveRow per row, in order. Raises what SlotPool.ensure_resident and the prefill raise (ConfigError for
        an adapter of another peft type, too many adapters, an empty prompt); then no row is admitted.
        """
        rows = [LiveRow(ref, a, ids, p, _batch_of(a, mix)) for ref, a, ids, p in zip(refs, adapters, prompts, params)]
        pinned: list[LiveRow] = []
        try:
            with self._lock:
                keys = {a.key for a in adapters if a is not None}
                slots = []
                for row in rows:
                    slots.append(self._pin(row, keys))
                    pinned.append(row)
                for batch in dict.fromkeys(row.batch for row in rows):
                    mine = [(row, slot) for row, slot in zip(rows, slots) if row.batch == batch]
                    if batch.startswith(_PROMPT_LEARNING):
                        self._generate_prompt_learning(mine)
                    else:
                        self._prefill(batch, mine)
        except BaseException:
            self._remove(rows)
            self._finished = [e for e in self._finished if e.row not in rows]
            self._release(pinned)
            raise
        self._release([row for row in rows if row.batch.startswith(_PROMPT_LEARNING)])  # done already
        return rows

    def step(self) -> list[RowEvent]:
        """One token for every running row (one forward pass per running batch, each under the lock).

        Returns the events of this step: a token per row, DecodedRows of the rows that finished (they left
        their batch, their adapters unpinned), errors of the rows whose batch failed (they left too).
        """
        events, self._finished = self._finished, []
        for batch in list(self._batches):
            state, rows = self._batches[batch], self._rows[batch]
            try:
                with self._lock:
                    stepped = state.step(self._forward)
            except Exception as err:  # noqa: BLE001 - the batch's rows fail; the others go on
                failed = list(rows)
                self._drop_batch(batch)
                self._release(failed)
                events.extend(RowEvent(row, error=err) for row in failed)
                continue
            done = []
            for row, token, result, logprobs in stepped:
                events.append(RowEvent(row, token, result, logprobs=logprobs))
                if result is not None:
                    done.append(row)
                    del rows[row]
            self._release(done)
            if not rows:
                self._drop_batch(batch)
        return events

    def cancel(self, rows: list[LiveRow]) -> None:
        """Remove ``rows`` from their batches and the KV cache, unpinning their adapters; finished or unknown
        rows are ignored."""
        self._finished = [e for e in self._finished if e.row not in rows]  # prompt learning: unpinned already
        self._release(self._remove(rows))

    # ------------------------------------------------------------------ internals
    def _pin(self, row: LiveRow, keys: set[str]) -> str:
        """Make the row's adapter resident (evicting none of ``keys`` or of the running rows'), pin it, and
        return its peft adapter name (PEFT_BASE for the base)."""
        if row.adapter is None:
            return PEFT_BASE
        entry = self._pool.ensure_resident(row.adapter, row.ref, keys)
        entry.uses += 1
        self._pool.pin(row.adapter.key)
        return entry.slot

    def _remove(self, rows: list[LiveRow]) -> list[LiveRow]:
        """Take ``rows`` out of their running batches (and KV caches); returns those that were there."""
        gone = []
        with self._lock:
            for row in rows:
                if row in self._rows.get(row.batch, {}):
                    del self._rows[row.batch][row]
                    self._batches[row.batch].remove({row})
                    gone.append(row)
                    if not self._rows[row.batch]:
                        self._drop_batch(row.batch)
        return gone

    def _release(self, rows: list[LiveRow]) -> None:
        """Unpin the adapters of rows that left (an unload waiting for the last of them happens now)."""
        with self._lock:
            for row in rows:
                if row.adapter is not None:
                    self._pool.unpin(row.adapter.key)

    def _prefill(self, batch: str, rows: list[tuple[LiveRow, str]]) -> None:
        state = self._batches.get(batch) or DecodeState(
            self.tokenizer, self.stop_token_ids, self._pad_id, self.device, self.prefix_cache
        )
        state.add(
            self._forward,
            [r for r, _ in rows],
            [r.prompt_ids for r, _ in rows],
            [r.params for r, _ in rows],
            [slot for _, slot in rows],
            prefix_owners(self._pool, [r.adapter for r, _ in rows]),
        )
        self._batches[batch] = state
        self._rows.setdefault(batch, {}).update(rows)

    def _generate_prompt_learning(self, rows: list[tuple[LiveRow, str]]) -> None:
        """Prompt-learning rows: generated whole now (virtual tokens live inside peft's generate)."""
        for row, slot in rows:
            self._layers.activate(slot)
            done = generate_prompt_learning(
                self._layers.peft, self.tokenizer, row.prompt_ids, row.params, self.stop_token_ids, self.device
            )
            self._finished.append(RowEvent(row, None, done))

    def _forward(self, adapter_names: list[str] | None = None, **kwargs):
        """The model call of a DecodeState: the layers pointed at its rows' adapters, mixed names when they differ."""
        forward, names = forward_for(self._layers, adapter_names or [PEFT_BASE] * kwargs["input_ids"].shape[0])
        if names is None:
            return forward(**kwargs)
        key = (tuple(names), self._pool.stats.loads, self._pool.stats.unloads)
        if key != self._mixed_key:  # other rows: stack again; a slot loaded, refilled or freed: look weights up again
            self._layers.mixed.clear(adapters=self._mixed_key is None or key[1:] != self._mixed_key[1:])
            self._mixed_key = key
        return forward(adapter_names=names, **kwargs)

    def _drop_batch(self, batch: str) -> None:
        self._batches.pop(batch, None)
        self._rows.pop(batch, None)


def prefix_owners(pool: SlotPool, adapters: list[ResolvedAdapter | None]) -> list[Hashable]:
    """Per row, whose weights make its keys and values (the prefix cache's owner): the base's, or the current
    load of its (resident) adapter."""
    return [_BASE_OWNER if a is None else pool.resident[a.key].owner for a in adapters]


def _batch_of(adapter: ResolvedAdapter | None, mix: bool = True) -> str:
    """The running batch a row of ``adapter`` joins: the mixed one, its adapter's own, or prompt learning's."""
    if adapter is None:
        return _MIXED if mix else "base"
    if adapter.is_prompt_learning:
        return _PROMPT_LEARNING + adapter.key
    return _MIXED if (mix and adapter.mixable) else f"adapter:{adapter.key}"
