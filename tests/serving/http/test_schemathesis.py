"""schemathesis against every operation of the server's OpenAPI document, on loopback: schema-valid and
schema-invalid requests (a fixed number per operation, derandomized, under a time limit) get no 5xx, only
declared status codes and bodies that match their declared schemas. Bodies name real adapters most of the
time, so many requests reach generation."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation.modes import GenerationMode

from adapters.serving.engine import InferenceEngine
from adapters.serving.http.app import BackgroundServer, create_app
from adapters.serving.http.settings import ServerSettings
from adapters.store.store import AdapterStore
from tests.helpers.serving import make_adapter

EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 10}  # per operation
TIME_LIMIT_S = 60.0  # for all operations together; the examples left after it are skipped
REFERENCES = ("base", "alpha", "alpha@1", "alpha@prod", "ghost", "alpha@7")  # 3 of 6 real
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def lm_server(tiny_llama_dir, tmp_path_factory, one_torch_thread):
    store = AdapterStore(tmp_path_factory.mktemp("fuzz-store"))
    store.publish(
        make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("fuzz-src") / "alpha", seed=61), "alpha", tags=("prod",)
    )
    engine = InferenceEngine(str(tiny_llama_dir), capacity=2, store=store)
    limits = ServerSettings(max_tokens=16, max_prompt_tokens=48, max_inputs=4, batch_window_ms=1)
    with BackgroundServer(create_app(engine, limits)) as server:
        yield server.url


@pytest.fixture(scope="module")
def cls_server(tiny_bert_dir, tmp_path_factory, one_torch_thread):
    store = AdapterStore(tmp_path_factory.mktemp("fuzz-cls-store"))
    folder = make_adapter(
        tiny_bert_dir,
        tmp_path_factory.mktemp("fuzz-cls-src") / "alpha",
        task="sequence-classification",
        seed=62,
        labels=["no", "yes"],
    )
    store.publish(folder, "alpha", tags=("prod",))
    engine = InferenceEngine(str(tiny_bert_dir), task="sequence-classification", capacity=2, store=store)
    with BackgroundServer(create_app(engine, ServerSettings(max_prompt_tokens=48, max_inputs=4))) as server:
        yield server.url


def _reachable(body, vocab: int):
    """A strategy of ``body`` with a real (or missing) adapter reference, in-vocabulary token ids and budgets
    within the server's limits, so that many requests reach the engine."""
    if not isinstance(body, dict):
        return st.just(body)

    def fill(ref: str) -> dict:
        out = dict(body)
        for key in ("model", "adapter"):
            if isinstance(out.get(key), str):
                out[key] = ref
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(out.get(key), int) and out[key] >= 1:
                out[key] = 1 + out[key] % 6
        if "messages" in out and out.get("max_tokens") is None and out.get("max_completion_tokens") is None:
            out["max_tokens"] = 4  # not chat's default of 256
        prompt = out.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and t >= 0 for t in prompt):
            out["prompt"] = [t % vocab for t in prompt]
        out.pop("best_of", None)  # only equal to n: mostly a 400
        return out

    return st.sampled_from(REFERENCES).map(fill)


def run_operations(url: str, vocab: int, examples: dict, deadline: float, paths=None) -> dict[int, int]:
    """Call every operation of the server at ``url`` (or those on ``paths``) with ``examples[mode]`` generated
    requests per mode, checking each response (CHECKS); returns how many responses had each status."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    schema.hook("flatmap_body")(lambda context, body: _reachable(body, vocab))
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if paths is not None and operation.path not in paths:
            continue
        for mode, count in examples.items():

            @settings(
                max_examples=count,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case):
                if time.monotonic() > deadline:
                    return
                response = case.call_and_validate(checks=CHECKS, timeout=60)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

            try:
                call()
            except Unsatisfiable:  # an operation without parameters or body has no invalid request
                assert mode == GenerationMode.NEGATIVE
    return statuses


def test_every_operation_answers_within_its_schema(lm_server, cls_server, tiny_llama_dir):
    from transformers import AutoTokenizer

    schema = schemathesis.openapi.from_url(lm_server + "/openapi.json")
    assert {f"{r.ok().method.upper()} {r.ok().path}" for r in schema.get_all_operations()} == {
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /v1/classify",
        "GET /v1/models",
        "GET /v1/models/{model}",
        "POST /v1/adapters/load",
        "POST /v1/adapters/unload",
        "GET /metrics",
        "GET /health",
    }
    vocab = len(AutoTokenizer.from_pretrained(str(tiny_llama_dir)))
    deadline = time.monotonic() + TIME_LIMIT_S
    lm = run_operations(lm_server, vocab, EXAMPLES, deadline)
    cls_examples = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 10}
    cls = run_operations(cls_server, vocab, cls_examples, deadline, paths={"/v1/classify"})
    assert time.monotonic() <= deadline, f"over {TIME_LIMIT_S} s: raise the limit or lower the examples"
    # the hook works: many requests reached the engine, many were refused
    assert lm.get(200, 0) >= 40 and lm.get(400, 0) >= 100 and cls.get(200, 0) >= 5, (lm, cls)
