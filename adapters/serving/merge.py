"""Merge-and-export: fold an adapter into its base and save a standalone model folder.

The exported folder loads with plain transformers (``AutoModelForCausalLM`` /
``AutoModelForSequenceClassification``; a mean-pooling sentence classifier is saved as its
encoder plus ``classifier.safetensors``, loaded by ``load_exported``). A check then reloads the
folder and compares its outputs with base + adapter on a few inputs.

A 4/8-bit base is dequantized first (the adapter was trained against the dequantized values,
so merging into them is exact), merged in float, and optionally re-quantized to 4/8 bits.
Re-quantizing rounds the merged weights again, so outputs drift from base + adapter: the
check reports by how much, and a warning says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from peft.utils.integrations import dequantize_bnb_weight
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from adapters.config import ModelConfig, QuantizationConfig
from adapters.errors import ConfigError
from adapters.methods import method_of_folder
from adapters.modeling.backbone import MeanPoolingClassifier, load_backbone, load_tokenizer, quantization_config
from adapters.modeling.builtins import resolve_model
from adapters.modeling.generation import encode_prompt
from adapters.store.fingerprint import fingerprint_model
from adapters.store.loading import check_base
from adapters.store.store import AdapterStore, check_publishable_files

log = logging.getLogger(__name__)

EXPORT_INFO = "adapterkit_export.json"
HEAD_WEIGHTS = "classifier.safetensors"
DEFAULT_CHECK_TEXTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "free entry to win a prize, text now",
    "How many legs does a spider have?",
)


def merge_and_export(
    base: str,
    adapter: str,
    out_dir: str | os.PathLike,
    task: str | None = None,
    quantization: QuantizationConfig | dict | int | None = None,
    requantize: bool = False,
    store: Any = None,
    check_texts: list[str] | None = None,
    atol: float | None = None,
    allow_base_mismatch: bool = False,
) -> dict:
    """Merge ``adapter`` into ``base`` and save the result to ``out_dir`` (which must not exist).

    ``quantization`` defaults to the one the adapter was trained with (its manifest). Returns
    a report with the check: ``max_abs_diff`` of the logits, ``top1_agreement`` and ``passed``
    (``max_abs_diff <= atol``; atol defaults to 1e-3, or 2e-2 on a quantized base, whose 4-bit
    kernels round differently from a float matmul on the same dequantized values).
    """
    out = Path(out_dir).expanduser()
    if out.exists():
        raise ConfigError(f"export folder {out} already exists; choose a new folder")
    store = AdapterStore(store) if store is None or isinstance(store, (str, os.PathLike)) else store
    folder, manifest = store.resolve(adapter, verify=True)
    folder = Path(folder)
    check_publishable_files(folder)
    manifest = manifest or {}
    task = task or manifest.get("task") or "causal-lm"
    if manifest.get("task") and manifest["task"] != task:
        raise ConfigError(f"adapter {adapter!r} was trained for task {manifest['task']!r}, not {task!r}")
    trained_model = (manifest.get("training") or {}).get("model") or {}
    qcfg = _quantization(quantization if quantization is not None else trained_model.get("quantization"))
    if requantize and qcfg is None:
        raise ConfigError(
            "requantize needs a quantized base: pass quantization (4 or 8) or use an adapter trained on one"
        )
    if atol is None:
        atol = 2e-2 if qcfg is not None else 1e-3
    model_cfg = ModelConfig(name=base, quantization=qcfg, pooling=trained_model.get("pooling") or "auto")
    base_path = Path(resolve_model(base))
    if manifest:
        base_fingerprint = fingerprint_model(base_path) if base_path.is_dir() else None
        check_base(manifest, base_fingerprint, allow_mismatch=allow_base_mismatch, base_name=base)
    elif not allow_base_mismatch:
        raise ConfigError(f"{folder} has no manifest.json: its base cannot be checked (pass allow_base_mismatch=True)")
    labels = manifest.get("labels")
    label2id = {label: i for i, label in enumerate(labels)} if labels else None
    if task == "sequence-classification" and not label2id:
        raise ConfigError(f"adapter {adapter!r} has no labels in its manifest; cannot build its classifier")
    method = method_of_folder(folder)
    tokenizer = load_tokenizer(model_cfg)
    inputs = _check_inputs(tokenizer, task, manifest.get("prompt") if task == "causal-lm" else None, check_texts)

    # 1. base + adapter, exactly as served: the reference outputs
    model = method.load(load_backbone(model_cfg, task, label2id), folder)
    model.eval()
    reference = _outputs(model, inputs, task)
    del model

    # 2. dequantized base + adapter, merged
    base_model = load_backbone(model_cfg, task, label2id)
    if qcfg is not None:
        base_model = _dequantize(base_model)
    merged = method.load(base_model, folder)
    merged.eval()
    if not hasattr(merged, "merge_and_unload"):
        raise ConfigError(
            f"method {method.name!r} cannot be merged into the base (only weight-update methods such as LoRA can)"
        )
    merged = merged.merge_and_unload()
    merged.to(torch.float32 if model_cfg.dtype == "float32" else merged.dtype)
    if labels and hasattr(merged, "config"):
        merged.config.id2label = dict(enumerate(labels))
        merged.config.label2id = dict(label2id)

    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        _save(merged, tokenizer, staged)
        del merged
        if requantize:
            warnings.warn(
                f"re-quantizing the merged model to {qcfg.bits} bits rounds the adapter's update into the "
                "quantization grid: outputs differ from base + adapter (see the check's max_abs_diff)",
                stacklevel=2,
            )
            _requantize(staged, model_cfg, task)
        exported = load_exported(staged, task=task)
        got = _outputs(exported, inputs, task)
        del exported
        check = _compare(reference, got, atol, requantized=requantize)
        info = {
            "format": "adapterkit.export/1",
            "base": base,
            "adapter": str(adapter),
            "adapter_name": manifest.get("name"),
            "adapter_version": manifest.get("version"),
            "task": task,
            "labels": labels,
            "prompt": manifest.get("prompt"),
            "quantization": qcfg.model_dump() if qcfg else None,
            "requantized": requantize,
            "pooling": "mean" if (staged / HEAD_WEIGHTS).is_file() else None,
            "check": check,
        }
        (staged / EXPORT_INFO).write_text(json.dumps(info, indent=2))
        if manifest:
            (staged / "adapter_manifest.json").write_text(json.dumps(manifest, indent=2))
        _fsync_tree(staged)
        os.replace(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if not check["passed"]:
        log.warning("merged model differs from base + adapter: %s", check)
    return {"output": str(out), **info}


# ------------------------------------------------------------------ pieces
def _quantization(value) -> QuantizationConfig | None:
    if value is None:
        return None
    if isinstance(value, QuantizationConfig):
        return value
    if isinstance(value, int):
        return QuantizationConfig(bits=value)
    return QuantizationConfig(**value)


def _dequantize(model):
    """Replace bitsandbytes layers by float32 ones holding the dequantized weights."""
    try:  # only a quantized base needs bitsandbytes, which may lack a wheel for this platform
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ConfigError(f"dequantizing needs bitsandbytes ({err})") from err
    for name, module in list(model.named_modules()):
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            weight = dequantize_bnb_weight(module.weight, state=getattr(module, "state", None)).to(torch.float32)
            plain = torch.nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device=weight.device
            )
            plain.weight.data = weight
            if module.bias is not None:
                plain.bias.data = module.bias.data.to(torch.float32)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, plain)
    # What transformers' own dequantize() clears; its version dequantizes through bfloat16 on CPU.
    config = getattr(model, "config", None)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if config is not None and hasattr(config, attr):
            delattr(config, attr)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    model.is_loaded_in_4bit = model.is_loaded_in_8bit = False
    return model.to(torch.float32)


def _save(model, tokenizer, folder: Path) -> None:
    if isinstance(model, MeanPoolingClassifier):
        model.backbone.save_pretrained(str(folder), safe_serialization=True)
        save_file({k: v.contiguous() for k, v in model.classifier.state_dict().items()}, str(folder / HEAD_WEIGHTS))
        head = {"pooling": "mean", "id2label": model.config.id2label}
        (folder / "adapterkit_classifier.json").write_text(json.dumps(head))
    else:
        model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def _requantize(folder: Path, model_cfg: ModelConfig, task: str) -> None:
    qconfig = quantization_config(model_cfg)
    device_map = "cpu" if not torch.cuda.is_available() else {"": 0}
    model = _auto_class(folder, task).from_pretrained(
        str(folder), quantization_config=qconfig, device_map=device_map, dtype=torch.float32
    )
    for f in folder.glob("*.safetensors"):
        if f.name != HEAD_WEIGHTS:
            f.unlink()
    model.save_pretrained(str(folder), safe_serialization=True)


def _auto_class(folder: Path, task: str):
    if task == "causal-lm":
        return AutoModelForCausalLM
    if (folder / HEAD_WEIGHTS).is_file():
        return AutoModel
    return AutoModelForSequenceClassification


def load_exported(folder: str | os.PathLike, task: str | None = None):
    """Load an exported folder (task from its adapterkit_export.json unless given).

    A mean-pooling sentence classifier (``classifier.safetensors`` present) comes back as a
    MeanPoolingClassifier; everything else through transformers' Auto classes.
    """
    folder = Path(folder)
    if task is None:
        info = folder / EXPORT_INFO
        if not info.is_file():
            raise ConfigError(f"{folder} has no {EXPORT_INFO}: pass task='causal-lm' or 'sequence-classification'")
        task = json.loads(info.read_text())["task"]
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if getattr(AutoConfig.from_pretrained(str(folder)), "quantization_config", None):
        kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else "cpu"
    if (folder / HEAD_WEIGHTS).is_file():
        head = json.loads((folder / "adapterkit_classifier.json").read_text())
        id2label = {int(k): v for k, v in head["id2label"].items()}
        backbone = _auto_class(folder, task).from_pretrained(str(folder), **kwargs)
        model = MeanPoolingClassifier(backbone, {v: k for k, v in id2label.items()}, id2label)
        model.classifier.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
    else:
        model = _auto_class(folder, task).from_pretrained(str(folder), **kwargs)
    return model.eval()


def _check_inputs(tokenizer, task: str, prompt_spec: dict | None, texts: list[str] | None) -> list[list[int]]:
    texts = list(texts or DEFAULT_CHECK_TEXTS)
    if task == "causal-lm":
        return [encode_prompt(tokenizer, t, None, prompt_spec) for t in texts]
    return [tokenizer(t, truncation=True, max_length=128)["input_ids"] for t in texts]


@torch.inference_mode()
def _outputs(model, inputs: list[list[int]], task: str) -> list[torch.Tensor]:
    """Per input: the logits of every prompt position (causal LM) or the class logits."""
    outs = []
    device = next(model.parameters()).device
    for ids in inputs:  # one at a time: no padding, so nothing but the weights differs
        t = torch.tensor([ids], device=device)
        logits = model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0]
        outs.append(logits.float().cpu())
    return outs


def _compare(reference: list[torch.Tensor], got: list[torch.Tensor], atol: float, requantized: bool) -> dict:
    max_diff = max(float((a - b).abs().max()) for a, b in zip(reference, got))
    agree = [bool((a.argmax(-1) == b.argmax(-1)).all()) for a, b in zip(reference, got)]
    agreement = sum(agree) / len(agree)
    passed = agreement >= 0.75 if requantized else max_diff <= atol
    return {
        "inputs": len(reference),
        "max_abs_diff": max_diff,
        "top1_agreement": agreement,
        "atol": None if requantized else atol,
        "passed": passed,
    }


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(str(folder), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
