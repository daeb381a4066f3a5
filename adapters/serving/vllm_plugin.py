"""vLLM plugin: a LoRA resolver that serves adapters from the adapterkit store, checked before vLLM loads them.

vLLM calls ``register`` in each of its processes (``vllm.general_plugins`` entry point
``adapterkit_store`` in pyproject.toml; ``VLLM_PLUGINS=adapterkit_store`` selects it). With
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``, a request for a model vLLM does not know, e.g.
``"model": "trec@prod"``, reaches ``StoreLoRAResolver.resolve_lora`` (vllm.lora.resolver.LoRAResolver):

* not a store reference, or not in the store: None, and vLLM answers 404 "model does not exist";
* in the store but refused (a file fails its checksum, not a LoRA, trained on another base, by
  fingerprint): an error line in vLLM's log and a ``VLLMValidationError``, which vLLM's server turns
  into a 400 whose message says why (paths masked). Nothing is cached, so the next request checks again;
* otherwise a LoRARequest for the version's folder. vLLM keeps it under the requested name: a tag moved
  later (``trec@prod``) is picked up after ``POST /v1/unload_lora_adapter {"lora_name": "trec@prod"}``.

Only imported inside vLLM's virtualenv (it imports vllm).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from adapters.errors import AdapterkitError, ConfigError, StoreError
from adapters.serving.vllm_runtime import verified_lora
from adapters.store.fingerprint import fingerprint_model
from adapters.store.refs import is_path_ref
from adapters.store.store import AdapterStore

# Under "vllm.": vLLM's logging configuration (format, level) applies to these lines.
logger = init_logger("vllm.plugins.adapterkit_store")

RESOLVER_NAME = "adapterkit store"


class StoreLoRAResolver(LoRAResolver):
    """Resolves ``name``, ``name@<version>`` and ``name@<tag>`` against an AdapterStore.

    store_root: the store's folder (default ``$ADAPTERKIT_STORE``, else the cache's store), opened
    on the first request. The base model is the folder vLLM serves (its ``--model``); its fingerprint
    is computed once per process (and cached on disk by adapters.store.fingerprint).
    """

    def __init__(self, store_root: str | None = None):
        self.store_root = store_root
        self._store: AdapterStore | None = None
        self._fingerprints: dict[str, str] = {}

    def store(self) -> AdapterStore:
        """The store, opened on first use."""
        if self._store is None:
            self._store = AdapterStore(self.store_root)
        return self._store

    def checked_folder(self, base_model_name: str, lora_name: str) -> Path | None:
        """The verified version folder lora_name names; None when the store has no such adapter.

        Raises AdapterkitError when the adapter is there but refused (adapters.serving.vllm_runtime.verified_lora).
        """
        store = self.store()
        try:
            store.locate(lora_name)
        except StoreError as err:
            logger.info("adapterkit store %s does not resolve %r: %s", store.root, lora_name, err)
            return None
        base = Path(base_model_name)
        if not base.is_dir():
            raise ConfigError(
                f"base model {base_model_name!r} is not a local folder: its fingerprint cannot be checked"
            )
        if base_model_name not in self._fingerprints:
            self._fingerprints[base_model_name] = fingerprint_model(base)
        folder, _ = verified_lora(store, lora_name, base, self._fingerprints[base_model_name])
        return folder

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """vLLM's hook: a LoRARequest for a verified store version, None when not ours.

        Raises VLLMValidationError (HTTP 400) when the store holds the adapter but refuses it.
        """
        if is_path_ref(lora_name):  # clients name store references, never folders on the server
            return None
        try:
            # Hashing the files blocks: off the server's event loop.
            folder = await asyncio.to_thread(self.checked_folder, base_model_name, lora_name)
        except AdapterkitError as err:
            logger.error("adapterkit refused LoRA adapter %r: %s", lora_name, err)
            raise VLLMValidationError(f"adapter {lora_name!r} refused: {err}", parameter="model") from None
        if folder is None:
            return None
        logger.info("adapterkit resolved %r to %s (checksums and base fingerprint verified)", lora_name, folder)
        # lora_int_id: vLLM replaces it with its own counter's next value.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(folder), base_model_name=base_model_name)


def register() -> None:
    """The entry point vLLM calls in each process: register the store resolver (no store access yet)."""
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, StoreLoRAResolver())
