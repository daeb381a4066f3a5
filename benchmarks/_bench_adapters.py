"""Shared by the serving benchmarks: publish N random LoRA r=8 adapters for SmolLM2 into a store.

Random, non-zero weights (a fresh LoRA is a no-op) with a small scale, so outputs differ
per adapter but stay text-like. Every adapter has the registry's default LoRA layout
(r=8, every attention and MLP projection of all 30 blocks).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from adapters.benchmarking.suite import cpu_name  # noqa: E402
from adapters.config import ModelConfig  # noqa: E402
from adapters.methods import get_method  # noqa: E402
from adapters.modeling.backbone import load_backbone  # noqa: E402
from adapters.modeling.builtins import resolve_model  # noqa: E402
from adapters.store.fingerprint import fingerprint_model  # noqa: E402
from adapters.store.manifest import build_manifest, write_manifest  # noqa: E402
from adapters.store.store import AdapterStore  # noqa: E402

BASE = "smollm2-135m-instruct"


def publish_random_loras(store_root: Path, n: int, r: int = 8, prefix: str = "bench", std: float = 0.01) -> list[str]:
    """Publish n adapters named <prefix>0..; returns their pinned references (name@1)."""
    store = AdapterStore(store_root)
    model_cfg = ModelConfig(name=BASE)
    base_path = resolve_model(BASE)
    model = load_backbone(model_cfg, "causal-lm")
    method = get_method("lora")
    options = method.parse_options({"r": r})
    model = method.attach(model, options, "causal-lm")
    lora_params = [(n_, p) for n_, p in model.named_parameters() if "lora_A" in n_ or "lora_B" in n_]
    refs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            gen = torch.Generator().manual_seed(1000 + i)
            with torch.no_grad():
                for _, p in lora_params:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
            folder = Path(tmp) / f"{prefix}{i}"
            method.save(model, folder)
            manifest = build_manifest(
                name=f"{prefix}{i}",
                task="causal-lm",
                method={"name": "lora", "options": options.model_dump()},
                base_model={"name": BASE, "path": base_path, "fingerprint": fingerprint_model(base_path)},
                training={"model": model_cfg.model_dump(mode="json")},
            )
            write_manifest(folder, manifest)
            refs.append(str(store.publish(folder, f"{prefix}{i}")))
    return refs


def machine() -> dict:
    cpu = cpu_name()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        sha = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git": sha,
        "load_avg": os.getloadavg(),
    }
