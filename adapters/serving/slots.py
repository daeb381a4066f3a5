"""The slot pool: which adapters are resident, in LRU order, and the pooled layers of evicted ones.

A slot is a peft adapter name (``a0``, ``a1``, ...) with its layers. At most ``capacity`` slots
exist, resident or pooled. Evicting or unloading an adapter keeps its slot's layers allocated
(pooled); the next adapter with the same config signature is loaded into them (a file read or
a remap, see adapters.serving.slot_buffers) instead of peft building new layers. A pooled slot
of another shape is deleted to make room. Adapters in use by rows of the running decode batch
(``pin``) are never evicted; unloading one waits until its last row leaves (``unpin``).
Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.constants import ADAPTER_WEIGHTS
from adapters.errors import ConfigError
from adapters.serving.peft_layers import PeftLayers
from adapters.serving.resolver import ResolvedAdapter
from adapters.serving.slot_buffers import SlotBuffers

_LOAD_IDS = itertools.count()


@dataclass
class ResidentAdapter:
    """A loaded adapter: its peft adapter name (``slot``), when (``loaded_at``, epoch seconds) and how
    long (``load_seconds``) it took to load, how many batch passes used it, and the references that named it."""

    slot: str  # the peft adapter name
    adapter: ResolvedAdapter
    loaded_at: float
    load_seconds: float
    uses: int = 0
    refs: set[str] = field(default_factory=set)
    # Unique per load: the owner of this load's prompt prefixes in the prefix cache (a reload, or another
    # adapter refilled into the same slot, is another owner, so no keys and values outlive their weights).
    load_id: int = field(default_factory=lambda: next(_LOAD_IDS))

    def summary(self) -> dict:
        """A JSON-ready description (folder key, slot, references, name, version, method, labels, uses)."""
        return {
            "key": self.adapter.key,
            "slot": self.slot,
            "refs": sorted(self.refs),
            "name": self.adapter.manifest.get("name"),
            "version": self.adapter.manifest.get("version"),
            "method": self.adapter.method,
            "mixable": self.adapter.mixable,
            "labels": self.adapter.labels(),
            "uses": self.uses,
            "load_seconds": round(self.load_seconds, 4),
        }

    @property
    def owner(self) -> tuple[str, int]:
        """Whose keys and values a row of this adapter makes (adapters.modeling.prefix_cache): this load's."""
        return (self.adapter.key, self.load_id)


