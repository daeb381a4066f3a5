"""Plan a batch whose rows may use different adapters: which rows share a forward pass, and set each pass up.

Rows of mixable adapters (the LoRA family; the registry's ``mixable`` flag) and rows of the
bare base share passes, through peft's per-row ``adapter_names``; a classifier's rows mix only
with rows of the same label count (one logits width per pass). Each non-mixable adapter gets
a pass of its own. A pass holds at most ``capacity`` distinct adapters, so all of them can be
resident at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapters.constants import PEFT_BASE
from adapters.serving.peft_layers import PeftLayers
from adapters.serving.resolver import BASE, ResolvedAdapter
from adapters.serving.slots import SlotPool

Pass = tuple[bool, list[int]]  # (mixed, row indices)


def resolve_rows(refs: list[str], adapter_of: Callable[[str], ResolvedAdapter]) -> list[ResolvedAdapter | None]:
    """What each row's reference points at (None for ``base``), looking each distinct reference up once
    with ``adapter_of`` (the engine's: a resident adapter is found without touching its files)."""
    found: dict[str, ResolvedAdapter | None] = {}
    out = []
    for ref in refs:
        if ref not in found:
            found[ref] = None if ref == BASE else adapter_of(ref)
        out.append(found[ref])
    return out


def plan_passes(adapters: list[ResolvedAdapter | None], task: str, capacity: int) -> list[Pass]:
    """Split row indices into passes: (mixed, rows). Mixable rows (and base rows) share passes
    of at most ``capacity`` distinct adapters; each non-mixable adapter gets its own pass."""
    passes: list[Pass] = []
    mix_groups: dict[Any, list[int]] = {}
    solo: dict[str, list[int]] = {}
    for i, a in enumerate(adapters):
        if a is None or a.mixable:
            group = a.num_labels if (a is not None and task == "sequence-classification") else None
            mix_groups.setdefault(group, []).append(i)
        else:
            solo.setdefault(a.key, []).append(i)
    for rows in mix_groups.values():
        chunk: list[int] = []
        keys: set[str] = set()
        for i in rows:
            key = adapters[i].key if adapters[i] is not None else None
            if key is not None and key not in keys and len(keys) >= capacity:
                passes.append((True, chunk))
                chunk, keys = [], set()
            if key is not None:
                keys.add(key)
            chunk.append(i)
        if chunk:
            passes.append((True, chunk))
    passes.extend((False, rows) for rows in solo.values())
    return passes


def prepare_pass(
    pool: SlotPool, layers: PeftLayers, refs: list[str], adapters: list[ResolvedAdapter | None], rows: list[int]
) -> tuple[Callable, list[str] | None]:
    """Make the pass's adapters resident and point the layers at them. Call under the engine's lock.

    Returns the model call of the pass (see PeftLayers.forward_of) and the per-row peft adapter
    names for a mixed pass, or None when the pass runs one adapter (activated) or only the base.
    """
    pinned = {adapters[i].key for i in rows if adapters[i] is not None}
    slots = []
    for i in rows:
        a = adapters[i]
        if a is None:
            slots.append(PEFT_BASE)
            continue
        entry = pool.ensure_resident(a, refs[i], pinned)
        entry.uses += 1
        slots.append(entry.slot)
    return forward_for(layers, slots)


def forward_for(layers: PeftLayers, slots: list[str]) -> tuple[Callable, list[str] | None]:
    """Point the layers at the resident adapters of a pass's rows (``slots``: one peft adapter name or
    PEFT_BASE per row) and return the model call with the per-row names to give it (None: one adapter,
    activated, or only the base). Call under the engine's lock."""
    distinct = set(slots)
    if layers.peft is None:
        return layers.forward_of(layers.base_model), None  # only base rows and no adapter loaded: the plain model
    if distinct == {PEFT_BASE} and layers.has_prompt_learning():
        # prompt learning adds its virtual tokens inside the PeftModel's forward; its base is untouched
        return layers.forward_of(layers.peft.get_base_model()), None
    if len(distinct) == 1:
        only = slots[0]
        layers.activate(None if only == PEFT_BASE else only)
        return layers.forward_of(layers.peft), None
    # Mixed pass: peft falls back to the base for a ModulesToSaveWrapper whose active adapter it
    # does not hold, so point the layers at an adapter of this pass.
    layers.activate(next(s for s in slots if s != PEFT_BASE))
    return layers.forward_of(layers.peft), slots
