"""Resolve an adapter reference to what serving needs, after checking its files and its base model.

A reference is a store reference (``name``, ``name@3``, ``name@prod``) or an adapter folder.
Resolving verifies the files' sha256 against the manifest (once per set of file stamps, see
adapters.store.verified), checks the base model's fingerprint (the store's ``check_base``) and
reads the adapter config. Nothing here touches the model: it runs outside the engine's lock,
and its caches are plain dicts (each update is one atomic store under the GIL).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from adapters.config import ModelConfig
from adapters.constants import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapters.errors import ConfigError, StoreError
from adapters.methods.base import method_of_config
from adapters.methods.peft_base import PeftMethod
from adapters.modeling.backbone import resolve_pooling
from adapters.modeling.builtins import resolve_model
from adapters.store.fingerprint import fingerprint_model
from adapters.store.loading import check_base
from adapters.store.manifest import read_manifest
from adapters.store.refs import is_path_ref
from adapters.store.store import AdapterStore, check_publishable_files
from adapters.store.verified import folder_stamp, verify_folder_cached

log = logging.getLogger(__name__)

BASE = "base"  # the reference that means "no adapter"

# peft types whose adapters prepend virtual tokens instead of changing layers (they never mix rows)
_PROMPT_LEARNING = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"}
# adapter_config.json keys that do not change the shapes of an adapter's layers
_IGNORED_CONFIG_KEYS = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping"}
_MAX_PINNED_KEYS = 4096  # remembered folder/name@<version> references before the memo starts over


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

    def labels(self) -> list[str] | None:
        """The class names of a classifier, index = label id: the manifest's, else ``LABEL_<i>``
        for a head of ``num_labels`` outputs; None for a causal LM."""
        labels = self.manifest.get("labels")
        if labels:
            return list(labels)
        if self.num_labels:
            return [f"LABEL_{i}" for i in range(self.num_labels)]
        return None


class AdapterResolver:
    """Turns references into verified ``ResolvedAdapter``s for one base model and task.

    ``store``: an AdapterStore, its root folder, or None (the default store, opened on first use).
    ``head_names``: the base model's classification head modules (to read a head's size from a file).
    ``allow_base_mismatch``: serve adapters trained on another base, or without a manifest.
    ``mean_pooling``: the base classifier mean-pools (adapters.modeling.mean_pooling); a classifier adapter
    trained with the other pooling is refused (its tensors would land, and answer wrongly).
    """

    def __init__(
        self,
        store: Any,
        task: str,
        base_name: str,
        head_names: list[str],
        allow_base_mismatch: bool = False,
        mean_pooling: bool = False,
    ):
        self.store = store
        self.task = task
        self.base_name = base_name
        self.head_names = list(head_names)
        self.allow_base_mismatch = allow_base_mismatch
        self.mean_pooling = mean_pooling
        self._pinned_keys: dict[str, str] = {}
        self._verified: dict[str, list] = {}  # folder -> the folder_stamp it passed verification with
        self._resolved: dict[str, tuple[list, ResolvedAdapter]] = {}
        self._base_fingerprint: str | None = None
        # Set by a standalone engine (adapters.serving.standalone): the one artifact it serves, folder key.
        self.standalone_key: str | None = None

    def store_of(self) -> AdapterStore:
        """The adapter store that resolves references (the default store unless one was given)."""
        if self.store is None or isinstance(self.store, (str, Path)):
            self.store = AdapterStore(self.store)
        return self.store

    def key_of(self, ref: str) -> str:
        """The folder a reference points at now (cheap: no checksums). Tags may move between calls.

        Raises ConfigError for an empty reference or ``base``, StoreError for an unknown one.
        """
        if not isinstance(ref, str) or not ref.strip():
            raise ConfigError("adapter reference must be a non-empty string")
        if ref == BASE:
            raise ConfigError("'base' is the bare base model, not an adapter")
        if is_path_ref(ref):
            return str(Path(ref).expanduser().resolve())
        return str(self.store_of().locate(ref).path.resolve())

    def cached_key(self, ref: str) -> str:
        """``key_of(ref)``, remembered for references that always mean the same files.

        A folder path or name@<version> always means the same files (store versions are
        immutable), so its key is remembered; a bare name or a tag is looked up each time.
        """
        key = self._pinned_keys.get(ref)
        if key is None:
            key = self.key_of(ref)
            if is_pinned_ref(ref):
                if len(self._pinned_keys) > _MAX_PINNED_KEYS:
                    self._pinned_keys.clear()
                self._pinned_keys[ref] = key
        return key

    def resolve(self, ref: str) -> ResolvedAdapter:
        """Resolve a reference, verify its files' checksums and its base model, read what serving needs.

        A folder whose files have not changed since it last resolved is not read again.
        Raises ConfigError, StoreError or BaseMismatchError (a StoreError) naming the problem.
        """
        key = self.cached_key(ref)  # validates the reference
        if self.standalone_key is not None and key != self.standalone_key:
            raise ConfigError(
                f"this engine serves the standalone model {self.standalone_key} (base + its own weights); "
                f"it takes no other adapters, so {ref!r} cannot load here"
            )
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
        resolved = self._describe(ref, key, path, dict(manifest or {}))
        self._resolved[resolved.key] = (stamp, resolved)
        return resolved

    def _describe(self, ref: str, key: str, path: Path, manifest: dict) -> ResolvedAdapter:
        """Read the adapter config of a verified folder; refuse methods and tasks this engine cannot serve."""
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
        method = method_of_config(cfg, path)
        if not isinstance(method, PeftMethod) and key != self.standalone_key:
            raise ConfigError(
                f"adapter {ref!r} uses method {method.name!r}, which changes the base model's own weights; "
                "it cannot share a base with other adapters: run it as a standalone model "
                "(adapterkit infer --base BASE --adapter REF, adapterkit serve --base BASE --model REF)"
            )
        task = manifest.get("task")
        if task and task != self.task:
            raise ConfigError(f"adapter {ref!r} was trained for task {task!r}; this engine serves {self.task!r}")
        peft_type = str(cfg.get("peft_type", "")).upper()
        num_labels = None
        if self.task == "sequence-classification":
            self._check_pooling(ref, manifest)
            labels = manifest.get("labels")
            num_labels = self._head_size(path) or (len(labels) if labels else None)
        return ResolvedAdapter(
            key=key,
            path=path,
            manifest=manifest,
            method=method.name,
            mixable=bool(method.mixable),
            is_prompt_learning=peft_type in _PROMPT_LEARNING,
            peft_type=peft_type,
            num_labels=num_labels,
            signature=config_signature(cfg),
            immutable=not is_path_ref(ref),
        )

    def _check_pooling(self, ref: str, manifest: dict) -> None:
        """ConfigError when the adapter's classifier pooled otherwise than this engine's base (mean vs the
        architecture's own head): the tensors would land and the answers be wrong."""
        trained = (manifest.get("training") or {}).get("model")
        if not trained:
            return  # nothing recorded
        recorded = manifest.get("base_model") or {}
        name = recorded.get("name") or self.base_name  # a built-in's name says its pooling
        trained_mean = (
            resolve_pooling(
                ModelConfig(name=name, pooling=trained.get("pooling") or "auto"), recorded.get("path") or name
            )
            == "mean"
        )
        if trained_mean != self.mean_pooling:

            def pooling(mean: bool) -> str:
                return "mean pooling" if mean else "the architecture's own head"

            raise ConfigError(
                f"adapter {ref!r} was trained with {pooling(trained_mean)}, but this engine's base classifier uses "
                f"{pooling(self.mean_pooling)}; start the engine with pooling={'mean' if trained_mean else 'cls'!r}"
            )

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
            where = Path(resolve_model(self.base_name))
            self._base_fingerprint = fingerprint_model(where) if where.is_dir() else ""
        return self._base_fingerprint or None

    def _check_base(self, ref: str, path: Path, manifest: dict | None) -> None:
        """Refuse an adapter trained on another base (the store's check), unless allowed."""
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
        """Output size of the adapter's classification head, read from its weights file's header."""
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            return None
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():
                for head in self.head_names:
                    if key.endswith(f"{head}.weight") or key.endswith(f"{head}.modules_to_save.weight"):
                        return int(fh.get_slice(key).get_shape()[0])
        return None


def trained_model_config(base: str, manifest: dict, quantization: Any = None) -> ModelConfig:
    """The base ``base`` loaded as the adapter with ``manifest`` was trained on it: its pooling and dtype
    (and quantization, unless given) from the run config the manifest records."""
    trained = (manifest.get("training") or {}).get("model") or {}
    return ModelConfig(
        name=base,
        pooling=trained.get("pooling") or "auto",
        dtype=trained.get("dtype") or "float32",
        quantization=quantization if quantization is not None else trained.get("quantization"),
    )


def config_signature(cfg: dict) -> str:
    """Adapters with equal signatures (their adapter_config.json minus bookkeeping keys) have
    identically shaped layers: a pooled slot of one fits the other."""
    return json.dumps({k: v for k, v in cfg.items() if k not in _IGNORED_CONFIG_KEYS}, sort_keys=True, default=str)


def is_pinned_ref(ref: str) -> bool:
    """A folder or name@<version> always means the same files; a bare name or a tag may move."""
    if is_path_ref(ref):
        return True
    _, _, suffix = ref.partition("@")
    return suffix.isdigit()
