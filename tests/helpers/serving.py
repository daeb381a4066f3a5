"""Build small adapter folders (peft files + manifest.json) with random, non-zero weights.

Shared by the engine, server and merge tests: a freshly initialised LoRA adapter is a no-op
(B = 0), so every adapter here gets random A and B (and head) weights from its own seed and
really changes the model's outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapters.config import ModelConfig
from adapters.methods import get_method
from adapters.modeling.backbone import load_backbone
from adapters.store.fingerprint import fingerprint_model
from adapters.store.manifest import build_manifest, write_manifest


def make_adapter(
    base_dir: Path,
    out: Path,
    task: str = "causal-lm",
    method: str = "lora",
    seed: int = 0,
    labels: list[str] | None = None,
    prompt: dict | None = None,
    options: dict | None = None,
    name: str | None = None,
    std: float = 0.2,
    quantization: dict | None = None,
) -> Path:
    """Train nothing: attach ``method`` to the base at ``base_dir``, fill its weights with N(0, std^2)
    draws from ``seed`` and save the adapter folder (peft files + manifest.json) to ``out``.

    ``labels``: a classifier's class names; ``prompt``: the manifest's prompt format; ``options``:
    method options (LoRA/DoRA default to r=4 on the attention projections); ``quantization``: the
    base's, recorded in the manifest as the training model. Returns ``out``.
    """
    model_cfg = ModelConfig(name=str(base_dir), quantization=quantization)
    label2id = {label: i for i, label in enumerate(labels)} if labels else None
    torch.manual_seed(seed)
    model = load_backbone(model_cfg, task, label2id)
    impl = get_method(method)
    defaults = {"r": 4, "target_modules": "attention"} if method in ("lora", "dora") else {}
    opts = impl.parse_options({**defaults, **(options or {})})
    model = impl.attach(model, opts, task)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_A" in pname or "lora_B" in pname or "modules_to_save" in pname or "prompt_encoder" in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    out.mkdir(parents=True, exist_ok=True)
    impl.save(model, out)
    manifest = build_manifest(
        name=name or out.name,
        task=task,
        method={"name": method, "options": opts.model_dump()},
        base_model={"name": str(base_dir), "path": str(base_dir), "fingerprint": fingerprint_model(base_dir)},
        labels=labels,
        prompt=prompt or {},
        training={"data": {"max_length": 64}, "model": model_cfg.model_dump(mode="json")},
    )
    write_manifest(out, manifest)
    return out
