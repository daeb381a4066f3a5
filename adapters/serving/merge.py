"""Merge-and-export: fold an adapter into its base and save a standalone model folder.

The exported folder loads with plain transformers: ``AutoModelForCausalLM``, or for a classifier
``AutoModelForSequenceClassification`` / ``pipeline("text-classification")`` (a mean-pooling
classifier through its remote-code class, ``trust_remote_code=True``: adapters.modeling.portable).
The tokenizer and a model card saying how to load it go with it. A full/partial/head-only
artifact needs no merge: base + its tensors is already the standalone model. Methods that add no
weight update (bottleneck adapters, prompt learning) cannot be merged and are refused. A check
then reloads the folder and compares its outputs with base + adapter on a few inputs.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils.integrations import dequantize_bnb_weight
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from adapters.config import ModelConfig, QuantizationConfig
from adapters.constants import ADAPTER_CONFIG
from adapters.errors import ConfigError
from adapters.methods import method_of_folder
from adapters.methods.base import AdaptationMethod
from adapters.methods.peft_base import PeftMethod
from adapters.modeling.backbone import MeanPoolingClassifier, load_backbone, load_tokenizer, quantization_config
from adapters.modeling.builtins import resolve_model
from adapters.modeling.generation import encode_prompt
from adapters.modeling.mean_pooling import MeanPoolingForSequenceClassification
from adapters.modeling.portable import loading_of, write_model_card, write_remote_code
from adapters.store.fingerprint import fingerprint_model
from adapters.store.loading import check_base
from adapters.store.store import AdapterStore, check_publishable_files

log = logging.getLogger(__name__)

EXPORT_INFO = "adapterkit_export.json"
HEAD_WEIGHTS = "classifier.safetensors"  # exports written before the remote-code class kept the head here
DEFAULT_CHECK_TEXTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "free entry to win a prize, text now",
    "How many legs does a spider have?",
)
# peft types that add no weight update: nothing to fold into the base
_NOT_MERGEABLE = {
    "BOTTLENECK": "its adapters are non-linear modules, not weight updates",
    "PROMPT_TUNING": "it prepends learned virtual tokens, not weight updates",
    "PREFIX_TUNING": "it prepends learned keys and values, not weight updates",
    "P_TUNING": "it prepends learned virtual tokens, not weight updates",
}


@dataclass
class _Source:
    """What an export starts from: the adapter's verified folder and manifest, and how to load its base."""

    folder: Path
    manifest: dict
    task: str
    method: AdaptationMethod
    model_cfg: ModelConfig
    labels: list[str] | None

    @property
    def label2id(self) -> dict[str, int] | None:
        """Class name -> head row, or None for a causal LM."""
        return {label: i for i, label in enumerate(self.labels)} if self.labels else None


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
    Raises ConfigError for an existing ``out_dir``, a method that cannot be merged or an impossible
    setting, and what loading the adapter raises (StoreError, BaseMismatchError).
    """
    out = Path(out_dir).expanduser()
    if out.exists():
        raise ConfigError(f"export folder {out} already exists; choose a new folder")
    src = _source(base, adapter, task, quantization, store, allow_base_mismatch)
    qcfg = src.model_cfg.quantization
    if requantize and qcfg is None:
        raise ConfigError(
            "requantize needs a quantized base: pass quantization (4 or 8) or use an adapter trained on one"
        )
    if atol is None:
        atol = 2e-2 if qcfg is not None else 1e-3
    tokenizer = load_tokenizer(src.model_cfg)
    prompt = src.manifest.get("prompt") if src.task == "causal-lm" else None
    inputs = _check_inputs(tokenizer, src.task, prompt, check_texts)

    # 1. base + adapter, exactly as served: the reference outputs
    model = src.method.load(load_backbone(src.model_cfg, src.task, src.label2id), src.folder)
    model.eval()
    reference = _outputs(model, inputs, src.task)
    del model
    merged = _merged(src)

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
            _requantize(staged, src.model_cfg, src.task)
        exported = load_exported(staged, task=src.task)
        got = _outputs(exported, inputs, src.task)
        del exported
        info = _export_info(src, base, adapter, staged, requantize, _compare(reference, got, atol, requantize))
        (staged / EXPORT_INFO).write_text(json.dumps(info, indent=2))
        if src.manifest:
            (staged / "adapter_manifest.json").write_text(json.dumps(src.manifest, indent=2))
        write_model_card(staged, loading_of(staged), src.manifest.get("name") or out.name)
        _fsync_tree(staged)
        os.replace(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if not info["check"]["passed"]:
        log.warning("merged model differs from base + adapter: %s", info["check"])
    return {"output": str(out), **info}


def _source(base: str, adapter: str, task: str | None, quantization, store: Any, allow_base_mismatch: bool) -> _Source:
    """Resolve and verify the adapter, check its base and its method, and settle task, quantization and labels."""
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
    model_cfg = ModelConfig(name=base, quantization=qcfg, pooling=trained_model.get("pooling") or "auto")
    base_path = Path(resolve_model(base))
    if manifest:
        base_fingerprint = fingerprint_model(base_path) if base_path.is_dir() else None
        check_base(manifest, base_fingerprint, allow_mismatch=allow_base_mismatch, base_name=base)
    elif not allow_base_mismatch:
        raise ConfigError(f"{folder} has no manifest.json: its base cannot be checked (pass allow_base_mismatch=True)")
    labels = manifest.get("labels")
    if task == "sequence-classification" and not labels:
        raise ConfigError(f"adapter {adapter!r} has no labels in its manifest; cannot build its classifier")
    method = method_of_folder(folder)
    if isinstance(method, PeftMethod):
        peft_type = str(json.loads((folder / ADAPTER_CONFIG).read_text()).get("peft_type", "")).upper()
        if peft_type in _NOT_MERGEABLE:
            raise ConfigError(
                f"method {method.name!r} cannot be merged into the base: {_NOT_MERGEABLE[peft_type]}; "
                "export it --to peft instead (a folder plain peft loads)"
            )
    return _Source(folder, manifest, task, method, model_cfg, labels)


def _merged(src: _Source):
    """The (dequantized) base with the adapter folded into its weights; its labels set on a classifier."""
    base_model = load_backbone(src.model_cfg, src.task, src.label2id)
    if src.model_cfg.quantization is not None:
        base_model = _dequantize(base_model)
    merged = src.method.load(base_model, src.folder)
    merged.eval()
    if isinstance(src.method, PeftMethod):
        merged = merged.merge_and_unload()
    # full/partial/head-only: the tensors went into the base's own weights; it is the standalone model already
    merged.to(torch.float32 if src.model_cfg.dtype == "float32" else merged.dtype)
    if src.labels and hasattr(merged, "config"):
        merged.config.id2label = dict(enumerate(src.labels))
        merged.config.label2id = dict(src.label2id)
    return merged


def _export_info(src: _Source, base: str, adapter: str, folder: Path, requantize: bool, check: dict) -> dict:
    """adapterkit_export.json: where the export came from and how its check went."""
    qcfg = src.model_cfg.quantization
    return {
        "format": "adapterkit.export/1",
        "base": base,
        "adapter": str(adapter),
        "adapter_name": src.manifest.get("name"),
        "adapter_version": src.manifest.get("version"),
        "task": src.task,
        "labels": src.labels,
        "prompt": src.manifest.get("prompt"),
        "quantization": qcfg.model_dump() if qcfg else None,
        "requantized": requantize,
        "pooling": "mean" if _is_remote_code(folder) else None,
        "check": check,
    }


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
    """The merged model and its tokenizer; a mean-pooling classifier with its remote-code class."""
    model.save_pretrained(str(folder), safe_serialization=True)
    if isinstance(model, MeanPoolingForSequenceClassification):
        write_remote_code(folder, model.config)  # config.json names the class transformers cannot know
    tokenizer.save_pretrained(str(folder))


def _is_remote_code(folder: Path) -> bool:
    """Whether the export's config.json names adapterkit's remote-code class (a mean-pooling classifier)."""
    return bool(json.loads((Path(folder) / "config.json").read_text()).get("auto_map"))


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
    if _is_remote_code(folder):
        return MeanPoolingForSequenceClassification  # the class its modeling_adapterkit.py holds
    if (folder / HEAD_WEIGHTS).is_file():
        return AutoModel
    return AutoModelForSequenceClassification


def load_exported(folder: str | os.PathLike, task: str | None = None):
    """Load an exported folder (task from its adapterkit_export.json unless given).

    A mean-pooling classifier comes back as adapters.modeling.mean_pooling's class (the one its
    ``modeling_adapterkit.py`` holds); an export written before that class (encoder plus
    ``classifier.safetensors``) as a MeanPoolingClassifier; everything else through transformers' Auto classes.
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
