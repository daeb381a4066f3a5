"""Serve many adapters from one loaded base: an LRU of resident adapters and mixed-adapter batches.

The base loads once. Adapters load by reference (a store reference ``name``, ``name@3``,
``name@prod``, or an adapter folder) under private peft adapter names (``a0``, ``a1``, ...),
up to ``capacity`` at a time; the least recently used one is deleted to make room.

A batch may mix rows of different adapters (and the bare base, ``"base"``). Rows whose
adapters' method is mixable (the LoRA family; the registry's ``mixable`` flag) share one
forward pass through peft's per-row ``adapter_names``; rows of other methods run in one
pass per adapter. Results come back in request order either way.

One lock guards the model: a load, an unload and a forward pass never overlap, so no request
sees a half-loaded adapter. Reading and verifying adapter files happens outside the lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters.serving import file_mapping
from adapters.config import ModelConfig, QuantizationConfig
from adapters.errors import ConfigError, StoreError
from adapters.serving.mixed_lora import MixedLoraForward
from adapters.store.verified import folder_stamp, verify_folder_cached
from adapters.modeling.generation import DecodedRow, SamplingParams, decode_batch, encode_prompt, eos_ids, mean_token_confidence
from adapters.constants import MANIFEST, PEFT_BASE, TASKS

log = logging.getLogger(__name__)

BASE = "base"  # the reference that means "no adapter"


# ------------------------------------------------------------------ requests and results
@dataclass
class GenerationRequest:
    """One row to generate for. Give ``prompt`` (text) or ``messages`` (chat)."""

    adapter: str = BASE
    prompt: str | None = None
    messages: list[dict] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    raw: bool = False  # True: do not apply the adapter's training prompt format to plain text


@dataclass
class GenerationResult:
    adapter: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    confidence: float | None = None  # geometric mean probability of the emitted tokens


@dataclass
class ClassificationRequest:
    adapter: str
    text: str


@dataclass
class ClassificationResult:
    adapter: str
    label: str
    label_id: int
    confidence: float
    probabilities: dict[str, float]
    logits: list[float]
    input_tokens: int


@dataclass
class ResolvedAdapter:
    """What a reference points to, before it is loaded."""

    key: str  # the real folder path: two references to the same version share one slot
    path: Path
    manifest: dict
    method: str
    mixable: bool
    is_prompt_learning: bool
    peft_type: str
    num_labels: int | None
    signature: str  # equal signatures: identically shaped layers (a pooled slot fits)
    immutable: bool = False  # a published store version: its files never change in place


@dataclass
class ResidentAdapter:
    slot: str  # the peft adapter name
    adapter: ResolvedAdapter
    loaded_at: float
    load_seconds: float
    uses: int = 0
    refs: set[str] = field(default_factory=set)


@dataclass
class EngineStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    unloads: int = 0
    last_load_seconds: float = 0.0


# ------------------------------------------------------------------ the engine
class InferenceEngine:
    """One base model, many adapters. Thread-safe."""

    def __init__(
        self,
        base: str | ModelConfig,
        task: str = "causal-lm",
        quantization: QuantizationConfig | dict | int | None = None,
        capacity: int = 8,
        store: Any = None,
        dtype: str = "float32",
        pooling: str = "auto",
        device: str | None = None,
        max_input_tokens: int | None = None,
        allow_base_mismatch: bool = False,
        fast_mixed_lora: bool = True,
    ):
        from adapters.modeling.backbone import allow_cpu_4bit_packing, load_backbone, load_tokenizer

        if task not in TASKS:
            raise ConfigError(f"task {task!r} is not served; valid tasks: {', '.join(TASKS)}")
        if capacity < 1:
            raise ConfigError(f"capacity must be >= 1 (got {capacity})")
        if isinstance(quantization, int):
            quantization = QuantizationConfig(bits=quantization)
        elif isinstance(quantization, dict):
            quantization = QuantizationConfig(**quantization)
        self.model_config = base if isinstance(base, ModelConfig) else ModelConfig(name=str(base), dtype=dtype, quantization=quantization, pooling=pooling)
        self.base_name = self.model_config.name
        self.task = task
        self.capacity = capacity
        self.store = store
        self.allow_base_mismatch = allow_base_mismatch
        self.stats = EngineStats()
        self._lock = threading.RLock()
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # key -> resident, LRU order
        self._next_slot = 0
        self._tuner_layers: list[torch.nn.Module] = []
        self._active_slot: str | None = None
        self._pinned_keys: dict[str, str] = {}
        self._free: dict[str, str] = {}  # pooled slot -> config signature
        self._slot_signature: dict[str, str] = {}
        self._slot_params: dict[str, dict[str, torch.Tensor]] = {}
        self._layer_dicts: list[tuple[dict, bool]] = []
        self._verified: dict[str, list] = {}  # folder -> the folder_stamp it passed verification with
        self._resolved: dict[str, tuple[list, ResolvedAdapter]] = {}
        self._pass_model = None
        self._route_rows = False  # every adapter layer is a wrapped LoRA Linear (see MixedLoraForward)
        # slot -> (file header, flat weight buffer, the file mapping behind the buffer or None)
        self._slot_layout: dict[str, tuple[bytes, torch.Tensor, Any]] = {}
        self._mixed = MixedLoraForward()
        self._mixed.enabled = fast_mixed_lora

        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(self.model_config)
        # A classifier's head is per adapter (peft modules_to_save); the base's own head is a placeholder.
        label2id = {"LABEL_0": 0, "LABEL_1": 1} if task == "sequence-classification" else None
        model = load_backbone(self.model_config, task, label2id)
        allow_cpu_4bit_packing(model, True)  # serving never trains: bitsandbytes' fast CPU kernel is fine
        if device is None:
            device = "cuda" if torch.cuda.is_available() and self.model_config.quantization is None else None
        if device is not None and self.model_config.quantization is None:
            model.to(device)
        self.device = next(model.parameters()).device
        model.eval()
        self._base_model = model
        self._peft = None  # the PeftModel, once an adapter is loaded
        self.base_load_seconds = time.perf_counter() - t0
        self.max_input_tokens = max_input_tokens or int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self._stop_ids = eos_ids(model, self.tokenizer) if task == "causal-lm" else set()
        self._base_fingerprint: str | None = None

    # ------------------------------------------------------------------ references
    def store_of(self):
        """The adapter store that resolves references (the default store unless one was given)."""
        if self.store is None or isinstance(self.store, (str, Path)):
            from adapters.store.store import AdapterStore

            self.store = AdapterStore(self.store)
        return self.store

    def key_of(self, ref: str) -> str:
        """The folder a reference points at now (cheap: no checksums). Tags may move between calls."""
        from adapters.store.store import is_path_ref

        if not isinstance(ref, str) or not ref.strip():
            raise ConfigError("adapter reference must be a non-empty string")
        if ref == BASE:
            raise ConfigError("'base' is the bare base model, not an adapter")
        if is_path_ref(ref):
            return str(Path(ref).expanduser().resolve())
        return str(self.store_of().locate(ref).path.resolve())

    def resolve(self, ref: str) -> ResolvedAdapter:
        """Resolve a reference, verify its files' checksums and its base model, read what serving needs.

        Raises ConfigError, StoreError or BaseMismatchError (a StoreError) naming the problem.
        """
        from adapters.store.manifest import read_manifest
        from adapters.methods.base import method_of_config
        from adapters.store.store import check_publishable_files, is_path_ref

        key = self._cached_key(ref)  # validates the reference
        stamp = folder_stamp(key)
        cached = self._resolved.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]  # verified before, and no file changed since
        if is_path_ref(ref):
            path, manifest = self.store_of().resolve(ref, verify=False)
            path = Path(path)
        else:  # key is the version folder the reference located
            path, manifest = Path(key), read_manifest(key)
        check_publishable_files(path)  # safetensors present, nothing that unpickles
        self._verify_once(ref, key, manifest, stamp)
        self._check_base(ref, path, manifest)
        manifest = dict(manifest or {})
        cfg = json.loads((path / "adapter_config.json").read_text())
        method = method_of_config(cfg, path)
        from adapters.methods.peft_base import PeftMethod

        if not isinstance(method, PeftMethod):
            raise ConfigError(
                f"adapter {ref!r} uses method {method.name!r}, which changes the base model's own weights; "
                "it cannot share a base with other adapters: load it as its own model instead"
            )
        task = manifest.get("task")
        if task and task != self.task:
            raise ConfigError(f"adapter {ref!r} was trained for task {task!r}; this engine serves {self.task!r}")
        peft_type = str(cfg.get("peft_type", "")).upper()
        num_labels = None
        if self.task == "sequence-classification":
            labels = manifest.get("labels")
            num_labels = self._head_size(path) or (len(labels) if labels else None)
        resolved = ResolvedAdapter(
            key=key,
            path=path,
            manifest=manifest,
            method=method.name,
            mixable=bool(method.mixable),
            is_prompt_learning=peft_type in _PROMPT_LEARNING,
            peft_type=peft_type,
            num_labels=num_labels,
            signature=_config_signature(cfg),
            immutable=not is_path_ref(ref),
        )
        self._resolved[resolved.key] = (stamp, resolved)
        return resolved

    def _verify_once(self, ref: str, key: str, manifest: dict | None, stamp: list) -> None:
        """Check every file against the manifest's sha256 unless this process or this machine already
        verified the same files (see adapters.store.verified: any write to a file makes it hash again)."""
        if manifest is None:
            return  # no checksums to check; _check_base decides whether it may load at all
        if self._verified.get(key) == stamp:
            return
        problems = verify_folder_cached(key, stamp=stamp)
        if problems:
            raise StoreError(f"adapter {ref} failed verification, refusing to load it: {'; '.join(problems)}")
        self._verified[key] = stamp

    def base_fingerprint(self) -> str | None:
        """Fingerprint of the base model's files (None for a hub id that is not a local folder)."""
        if self._base_fingerprint is None:
            from adapters.modeling.builtins import resolve_model
            from adapters.store.fingerprint import fingerprint_model

            where = Path(resolve_model(self.model_config.name))
            self._base_fingerprint = fingerprint_model(where) if where.is_dir() else ""
        return self._base_fingerprint or None

    def _check_base(self, ref: str, path: Path, manifest: dict | None) -> None:
        """Refuse an adapter trained on another base (the store's check), unless allowed."""
        from adapters.store.store import check_base

        if manifest is None:
            if not self.allow_base_mismatch:
                raise StoreError(
                    f"adapter {ref!r} ({path}) has no manifest.json, so its base model cannot be checked; "
                    "publish it with a manifest, or start the engine with allow_base_mismatch=True"
                )
            log.warning("serving %s without a manifest: base model unchecked", path)
            return
        check_base(manifest, self.base_fingerprint(), allow_mismatch=self.allow_base_mismatch, base_name=self.base_name)

    def _head_size(self, path: Path) -> int | None:
        from safetensors import safe_open

        from adapters.methods.peft_base import head_module_names

        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            return None
        heads = head_module_names(self._base_model)
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():
                for head in heads:
                    if key.endswith(f"{head}.weight") or key.endswith(f"{head}.modules_to_save.weight"):
                        return int(fh.get_slice(key).get_shape()[0])
        return None

    # ------------------------------------------------------------------ residency
    def load(self, ref: str) -> ResidentAdapter:
        """Make an adapter resident (a cache hit costs a dict look-up). Returns its resident entry."""
        adapter = self.resolve(ref)
        with self._lock:
            return self._ensure_resident(adapter, ref, pinned=set())

    def unload(self, ref: str) -> bool:
        """Delete an adapter from memory. Returns False if it was not resident."""
        key = self._cached_key(ref)
        with self._lock:
            if key not in self._resident:
                return False
            self._evict(key)
            self.stats.unloads += 1
            return True

    def _cached_key(self, ref: str) -> str:
        # A folder path or name@<version> always means the same files (store versions are
        # immutable), so its key is remembered; a bare name or a tag is looked up each time.
        key = self._pinned_keys.get(ref)
        if key is None:
            key = self.key_of(ref)
            if _is_pinned_ref(ref):
                if len(self._pinned_keys) > 4096:
                    self._pinned_keys.clear()
                self._pinned_keys[ref] = key
        return key

    def activate(self, ref: str) -> str:
        """Make ``ref`` the active adapter for single-adapter calls; ``base`` disables adapters.

        A resident adapter costs a dict look-up and one attribute per adapted layer; otherwise it
        is loaded first. Returns the peft adapter name.
        """
        if ref == BASE:
            with self._lock:
                self._activate_slot(None)
            return PEFT_BASE
        key = self._cached_key(ref)
        with self._lock:
            entry = self._resident.get(key)
            if entry is not None:
                self.stats.hits += 1
                self._resident.move_to_end(key)
                entry.refs.add(ref)
                self._activate_slot(entry.slot)
                return entry.slot
        adapter = self.resolve(ref)  # outside the lock: reading and hashing files
        with self._lock:
            entry = self._ensure_resident(adapter, ref, pinned=set())
            self._activate_slot(entry.slot)
            return entry.slot

    def resident(self) -> list[dict]:
        """Resident adapters, least recently used first."""
        with self._lock:
            return [
                {
                    "key": e.adapter.key,
                    "slot": e.slot,
                    "refs": sorted(e.refs),
                    "name": e.adapter.manifest.get("name"),
                    "version": e.adapter.manifest.get("version"),
                    "method": e.adapter.method,
                    "mixable": e.adapter.mixable,
                    "labels": self._labels(e),
                    "uses": e.uses,
                    "load_seconds": round(e.load_seconds, 4),
                }
                for e in self._resident.values()
            ]

    def _ensure_resident(self, adapter: ResolvedAdapter, ref: str, pinned: set[str]) -> ResidentAdapter:
        entry = self._resident.get(adapter.key)
        if entry is not None:
            self.stats.hits += 1
            self._resident.move_to_end(adapter.key)
            entry.refs.add(ref)
            return entry
        self.stats.misses += 1
        self._check_peft_type(adapter, pinned)
        t0 = time.perf_counter()
        signature = adapter.signature
        if len(self._resident) >= self.capacity and self._compatible_free(signature, adapter) is None:
            self._evict(self._lru_victim(pinned))  # its slot may fit the new adapter
        slot = self._compatible_free(signature, adapter)
        if slot is not None and not self._refill(slot, adapter):
            self._delete_slot(slot)
            slot = None
        if slot is None:
            while len(self._resident) + len(self._free) >= self.capacity:
                if self._free:
                    self._delete_slot(next(iter(self._free)))
                else:
                    self._evict(self._lru_victim(pinned))
                    self._delete_slot(next(iter(self._free)))
            slot = f"a{self._next_slot}"
            self._next_slot += 1
            self._attach(adapter, slot)
            self._slot_signature[slot] = signature
            if not adapter.is_prompt_learning:
                self._flatten_slot(slot, adapter.path / "adapter_model.safetensors", adapter.immutable)
        seconds = time.perf_counter() - t0
        entry = ResidentAdapter(slot=slot, adapter=adapter, loaded_at=time.time(), load_seconds=seconds, refs={ref})
        self._resident[adapter.key] = entry
        self.stats.loads += 1
        self.stats.last_load_seconds = seconds
        return entry

    def _lru_victim(self, pinned: set[str]) -> str:
        victim = next((k for k in self._resident if k not in pinned), None)
        if victim is None:
            raise ConfigError(f"a batch needs more than capacity={self.capacity} adapters at once")
        return victim

    def _check_peft_type(self, adapter: ResolvedAdapter, pinned: set[str]) -> None:
        # One PeftModel holds adapters of one peft type (LoRA and DoRA share LORA).
        if self._peft is None:
            return
        current = str(getattr(self._peft, "peft_type", "")).split(".")[-1].upper()
        if current == adapter.peft_type:
            return
        if pinned or self._resident:
            raise ConfigError(
                f"adapter {adapter.manifest.get('name') or adapter.path} uses peft type {adapter.peft_type}, "
                f"but the resident adapters use {current}; one engine serves one peft type at a time "
                "(unload the others first, or start another engine)"
            )
        self.trim()  # nothing resident: drop the pooled slots and start a fresh wrapper

    def _attach(self, adapter: ResolvedAdapter, slot: str) -> None:
        """A new peft adapter: peft builds its layers (the slow path, ~0.1-1 s on SmolLM2)."""
        from peft import PeftModel

        if adapter.num_labels is not None:
            self._resize_heads(adapter.num_labels)
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(
                self._base_model, str(adapter.path), adapter_name=slot, is_trainable=False, low_cpu_mem_usage=True
            )
        else:
            self._peft.load_adapter(str(adapter.path), adapter_name=slot, is_trainable=False, low_cpu_mem_usage=True)
        self._peft.eval()
        self._refresh_tuner_layers()
        self._activate_slot(self._active_slot if self._active_slot in self._slots() else slot)

    # Pooled slots: an evicted or unloaded adapter's layers stay allocated (within capacity), and the
    # next adapter of the same shape is copied into them: a load then costs reading its file.
    def _compatible_free(self, signature: str, adapter: ResolvedAdapter) -> str | None:
        if adapter.is_prompt_learning:
            return None
        return next((slot for slot, sig in self._free.items() if sig == signature), None)

    def _refill(self, slot: str, adapter: ResolvedAdapter) -> bool:
        """Put the adapter's weights into a pooled slot; False if its tensors do not fit after all.

        A slot's weights live in one flat buffer laid out like its adapter file's data section, so
        an adapter whose file has the same header needs no per-tensor work: a store version's file
        is mapped over the buffer in place (no copy; see adapters.serving.file_mapping), any other file is
        read straight into it.
        """
        weights = adapter.path / "adapter_model.safetensors"
        layout = self._slot_layout.get(slot)
        if layout is not None:
            raw_header, flat, mapping = layout
            with open(weights, "rb", buffering=0) as fh:
                # Byte-equal headers: same tensors, shapes, dtypes and offsets (no JSON parse needed).
                if _read_header_bytes(fh) == raw_header:
                    if mapping is not None and adapter.immutable:
                        try:
                            mapping.remap(fh.fileno(), weights)
                        except OSError as err:
                            log.warning("slot %s: %s; rebuilding it", slot, err)
                            return False
                    elif fh.readinto(memoryview(flat.numpy())) != flat.numel():
                        raise StoreError(f"{weights}: file ended early")
                    del self._free[slot]
                    return True
        from safetensors import safe_open

        targets = self._slot_tensors(slot)
        with safe_open(str(weights), framework="pt") as fh:
            if set(fh.keys()) != set(targets):
                return False
            loaded = {key: fh.get_tensor(key) for key in targets}
        if any(loaded[k].shape != targets[k].shape for k in targets):
            return False  # e.g. a classification head of another size
        with torch.no_grad():
            for key, tensor in loaded.items():
                targets[key].copy_(tensor)
        del self._free[slot]
        return True

    def _slot_tensors(self, slot: str) -> dict[str, torch.Tensor]:
        """The slot's parameters under the key names of an adapter file (sharing their storage)."""
        tensors = self._slot_params.get(slot)
        if tensors is None:
            from peft.utils import get_peft_model_state_dict

            tensors = get_peft_model_state_dict(self._peft, adapter_name=slot)
            self._slot_params[slot] = tensors
        return tensors

    def _flatten_slot(self, slot: str, weights: Path, immutable: bool) -> None:
        """Move a new slot's parameters into one buffer laid out like ``weights``' data section:
        a private mapping of the file itself for a store version, else an allocated copy."""
        with open(weights, "rb") as fh:
            raw_header = _read_header_bytes(fh)
        header = _parse_header(raw_header, weights)
        targets = self._slot_tensors(slot)
        if set(header) != set(targets) or any(t.device.type != "cpu" for t in targets.values()):
            return
        data_start = 8 + len(raw_header)
        size = max(v["data_offsets"][1] for v in header.values())
        for key, meta in header.items():
            target = targets[key]
            if (_SAFETENSORS_DTYPES.get(meta["dtype"]) != target.dtype or list(meta["shape"]) != list(target.shape)
                    or (data_start + meta["data_offsets"][0]) % target.element_size()):
                return  # another dtype in memory than on disk: keep the per-tensor copy
        mapping = None
        if immutable and file_mapping.supported():
            try:
                mapping = file_mapping.FileMapping(weights, data_start + size)
            except OSError as err:
                log.info("slot %s: not mapped (%s); using a copy", slot, err)
        flat = mapping.tensor[data_start : data_start + size] if mapping is not None else torch.zeros(size, dtype=torch.uint8)
        views = {key: flat[m["data_offsets"][0] : m["data_offsets"][1]].view(targets[key].dtype).view(targets[key].shape)
                 for key, m in header.items()}
        by_ptr = {p.data_ptr(): p for p in self._peft.parameters()}
        with torch.no_grad():
            for key, view in views.items():
                if mapping is None or not torch.equal(view, targets[key]):  # equal: peft loaded this file
                    view.copy_(targets[key])
                param = by_ptr.get(targets[key].data_ptr())
                if param is None:
                    return
                param.data = view
                targets[key] = view
        self._slot_layout[slot] = (raw_header, flat, mapping)

    def _delete_slot(self, slot: str, pooled: bool = True) -> None:
        if pooled:
            del self._free[slot]
        self._slot_params.pop(slot, None)
        self._slot_signature.pop(slot, None)
        self._slot_layout.pop(slot, None)
        if self._resident or self._free:
            if self._active_slot in (None, slot):  # point peft at a survivor first: deleting the active one warns
                self._activate_slot(next(iter(self._slots() or list(self._free))))
            self._peft.delete_adapter(slot)
            self._refresh_tuner_layers()
        else:
            # peft keeps at least one adapter; drop the wrapper and restore the plain base instead.
            self._base_model = self._unwrap()
            self._peft = None
            self._tuner_layers = []
            self._active_slot = None

    def _unwrap(self):
        """The plain base model again, without any adapter layers."""
        if any(c.is_prompt_learning for c in self._peft.peft_config.values()):
            return self._peft.get_base_model()  # prompt learning never touched the base's modules
        return self._peft.unload()

    def _evict(self, key: str) -> None:
        """Make an adapter non-resident; its slot joins the pool for the next adapter of its shape."""
        entry = self._resident.pop(key)
        if self._active_slot == entry.slot:
            self._activate_slot(next(iter(self._slots()), None))
        self._free[entry.slot] = self._slot_signature.get(entry.slot, "")
        self.stats.evictions += 1

    def trim(self) -> int:
        """Free the memory of pooled (non-resident) slots. Returns how many were deleted."""
        with self._lock:
            n = len(self._free)
            for slot in list(self._free):
                self._delete_slot(slot)
            return n

    def _slots(self) -> list[str]:
        return [e.slot for e in self._resident.values()]

    def _refresh_tuner_layers(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self._tuner_layers = [m for m in self._peft.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        self._layer_dicts = [(m.__dict__, isinstance(m._active_adapter, list)) for m in self._tuner_layers]
        self._mixed.install(self._peft)
        self._route_rows = self._mixed.covers(self._tuner_layers)

    def _activate_slot(self, slot: str | None) -> None:
        """Point every adapter layer at ``slot`` (None: the bare base).

        peft's set_adapter also flips requires_grad on every adapter of every layer, which grows
        with the number of resident adapters; at inference only the active name matters, set
        straight in each layer's __dict__ (nn.Module.__setattr__ is ~10x slower).
        """
        if self._peft is None:
            return
        if slot is None:
            for d, _ in self._layer_dicts:
                d["_disable_adapters"] = True
            self._active_slot = None
            return
        listed = [slot]
        for d, is_list in self._layer_dicts:
            d["_active_adapter"] = listed if is_list else slot
            d["_disable_adapters"] = False
        if self._peft.peft_config[slot].is_prompt_learning:
            self._peft.set_adapter(slot)  # no tuner layers to walk: cheap
        else:
            self._peft.base_model.active_adapter = slot
        self._active_slot = slot

    def _labels(self, entry: ResidentAdapter) -> list[str] | None:
        labels = entry.adapter.manifest.get("labels")
        if labels:
            return list(labels)
        if entry.adapter.num_labels:
            return [f"LABEL_{i}" for i in range(entry.adapter.num_labels)]
        return None

    def _resize_heads(self, num_labels: int) -> None:
        """Give the placeholder head the adapter's label count, so peft's per-adapter copy matches its weights."""
        from peft.utils.other import ModulesToSaveWrapper

        from adapters.methods.peft_base import head_module_names

        root = self._base_model
        for name in head_module_names(root):
            module = root.get_submodule(name)
            holder = module
            current = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
            if not isinstance(current, torch.nn.Linear) or current.out_features == num_labels:
                continue
            fresh = torch.nn.Linear(current.in_features, num_labels, bias=current.bias is not None)
            fresh = fresh.to(device=current.weight.device, dtype=current.weight.dtype)
            if isinstance(holder, ModulesToSaveWrapper):
                holder.original_module = fresh
            else:
                parent_name, _, attr = name.rpartition(".")
                setattr(root.get_submodule(parent_name) if parent_name else root, attr, fresh)
        if hasattr(root, "config"):
            root.config.num_labels = num_labels

    def adapter_of(self, ref: str) -> ResolvedAdapter:
        """What a reference points at: a resident adapter's entry without touching its files, else resolve()."""
        key = self._cached_key(ref)
        with self._lock:
            entry = self._resident.get(key)
        return entry.adapter if entry is not None else self.resolve(ref)

    # ------------------------------------------------------------------ batches
    def _resolve_rows(self, refs: list[str]) -> list[ResolvedAdapter | None]:
        """What each row's reference points at; a resident adapter is found without touching its files."""
        found: dict[str, ResolvedAdapter | None] = {}
        out = []
        for ref in refs:
            if ref not in found:
                found[ref] = None if ref == BASE else self.adapter_of(ref)
            out.append(found[ref])
        return out

    def _plan(self, adapters: list[ResolvedAdapter | None]) -> list[tuple[bool, list[int]]]:
        """Split row indices into passes: (mixed, rows). Mixable rows (and base rows) share passes
        of at most ``capacity`` distinct adapters; each non-mixable adapter gets its own pass."""
        passes: list[tuple[bool, list[int]]] = []
        mix_groups: dict[Any, list[int]] = {}
        solo: dict[str, list[int]] = {}
        for i, a in enumerate(adapters):
            if a is None or a.mixable:
                group = a.num_labels if (a is not None and self.task == "sequence-classification") else None
                mix_groups.setdefault(group, []).append(i)
            else:
                solo.setdefault(a.key, []).append(i)
        for rows in mix_groups.values():
            chunk: list[int] = []
            keys: set[str] = set()
            for i in rows:
                key = adapters[i].key if adapters[i] is not None else None
                if key is not None and key not in keys and len(keys) >= self.capacity:
                    passes.append((True, chunk))
                    chunk, keys = [], set()
                if key is not None:
                    keys.add(key)
                chunk.append(i)
            if chunk:
                passes.append((True, chunk))
        passes.extend((False, rows) for rows in solo.values())
        return passes

    def _prepare_pass(self, refs: list[str], adapters: list[ResolvedAdapter | None], rows: list[int]):
        """Under the lock: make the pass's adapters resident; return the per-row peft adapter names
        (mixed) or None after activating the single adapter (or the base)."""
        pinned = {adapters[i].key for i in rows if adapters[i] is not None}
        slots = []
        for i in rows:
            a = adapters[i]
            if a is None:
                slots.append(PEFT_BASE)
                continue
            entry = self._ensure_resident(a, refs[i], pinned)
            entry.uses += 1
            slots.append(entry.slot)
        distinct = set(slots)
        if self._peft is None:
            self._pass_model = self._base_model  # only base rows and no adapter loaded: the plain model
            return None
        self._pass_model = self._peft
        if distinct == {PEFT_BASE} and any(c.is_prompt_learning for c in self._peft.peft_config.values()):
            # prompt learning adds its virtual tokens inside the PeftModel's forward; its base is untouched
            self._pass_model = self._peft.get_base_model()
            return None
        if len(distinct) == 1:
            only = slots[0]
            self._activate_slot(None if only == PEFT_BASE else only)
            return None
        # Mixed pass: peft falls back to the base for a ModulesToSaveWrapper whose active adapter it
        # does not hold, so point the layers at an adapter of this pass.
        self._activate_slot(next(s for s in slots if s != PEFT_BASE))
        return slots

    def _forward_fn(self):
        """The model call of the prepared pass (set by _prepare_pass, under the lock).

        With per-row adapter names it routes them through the wrapped LoRA layers when they
        cover the model, and through peft's ``adapter_names`` otherwise (heads, other methods).
        """
        model = self._pass_model
        if model is self._peft and self._route_rows and self._mixed.enabled:
            def forward(adapter_names=None, **kwargs):
                if adapter_names is None:
                    return model(**kwargs)
                return self._mixed.forward(model, adapter_names, **kwargs)

            return forward
        return model

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate for a batch of rows that may use different adapters. Results are in request order."""
        if self.task != "causal-lm":
            raise ConfigError(f"generate needs a causal-lm engine; this engine serves {self.task!r}")
        refs = [r.adapter or BASE for r in requests]
        adapters = self._resolve_rows(refs)
        prompts: list[list[int]] = []
        for req, a in zip(requests, adapters):
            spec = None if (req.raw or a is None) else a.manifest.get("prompt")
            ids = encode_prompt(self.tokenizer, req.prompt, req.messages, spec)
            if len(ids) + req.params.max_new_tokens > self.max_input_tokens:
                raise ConfigError(
                    f"prompt ({len(ids)} tokens) + max_new_tokens ({req.params.max_new_tokens}) exceeds the "
                    f"model's limit of {self.max_input_tokens} tokens"
                )
            prompts.append(ids)
        results: list[GenerationResult | None] = [None] * len(requests)
        for _, rows in self._plan(adapters):
            with self._lock:
                names = self._prepare_pass(refs, adapters, rows)
                is_prompt_learning = any(adapters[i] is not None and adapters[i].is_prompt_learning for i in rows)
                try:
                    if is_prompt_learning:
                        decoded = [self._generate_prompt_learning(prompts[i], requests[i].params) for i in rows]
                    else:
                        decoded = decode_batch(
                            self._forward_fn(), self.tokenizer, [prompts[i] for i in rows], [requests[i].params for i in rows],
                            self._stop_ids, adapter_names=names, device=self.device,
                        )
                finally:
                    self._mixed.clear()
            for i, d in zip(rows, decoded):
                results[i] = GenerationResult(
                    adapter=refs[i], text=d.text, token_ids=d.token_ids, finish_reason=d.finish_reason,
                    prompt_tokens=len(prompts[i]), completion_tokens=len(d.token_ids), confidence=d.confidence,
                )
        return results  # type: ignore[return-value]

    def _generate_prompt_learning(self, prompt: list[int], params: SamplingParams) -> DecodedRow:
        # Prompt-learning methods prepend virtual tokens inside peft's generate; run them one row at a
        # time through it (their rows never mix, and a single row needs no padding).
        ids = torch.tensor([prompt], device=self.device)
        kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if params.temperature > 0:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs.update(do_sample=False)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self._peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), output_logits=True,
                                      return_dict_in_generate=True, **kwargs)
        new = [int(t) for t in out.sequences[0, len(prompt):]]
        finish = "length"
        if new and new[-1] in self._stop_ids:
            new, finish = new[:-1], "stop"
        # raw logits of each step: the same confidence as decode_batch's (temperature 1)
        logprob_sum = sum(float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, new))
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for s in params.stop:
            if s in text:
                text, finish = text[: text.find(s)], "stop"
        return DecodedRow(new, text, finish, mean_token_confidence(logprob_sum, len(new)))

    def classify(self, requests: list[ClassificationRequest]) -> list[ClassificationResult]:
        """Classify a batch of texts; each row names its adapter (which carries its own head)."""
        if self.task != "sequence-classification":
            raise ConfigError(f"classify needs a sequence-classification engine; this engine serves {self.task!r}")
        refs = [r.adapter for r in requests]
        if any(ref == BASE or not ref for ref in refs):
            raise ConfigError("classification needs an adapter: the base model has no trained head")
        adapters = self._resolve_rows(refs)
        encoded = []
        for req, a in zip(requests, adapters):
            limit = int(((a.manifest.get("training") or {}).get("data") or {}).get("max_length") or self.max_input_tokens)
            ids = self.tokenizer(req.text, truncation=True, max_length=min(limit, self.max_input_tokens))["input_ids"]
            encoded.append(ids)
        results: list[ClassificationResult | None] = [None] * len(requests)
        for _, rows in self._plan(adapters):
            with self._lock, torch.inference_mode():
                names = self._prepare_pass(refs, adapters, rows)
                try:
                    logits = self._classify_pass([encoded[i] for i in rows], names)
                finally:
                    self._mixed.clear()
                labels_of = {i: self._labels(self._resident[adapters[i].key]) for i in rows}
            for i, row_logits in zip(rows, logits):
                labels = labels_of[i]
                probs = torch.softmax(row_logits.float(), dim=-1)
                best = int(torch.argmax(probs))
                results[i] = ClassificationResult(
                    adapter=refs[i], label=labels[best], label_id=best, confidence=float(probs[best]),
                    probabilities={labels[k]: float(probs[k]) for k in range(len(labels))},
                    logits=[float(v) for v in row_logits], input_tokens=len(encoded[i]),
                )
        return results  # type: ignore[return-value]

    def _classify_pass(self, encoded: list[list[int]], names: list[str] | None) -> torch.Tensor:
        pad_id = self.tokenizer.pad_token_id or 0
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):  # right padding: encoders and last-token pooling both handle it
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        extra = {"adapter_names": names} if names is not None else {}
        out = self._forward_fn()(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **extra)
        return out.logits.detach().cpu()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _read_header_bytes(fh) -> bytes:
    """The raw JSON header of a safetensors file (file position left at the data section)."""
    size = int.from_bytes(fh.read(8), "little")
    if not 0 < size < 100_000_000:
        raise StoreError(f"{getattr(fh, 'name', 'adapter file')}: not a safetensors file")
    return fh.read(size)


def _parse_header(raw: bytes, where: Path) -> dict:
    """The tensor entries of a safetensors header."""
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise StoreError(f"{where}: not a safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return header


_IGNORED_CONFIG_KEYS = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping"}


def _config_signature(cfg: dict) -> str:
    """Adapters with equal signatures have identically shaped layers (a pooled slot fits)."""
    return json.dumps({k: v for k, v in cfg.items() if k not in _IGNORED_CONFIG_KEYS}, sort_keys=True, default=str)


_PROMPT_LEARNING = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"}


def _is_pinned_ref(ref: str) -> bool:
    """A folder or name@<version> always means the same files; a bare name or a tag may move."""
    from adapters.store.store import is_path_ref

    if is_path_ref(ref):
        return True
    _, _, suffix = ref.partition("@")
    return suffix.isdigit()


# ------------------------------------------------------------------ records (scripts/infer.py)
_SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")


def infer_records(engine: InferenceEngine, records: list[dict], adapter: str = BASE, defaults: dict | None = None, batch_size: int = 16) -> list[dict]:
    """Run JSON records through the engine, ``batch_size`` rows per batch; returns one output per record.

    A record holds ``prompt`` (or ``text``) or ``messages``, and optionally its own ``adapter``
    and sampling keys (max_new_tokens, temperature, top_p, seed, stop). Other keys (an id...)
    are copied to the output.
    """
    defaults = dict(defaults or {})
    outputs: list[dict] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        for n, rec in enumerate(chunk, start):
            if not isinstance(rec, dict):
                raise ConfigError(f"input record {n}: expected a JSON object, got {type(rec).__name__}")
            if rec.get("prompt") is None and rec.get("text") is None and rec.get("messages") is None:
                raise ConfigError(f"input record {n}: give 'prompt' (or 'text') or 'messages'")
        if engine.task == "causal-lm":
            requests = [
                GenerationRequest(
                    adapter=rec.get("adapter") or adapter,
                    prompt=rec.get("prompt", rec.get("text")),
                    messages=rec.get("messages"),
                    params=SamplingParams(**{**defaults, **{k: rec[k] for k in _SAMPLING_KEYS if k in rec}}),
                    raw=bool(rec.get("raw", False)),
                )
                for rec in chunk
            ]
            for rec, res in zip(chunk, engine.generate(requests)):
                outputs.append({**rec, "adapter": res.adapter, "output": res.text, "finish_reason": res.finish_reason,
                                "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens})
        else:
            requests = [ClassificationRequest(adapter=rec.get("adapter") or adapter, text=rec.get("text", rec.get("prompt"))) for rec in chunk]
            for rec, res in zip(chunk, engine.classify(requests)):
                outputs.append({**rec, "adapter": res.adapter, "label": res.label, "confidence": res.confidence, "probabilities": res.probabilities})
    return outputs


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSON lines atomically (temp file + fsync + rename)."""
    from adapters.paths import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
