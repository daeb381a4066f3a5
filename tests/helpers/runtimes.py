"""Shared by the third-party runtime tests (tests/serving/test_vllm.py, test_gguf.py).

The runtimes are set up by ``make runtimes`` (vLLM's virtualenv, llama.cpp's converters). Where they
are missing a test skips, except under ``make test`` (ADAPTERKIT_REQUIRE_RUNTIMES=1), where it fails:
CI must not pass by skipping them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.errors import ConfigError
from adapters.modeling.generation import SamplingParams
from adapters.serving.engine import GenerationRequest, InferenceEngine
from adapters.store.store import AdapterStore
from tests.helpers.serving import make_adapter

PROMPTS = ["What is the capital of France?", "Name three colours.", "Write one sentence about the sea."]


def need_runtime(check: Callable[[], object]) -> None:
    """Skip (fail under ``make test``) when check raises ConfigError: the runtime is not set up here."""
    try:
        check()
    except ConfigError as err:
        if os.environ.get("ADAPTERKIT_REQUIRE_RUNTIMES") == "1":
            pytest.fail(f"runtime missing under make test: {err}")
        pytest.skip(str(err))


def smol_lora(smollm2_dir: Path, out: Path, seed: int = 0) -> Path:
    """An untrained but non-zero LoRA (r=4 on the attention projections, A and B ~ N(0, 0.02^2)) on
    SmolLM2-135M-Instruct, with its manifest: it moves the first-token top-1 logprob by ~0.4 nats."""
    return make_adapter(smollm2_dir, out, seed=seed, std=0.02, name=out.name)


def trained_smol_lora(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> tuple[AdapterStore, str]:
    """A LoRA on SmolLM2-135M-Instruct trained by adapterkit's loop (three steps on TREC, the quickstart's
    recipe in small: LoRA on the top 2 blocks, a system prompt, the chat template), published as
    ``trained@1`` to a store of its own. Returns (store, "trained@1"). Made once per test session: a later
    call (another test module) finds it under the session's base temp folder. Its golden set for
    ``adapterkit parity`` is its run's test split (8 rows)."""
    from adapters.config import load_config
    from adapters.training.loop import train

    root = tmp_path_factory.getbasetemp() / "trained-smol-lora"
    store = AdapterStore(root / "store")
    if not (root / "run" / "summary.json").is_file():
        raw = {
            "task": "causal-lm",
            "model": {"name": str(smollm2_dir), "dtype": "float32"},
            "data": {
                "name": "trec",
                "system_prompt": "Classify the question type.",
                "max_length": 48,
                "max_train_samples": 48,
                "max_eval_samples": 8,
                "max_test_samples": 8,
            },
            "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all", "top_layers": 2},
            "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 3, "log_every": 1, "seed": 3, "eval_batch_size": 8},
            "eval": {"max_new_tokens": 3, "baseline": False},
            "output": {"run_dir": str(root / "run"), "name": "trained", "publish": True, "store": str(store.root)},
        }
        train(load_config(raw=raw))
    return store, "trained@1"


def engine_answers(base: Path, store: Path, ref: str, texts: list[str], top_k: int = 5) -> list[dict]:
    """adapterkit's engine on base + ref: per text {"prompt_ids", "top_logprobs": {id: logprob} at the first
    generated position}."""
    engine = InferenceEngine(str(base), store=store, capacity=1)
    params = SamplingParams(max_new_tokens=1, logprobs=top_k)
    results = engine.generate([GenerationRequest(adapter=ref, prompt=t, params=params) for t in texts])
    return [{"prompt_ids": r.prompt_ids, "top_logprobs": dict(r.logprobs.top[0])} for r in results]


def max_prob_diff(a: dict[int, float], b: dict[int, float]) -> float:
    """Largest |p_a - p_b| over the token ids both top-k dicts ({id: logprob}) hold; inf when they share none."""
    common = set(a) & set(b)
    return max((abs(math.exp(a[t]) - math.exp(b[t])) for t in common), default=math.inf)
