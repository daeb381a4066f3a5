"""``adapterkit export REF --to peft|merged|vllm``: write the folder a runtime expects.

- peft: the adapter re-saved from adapterkit's own loaded model, so that every file says what plain
  peft/transformers needs today whatever adapterkit version trained it: tensors under transformers'
  standard names (an old mean-pooling adapter's ``backbone.`` keys renamed), an absolute
  ``base_model_name_or_path``, the tokenizer, the remote-code class of a mean-pooling classifier and
  a model card with the loading code (adapters.modeling.portable), plus the manifest (checksums
  rewritten). Loading it first is also the check: an adapter whose tensors do not all land on the
  base is refused (adapters.methods.peft_base.check_adapter_landed).
- merged: adapters.serving.merge.merge_and_export.
- vllm: the peft folder, for what vLLM serves: LoRA adapters of a causal LM (``--lora-modules``).

GGUF is written by adapters.serving.gguf.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from adapters.constants import ADAPTER_CONFIG
from adapters.errors import ConfigError
from adapters.methods import method_of_folder
from adapters.methods.peft_base import PeftMethod
from adapters.modeling.backbone import load_backbone, load_tokenizer
from adapters.modeling.builtins import resolve_model
from adapters.modeling.portable import write_portable_files
from adapters.paths import fsync_dir
from adapters.serving.resolver import trained_model_config
from adapters.store.fingerprint import fingerprint_model
from adapters.store.loading import check_base
from adapters.store.manifest import write_manifest
from adapters.store.store import AdapterStore, check_publishable_files


def export_peft(
    ref: str,
    out_dir: str | os.PathLike,
    base: str | None = None,
    store: Any = None,
    allow_base_mismatch: bool = False,
    for_vllm: bool = False,
) -> dict:
    """Write the adapter ``ref`` (a reference or folder) as a folder plain peft loads, at ``out_dir`` (new).

    base: the base model (a built-in name, folder or hub id); default: the one its manifest records.
    for_vllm: refuse what vLLM cannot serve (only LoRA on a causal LM; no DoRA).
    Returns {"output", "format", "adapter", "base", "method", "loading"}. Raises ConfigError for an
    existing ``out_dir`` or an artifact that is not a peft adapter (full/partial/head-only: export
    --to merged), and what loading it raises (StoreError, BaseMismatchError).
    """
    out = Path(out_dir).expanduser()
    if out.exists():
        raise ConfigError(f"export folder {out} already exists; choose a new folder")
    store = store if isinstance(store, AdapterStore) else AdapterStore(store)
    folder, manifest = store.resolve(ref, verify=True)
    folder, manifest = Path(folder), manifest or {}
    check_publishable_files(folder)
    method = method_of_folder(folder)
    if not isinstance(method, PeftMethod):
        raise ConfigError(
            f"{ref!r} uses method {method.name!r}, which changes the base model's own weights: it is not a peft "
            "adapter; export it --to merged (a standalone model folder)"
        )
    if for_vllm:
        _check_vllm(folder, manifest, ref)
    base = base or (manifest.get("base_model") or {}).get("path") or (manifest.get("base_model") or {}).get("name")
    if not base:
        raise ConfigError(f"{ref!r} records no base model: pass base")
    model_cfg = trained_model_config(base, manifest)
    if manifest:
        base_path = Path(resolve_model(base))
        check_base(
            manifest,
            fingerprint_model(base_path) if base_path.is_dir() else None,
            allow_mismatch=allow_base_mismatch,
            base_name=base,
        )
    elif not allow_base_mismatch:
        raise ConfigError(f"{folder} has no manifest.json: its base cannot be checked (pass allow_base_mismatch=True)")
    task = manifest.get("task") or json.loads((folder / ADAPTER_CONFIG).read_text()).get("task") or "causal-lm"
    labels = manifest.get("labels")
    model = method.load(
        load_backbone(model_cfg, task, {lb: i for i, lb in enumerate(labels)} if labels else None), folder
    )  # refuses an adapter whose tensors do not all land

    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        method.save(model, staged)
        loading = write_portable_files(staged, model, load_tokenizer(model_cfg), manifest.get("name") or out.name)
        if manifest:
            write_manifest(staged, {**manifest, "files": {}})
        os.replace(staged, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return {
        "output": str(out),
        "format": "vllm" if for_vllm else "peft",
        "adapter": str(ref),
        "base": base,
        "method": method.name,
        "loading": loading.auto_class,
    }


def _check_vllm(folder: Path, manifest: dict, ref: str) -> None:
    """ConfigError unless vLLM can serve the adapter: a LoRA (not DoRA) of a causal LM."""
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    if str(cfg.get("peft_type", "")).upper() != "LORA" or cfg.get("use_dora"):
        raise ConfigError(
            f"vLLM serves LoRA adapters only; {ref!r} is {cfg.get('peft_type')!r}"
            + (" with DoRA" if cfg.get("use_dora") else "")
        )
    if (manifest.get("task") or "causal-lm") != "causal-lm":
        raise ConfigError(f"vLLM serves LoRA adapters of causal LMs; {ref!r} is a {manifest.get('task')}")
