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
