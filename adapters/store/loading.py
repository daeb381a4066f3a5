"""Loading a stored adapter onto a model: resolve its reference, verify its files, check its base.

The base check compares the base-model fingerprint recorded in the adapter's manifest with the
fingerprint of the model it is loaded on (adapters.store.fingerprint), so an adapter trained on
one base never silently runs on another.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from adapters.errors import BaseMismatchError, StoreError
from adapters.methods import method_of_folder
from adapters.store.fingerprint import fingerprint_model, legacy_fingerprint
from adapters.store.store import AdapterStore, check_publishable_files

log = logging.getLogger(__name__)


def check_base(
    manifest: dict, base_fingerprint: str | None, allow_mismatch: bool = False, base_name: str | None = None
) -> bool:
    """True when the adapter's recorded base fingerprint is base_fingerprint ("sha256:<hex>").

    Otherwise raise BaseMismatchError naming both bases, or with allow_mismatch log a warning
    and return False. base_name: how to name the loading base in the message.
    """
    recorded = manifest.get("base_model") or {}
    expected = recorded.get("fingerprint")
    if expected and (expected == base_fingerprint or expected == legacy_fingerprint(base_fingerprint)):
        return True
    if manifest.get("version"):
        adapter = f"{manifest.get('name') or 'adapter'}@{manifest.get('version')}"
    else:
        adapter = manifest.get("name") or "the adapter"
    trained_on = (
        f"{recorded.get('name') or recorded.get('path') or 'an unnamed base'} ({expected or 'no fingerprint recorded'})"
    )
    loading_on = f"{base_name or 'a base model'} ({base_fingerprint or 'fingerprint unknown'})"
    message = f"{adapter} was trained on base {trained_on} but is being loaded on {loading_on}"
    if allow_mismatch:
        log.warning("%s; loading anyway because the base check was overridden", message)
        return False
    raise BaseMismatchError(message + "; load it on its own base, or override with allow_base_mismatch=True")


def model_base_fingerprint(model: Any) -> tuple[str | None, str | None]:
    """(fingerprint, folder) of the local folder a loaded model came from; (None, name) if not local.

    model: a transformers model or a peft model wrapping one (its base's ``config._name_or_path``).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    where = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if where and Path(where).exists():
        return fingerprint_model(where), str(where)
    return None, where


def load_adapter(
    model: Any,
    ref: str | os.PathLike,
    store: AdapterStore | None = None,
    base_fingerprint: str | None = None,
    allow_base_mismatch: bool = False,
    adapter_name: str = "default",
    is_trainable: bool = False,
):
    """Resolve ref, verify its checksums and its base, and attach it to model. Returns the model
    (a PeftModel for peft methods).

    base_fingerprint defaults to the fingerprint of the folder the model was loaded from
    (``model.config.name_or_path``); pass it when the model was built another way.
    Raises StoreError (unknown reference, failed verification, pickle weights, no manifest or an
    unfingerprintable base without allow_base_mismatch) and BaseMismatchError (another base).
    """
    store = store or AdapterStore()
    folder, manifest = store.resolve(ref, verify=True)
    check_publishable_files(folder)  # plain folders too: no pickles, safetensors present
    base_name = None
    if base_fingerprint is None:
        base_fingerprint, base_name = model_base_fingerprint(model)
    if manifest is None:
        if not allow_base_mismatch:
            raise StoreError(
                f"{folder} has no manifest.json, so its base model cannot be checked; publish it with a "
                "manifest, or pass allow_base_mismatch=True to load it unchecked"
            )
        log.warning("loading %s without a manifest: base model and checksums unchecked", folder)
    else:
        if base_fingerprint is None and not allow_base_mismatch:
            raise StoreError(
                f"cannot fingerprint the model's base ({base_name!r} is not a local folder); pass "
                "base_fingerprint=fingerprint_model(<base folder>) or allow_base_mismatch=True"
            )
        check_base(manifest, base_fingerprint, allow_mismatch=allow_base_mismatch, base_name=base_name)
    return method_of_folder(folder).load(model, folder, adapter_name=adapter_name, is_trainable=is_trainable)
