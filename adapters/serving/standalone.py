"""One base + one artifact as a standalone model: how full, partial and head-only runs are served.

Those methods change the base model's own weights, so their artifacts cannot share a base with other
adapters (adapters.serving.resolver refuses them in a multi-adapter engine). ``StandaloneEngine``
loads the base, verifies the artifact like any adapter (checksums, base fingerprint), writes its
tensors into the base's weights (a classifier's head resized to the artifact's labels) and then
serves that one model: requests name the artifact's reference; no other adapter loads. Everything
else (batching, logprobs, the HTTP server) is the InferenceEngine's. A peft adapter may be served
the same way (pinned in its slot), for a server dedicated to one model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from adapters.config import ModelConfig
from adapters.constants import PEFT_BASE
from adapters.errors import ConfigError
from adapters.methods.base import get_method, method_of_folder
from adapters.methods.peft_base import PeftMethod
from adapters.serving.engine import GenerationRequest, InferenceEngine
from adapters.serving.resolver import BASE, trained_model_config
from adapters.serving.slots import ResidentAdapter
from adapters.store.refs import is_path_ref
from adapters.store.store import AdapterStore


class StandaloneEngine(InferenceEngine):
    """An InferenceEngine serving ``base`` with the artifact ``model`` (a reference: name, name@3,
    name@tag or a folder) as its only model. Other arguments are InferenceEngine's.

    Rows name ``model``'s reference (any reference to the same folder works); ``base`` and other
    adapters are refused with ConfigError. Raises what InferenceEngine.resolve raises for the artifact,
    and ConfigError for a quantized base (the artifact's tensors are float weights of the base).
    """

    def __init__(self, base: str | ModelConfig, model: str, task: str = "causal-lm", **kwargs: Any):
        quantized = kwargs.get("quantization") is not None or (isinstance(base, ModelConfig) and base.quantization)
        if quantized:
            raise ConfigError("a standalone model loads its own weights into a float base: drop the quantization")
        dtype = kwargs.pop("dtype", None)  # None: the dtype the artifact was trained in
        if not isinstance(base, ModelConfig):  # the base as the artifact was trained on it (pooling, dtype)
            _, manifest = _store(kwargs.get("store")).resolve(model, verify=False)
            base = trained_model_config(str(base), manifest or {})
            base.quantization = None
        if dtype is not None:
            base = base.model_copy(update={"dtype": dtype})
        super().__init__(base, task=task, **kwargs)
        t0 = time.perf_counter()
        self.model_ref = model
        self._resolver.standalone_key = self._resolver.key_of(model)
        artifact = self._resolver.resolve(model)  # checksums and base fingerprint, outside the lock
        with self._lock:
            if isinstance(get_method(artifact.method), PeftMethod):
                entry = self._pool.ensure_resident(artifact, model, pinned=set())
            else:
                if artifact.num_labels is not None:
                    self._layers.resize_heads(artifact.num_labels)
                get_method(artifact.method).load(self._layers.base_model, artifact.path)  # in place, shapes checked
                entry = ResidentAdapter(PEFT_BASE, artifact, time.time(), time.perf_counter() - t0, refs={model})
                self._pool.resident[artifact.key] = entry  # its slot is the (changed) base itself
            self._pool.pin(artifact.key)  # never evicted
            self._layers.activate(entry.slot if entry.slot != PEFT_BASE else None)

    def _encode(self, requests: list[GenerationRequest]):
        """InferenceEngine._encode, refusing ``base`` rows: this engine's base weights are the artifact's."""
        if any((r.adapter or BASE) == BASE for r in requests):
            raise ConfigError(f"this engine serves {self.model_ref!r} only; name it in each request, not 'base'")
        return super()._encode(requests)


def needs_own_model(ref: str, store: Any = None) -> bool:
    """Whether the artifact ``ref`` (a reference or folder; ``base`` is not one) changes its base's own
    weights (full, partial, head-only), so it runs as a StandaloneEngine. Reads only adapter_config.json."""
    if not ref or ref == BASE:
        return False
    folder = Path(os.path.expanduser(ref)) if is_path_ref(ref) else _store(store).locate(ref).path
    return not isinstance(method_of_folder(folder), PeftMethod)


def _store(store: Any) -> AdapterStore:
    """An AdapterStore, its root or None (the default store) as an AdapterStore."""
    return store if isinstance(store, AdapterStore) else AdapterStore(store)