@dataclass
class EngineStats:
    """Counters of the engine's residency since it started (``last_load_seconds``: the latest load's wall time)."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    unloads: int = 0
    last_load_seconds: float = 0.0


class SlotPool:
    """Resident adapters (LRU) and pooled slots of ``layers``' PeftModel, at most ``capacity`` slots in all.

    ``stats`` is updated in place (hits, misses, loads, evictions).
    """

    def __init__(self, layers: PeftLayers, capacity: int, stats: EngineStats):
        self.layers = layers
        self.capacity = capacity
        self.stats = stats
        self.buffers = SlotBuffers(layers)
        self.resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # key -> resident, LRU order
        self.free: dict[str, str] = {}  # pooled slot -> config signature
        self._signature: dict[str, str] = {}  # slot -> config signature
        self._next_slot = 0
        self.in_use: Counter[str] = Counter()  # key -> running decode rows that use it: never evicted
        self.unload_after: set[str] = set()  # keys unloaded while in use: evicted when their last row leaves
        # Called with each entry that stops being resident (evicted or unloaded): the engine forgets that load's
        # prompt prefixes, which no later row can use.
        self.on_evict: Callable[[ResidentAdapter], None] | None = None

    def slots(self) -> list[str]:
        """The resident adapters' slots, least recently used first."""
        return [e.slot for e in self.resident.values()]

    def hit(self, key: str, ref: str) -> ResidentAdapter | None:
        """The resident entry of folder ``key`` (now the most recently used, ``ref`` recorded), or None."""
        entry = self.resident.get(key)
        if entry is not None:
            self.unload_after.discard(key)  # asked for again: stays
            self.stats.hits += 1
            self.resident.move_to_end(key)
            entry.refs.add(ref)
        return entry

    def ensure_resident(self, adapter: ResolvedAdapter, ref: str, pinned: set[str]) -> ResidentAdapter:
        """Make ``adapter`` resident (named by ``ref``) and return its entry. Evicts the least recently
        used adapter whose key is not in ``pinned`` when the pool is full.

        Raises ConfigError when every resident adapter is pinned, or for another peft type.
        """
        entry = self.hit(adapter.key, ref)
        if entry is not None:
            return entry
        self.stats.misses += 1
        self._check_peft_type(adapter, pinned)
        t0 = time.perf_counter()
        if len(self.resident) >= self.capacity and self._compatible_free(adapter) is None:
            self.evict(self._lru_victim(pinned))  # its slot may fit the new adapter
        slot = self._compatible_free(adapter)
        if slot is not None:
            if self.buffers.refill(slot, adapter.path / ADAPTER_WEIGHTS, adapter.immutable):
                del self.free[slot]
            else:
                self._delete_slot(slot)
                slot = None
        if slot is None:
            slot = self._new_slot(adapter, pinned)
        seconds = time.perf_counter() - t0
        entry = ResidentAdapter(slot=slot, adapter=adapter, loaded_at=time.time(), load_seconds=seconds, refs={ref})
        self.resident[adapter.key] = entry
        self.stats.loads += 1
        self.stats.last_load_seconds = seconds
        return entry

    def _new_slot(self, adapter: ResolvedAdapter, pinned: set[str]) -> str:
        """Make room (pooled slots first, then the LRU adapter) and let peft build a new slot for ``adapter``."""
        while len(self.resident) + len(self.free) >= self.capacity:
            if self.free:
                self._delete_slot(next(iter(self.free)))
            else:
                self.evict(self._lru_victim(pinned))
                self._delete_slot(next(iter(self.free)))
        slot = f"a{self._next_slot}"
        self._next_slot += 1
        self.layers.attach(adapter.path, slot, adapter.num_labels, self.slots())
        self._signature[slot] = adapter.signature
        if not adapter.is_prompt_learning:
            self.buffers.flatten(slot, adapter.path / ADAPTER_WEIGHTS, adapter.immutable)
        return slot

    def pin(self, key: str) -> None:
        """Count one more running row of the resident adapter ``key``: it stays resident, in its slot."""
        self.in_use[key] += 1

    def unpin(self, key: str) -> None:
        """One running row of ``key`` left; the last one carries out an unload that waited for it."""
        self.in_use[key] -= 1
        if self.in_use[key] > 0:
            return
        del self.in_use[key]
        if key in self.unload_after:
            self.unload_after.discard(key)
            if key in self.resident:
                self.evict(key)
                self.stats.unloads += 1

    def unload(self, key: str) -> bool:
        """Unload the resident adapter ``key`` now, or when its last running row leaves. False if not resident."""
        if key not in self.resident:
            return False
        if key in self.in_use:
            self.unload_after.add(key)
            return True
        self.evict(key)
        self.stats.unloads += 1
        return True

    def _lru_victim(self, pinned: set[str]) -> str:
        victim = next((k for k in self.resident if k not in pinned and k not in self.in_use), None)
        if victim is None:
            raise ConfigError(f"a batch needs more than capacity={self.capacity} adapters at once")
        return victim

    def _check_peft_type(self, adapter: ResolvedAdapter, pinned: set[str]) -> None:
        # One PeftModel holds adapters of one peft type (LoRA and DoRA share LORA).
        if self.layers.peft is None:
            return
        current = self.layers.peft_type()
        if current == adapter.peft_type:
            return
        if pinned or self.resident:
            raise ConfigError(
                f"adapter {adapter.manifest.get('name') or adapter.path} uses peft type {adapter.peft_type}, "
                f"but the resident adapters use {current}; one engine serves one peft type at a time "
                "(unload the others first, or start another engine)"
            )
        self.trim()  # nothing resident: drop the pooled slots and start a fresh wrapper

    def _compatible_free(self, adapter: ResolvedAdapter) -> str | None:
        """A pooled slot whose layers have the adapter's shape (never for prompt learning)."""
        if adapter.is_prompt_learning:
            return None
        return next((slot for slot, sig in self.free.items() if sig == adapter.signature), None)

    def _delete_slot(self, slot: str) -> None:
        """Delete a pooled slot's layers."""
        del self.free[slot]
        self.buffers.drop(slot)
        self._signature.pop(slot, None)
        self.layers.delete(slot, survivors=self.slots() or list(self.free))

    def evict(self, key: str) -> None:
        """Make the adapter of folder ``key`` non-resident; its slot joins the pool for the next adapter
        of its shape."""
        entry = self.resident.pop(key)
        if self.on_evict is not None:
            self.on_evict(entry)
        if self.layers.active_slot == entry.slot:
            self.layers.activate(next(iter(self.slots()), None))
        self.free[entry.slot] = self._signature.get(entry.slot, "")
        self.stats.evictions += 1

    def trim(self) -> int:
        """Delete every pooled (non-resident) slot, freeing its memory. Returns how many were deleted."""
        n = len(self.free)
        for slot in list(self.free):
            self._delete_slot(slot)
        return n
