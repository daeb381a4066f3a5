"""What lets an artifact load outside adapterkit, and the statement of what loads it.

Every adapter folder and export adapterkit writes carries, next to its weights:

- the tokenizer it was trained and served with (``tokenizer.save_pretrained``), for runtimes that
  need one in the folder (peft's AutoPeftModel, pipeline, vLLM, llama.cpp's converters);
- for a mean-pooling classifier, which no transformers class expresses: ``modeling_adapterkit.py``
  (the self-contained class of adapters.modeling.mean_pooling) and a config.json whose ``auto_map``
  names it, so that ``trust_remote_code=True`` loads it;
- ``README.md``: a model card whose "Load it" section gives the code that loads the folder.

``loading_of(folder)`` reads back from the files alone which plain runtime loads a folder and how;
the README, ``adapterkit parity`` and the runtime table all use it, so what the card states is what
the parity tests run.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from adapters.constants import ADAPTER_CONFIG
from adapters.methods.tuners import OWN_PEFT_TYPES
from adapters.modeling import mean_pooling
from adapters.paths import atomic_path

MODELING_FILE = "modeling_adapterkit.py"
REMOTE_CLASS = mean_pooling.MeanPoolingForSequenceClassification.__name__
AUTO_MAP = {"AutoModelForSequenceClassification": f"{MODELING_FILE[:-3]}.{REMOTE_CLASS}"}
MODEL_CARD = "README.md"


@dataclass
class Loading:
    """How a plain runtime loads an artifact folder.

    kind: "peft" (an adapter: AutoPeftModel* / PeftModel), "transformers" (a standalone model or a
    remote-code adapter folder: AutoModelFor*), or "adapterkit" (weights of a full/partial/head-only
    run: no plain runtime; ``adapterkit export --to merged`` makes one).
    auto_class: the transformers or peft class whose ``from_pretrained(folder, **kwargs)`` loads it.
    kwargs: its keyword arguments (labels for a standard classification head, trust_remote_code).
    imports: modules to import first (adapterkit's own peft tuners register their peft type).
    """

    kind: str
    task: str
    auto_class: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)
    method: str | None = None


def write_remote_code(folder: Path, config) -> None:
    """Write ``modeling_adapterkit.py`` and a config.json (a copy of ``config`` naming the mean-pooling
    class in ``architectures`` and ``auto_map``) into ``folder``."""
    folder = Path(folder)
    source = Path(mean_pooling.__file__).read_text(encoding="utf-8")
    with atomic_path(folder / MODELING_FILE, mode=0o644) as tmp:
        tmp.write_text(source, encoding="utf-8")
    described = copy.deepcopy(config)
    described.architectures = [REMOTE_CLASS]
    described.auto_map = dict(AUTO_MAP)
    with atomic_path(folder / "config.json", mode=0o644) as tmp:
        described.to_json_file(str(tmp))


def write_portable_files(folder: Path, model: nn.Module, tokenizer, title: str | None = None) -> Loading:
    """Make an adapter folder written by ``method.save`` load outside adapterkit, and say how.

    model: the model the adapter was saved from (a PeftModel, or the backbone of a full/partial/
    head-only run); tokenizer: the one it was trained with. Writes the tokenizer, the remote-code
    class for a mean-pooling classifier, an absolute ``base_model_name_or_path`` for a local base
    and README.md. Returns the folder's Loading.
    """
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(model, "peft_config") and isinstance(base, mean_pooling.MeanPoolingForSequenceClassification):
        write_remote_code(folder, base.config)
    _absolute_base_path(folder / ADAPTER_CONFIG)
    loading = loading_of(folder, getattr(base, "config", None))
    write_model_card(folder, loading, title or folder.name)
    return loading


def _absolute_base_path(config_path: Path) -> None:
    """A local base recorded as a relative path loads only from the training directory: make it absolute."""
    cfg = json.loads(config_path.read_text())
    where = cfg.get("base_model_name_or_path")
    if where and not os.path.isabs(where) and Path(where).is_dir():
        cfg["base_model_name_or_path"] = str(Path(where).resolve())
        with atomic_path(config_path, mode=0o644) as tmp:
            tmp.write_text(json.dumps(cfg, indent=2) + "\n")


def loading_of(folder: Path, model_config=None) -> Loading:
    """Which plain runtime loads ``folder`` and how, read from its files.

    model_config: the trained model's config (for a standard classification head: its labels and
    pad token); without it the labels are read from the folder's manifest.json.
    """
    folder = Path(folder)
    config = _json(folder / "config.json")
    remote = bool(config.get("auto_map"))
    adapter = _json(folder / ADAPTER_CONFIG)
    if not adapter:  # a standalone model (merged export)
        task = (
            "causal-lm"
            if any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])
            else ("sequence-classification")
        )
        auto = "AutoModelForCausalLM" if task == "causal-lm" else "AutoModelForSequenceClassification"
        return Loading("transformers", task, auto, {"trust_remote_code": True} if remote else {})
    if adapter.get("adapterkit_method") and not adapter.get("peft_type"):
        return Loading("adapterkit", adapter.get("task") or "causal-lm", None, method=adapter["adapterkit_method"])
    peft_type = str(adapter.get("peft_type", "")).upper()
    imports = [OWN_PEFT_TYPES[peft_type]] if peft_type in OWN_PEFT_TYPES else []
    method = adapter.get("adapterkit_method") or peft_type.lower()
    if adapter.get("task_type") == "CAUSAL_LM":
        return Loading("peft", "causal-lm", "AutoPeftModelForCausalLM", imports=imports, method=method)
    if remote:  # mean pooling: the remote-code class loads the encoder, then peft the adapter
        return Loading(
            "transformers",
            "sequence-classification",
            "AutoModelForSequenceClassification",
            {"trust_remote_code": True},
            imports,
            method,
        )
    return Loading(
        "peft",
        "sequence-classification",
        "AutoPeftModelForSequenceClassification",
        _label_kwargs(folder, model_config),
        imports,
        method,
    )


def _label_kwargs(folder: Path, model_config) -> dict[str, Any]:
    """num_labels / id2label / label2id (and a decoder's pad_token_id) that a standard head needs: the base's
    own config has none of them, and peft cannot load a head of another size."""
    if model_config is not None and getattr(model_config, "id2label", None):
        id2label = {int(k): v for k, v in model_config.id2label.items()}
        pad = getattr(model_config, "pad_token_id", None)
    else:
        labels = _json(folder / "manifest.json").get("labels") or []
        id2label, pad = dict(enumerate(labels)), None
    kwargs: dict[str, Any] = {
        "num_labels": len(id2label),
        "id2label": id2label,
        "label2id": {v: k for k, v in id2label.items()},
    }
    if pad is not None:
        kwargs["pad_token_id"] = pad
    return kwargs


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def loading_code(loading: Loading, folder: str = "path/to/this/folder") -> str:
    """Python that loads the artifact with ``loading`` from ``folder`` without adapterkit (its imports aside)."""
    if loading.kind == "adapterkit":
        return (
            f"# {loading.method} changes the base model's own weights: this folder holds only the changed tensors.\n"
            "# adapterkit loads it:  adapterkit infer --base BASE --adapter FOLDER ...\n"
            "#                       adapterkit serve --base BASE --model REF\n"
            "# a folder plain transformers loads:  adapterkit export REF --to merged OUT_DIR\n"
        )
    lines = [f"import {module}  # registers adapterkit's peft type with peft" for module in loading.imports]
    library = "peft" if loading.kind == "peft" else "transformers"
    lines.append(f"from {library} import {loading.auto_class}")
    lines.append("from transformers import AutoTokenizer, pipeline")
    args = "".join(f", {k}={v!r}" for k, v in loading.kwargs.items())
    lines.append(f"model = {loading.auto_class}.from_pretrained({folder!r}{args})")
    lines.append(f"tokenizer = AutoTokenizer.from_pretrained({folder!r})")
    task = "text-generation" if loading.task == "causal-lm" else "text-classification"
    lines.append(f"pipe = pipeline({task!r}, model=model, tokenizer=tokenizer)")
    return "\n".join(lines) + "\n"


def write_model_card(folder: Path, loading: Loading, title: str) -> None:
    """README.md: what the folder is and the code that loads it (replaces peft's template card)."""
    notes = []
    if loading.imports:
        notes.append(
            "The adapter uses a peft tuner of adapterkit's own: `pip install adapterkit` and import it "
            "first, as below, so that peft knows its type."
        )
    if loading.kwargs.get("trust_remote_code"):
        notes.append(
            f"No transformers class mean-pools: `{MODELING_FILE}` holds the model class (torch and "
            "transformers only); `trust_remote_code=True` runs it."
        )
    if loading.kind == "peft" and loading.task == "sequence-classification":
        notes.append("The base model's config has no labels: they are passed as shown.")
    if loading.task == "causal-lm" and loading.kind != "adapterkit":
        notes.append(
            "Format prompts as in training (manifest.json `prompt`: system prompt and instruction, "
            "applied with the tokenizer's chat template)."
        )
    card = (
        f"---\nlibrary_name: {'peft' if loading.kind == 'peft' else 'transformers'}\ntags:\n- adapterkit\n---\n\n"
        f"# {title}\n\nWritten by adapterkit. `adapterkit parity` checks that the runtime below gives "
        "adapterkit's outputs.\n\n## Load it\n\n```python\n"
        f"{loading_code(loading)}```\n\n" + "".join(f"- {n}\n" for n in notes)
    )
    with atomic_path(Path(folder) / MODEL_CARD, mode=0o644) as tmp:
        tmp.write_text(card, encoding="utf-8")
