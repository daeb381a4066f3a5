"""The continuous batcher without HTTP: requests of different adapters joining a running batch get the results
of each request run alone, a bad request fails alone, cancelled requests leave, tokens reach on_token in order."""

from __future__ import annotations

import threading

import pytest

from adapters.errors import ConfigError
from adapters.modeling.generation import SamplingParams
from adapters.serving.engine import ClassificationRequest, GenerationRequest, InferenceEngine
from adapters.serving.http.batcher import ContinuousBatcher
from tests.helpers.serving import make_adapter


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("batcher-adapters")
    engine = InferenceEngine(str(tiny_llama_dir), capacity=4, store=tmp_path_factory.mktemp("batcher-store"))
    engine.refs = [str(make_adapter(tiny_llama_dir, root / f"a{i}", seed=91 + i)) for i in range(3)]
    return engine


def request(adapter: str, prompt: str, n: int, **params) -> GenerationRequest:
    return GenerationRequest(adapter=adapter, prompt=prompt, params=SamplingParams(max_new_tokens=n, **params))


@pytest.mark.parametrize("join_every_steps", [1, 3])
def test_requests_joining_mid_flight_equal_each_request_alone(engine, join_every_steps):
    a = engine.refs
    long = [request(a[0], "Once upon a time", 40, ignore_eos=True)]
    later = [
        [request(a[1], "The weather today", 6), request("base", "Hello", 9)],
        [request(a[2], "2 + 2 =", 12, stop=["e"])],
        [request(a[0], "x", 5), request(a[1], "x", 5)],
    ]
    batcher = ContinuousBatcher(engine, max_rows=8, join_every_steps=join_every_steps)
    tokens: list[int] = []
    started = threading.Event()

    def on_token(i, row, token, logprobs):
        assert logprobs is None  # none asked
        tokens.append(token)
        started.set()

    try:
        first = batcher.submit("generate", long, on_token=on_token)
        assert started.wait(30)
        futures = [batcher.submit("generate", rows) for rows in later]
        results = [f.result(timeout=60) for f in futures]
        assert not first.done()  # the short requests finished while the long one still runs
        long_result = first.result(timeout=60)
    finally:
        batcher.close()
    assert tokens == long_result[0].token_ids  # every token handed out once, in order
    for rows, got in zip([long, *later], [long_result, *results]):
        for req, res in zip(rows, got):
            alone = engine.generate([req])[0]
            assert (res.token_ids, res.text, res.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
    assert batcher.running() == 0 and engine.scheduler.running() == 0 and not engine._pool.in_use


def test_a_bad_request_fails_alone_and_cancelled_ones_leave(engine):
    a = engine.refs
    batcher = ContinuousBatcher(engine, max_rows=8, join_every_steps=1)
    try:
        running = batcher.submit("generate", [request(a[0], "Once upon a time", 60, ignore_eos=True)])
        good = batcher.submit("generate", [request(a[1], "Hi", 4)])
        bad = batcher.submit("generate", [request(a[2], "Hi", 100_000)])  # over the model's limit
        also_good = batcher.submit("generate", [request("base", "Hi", 4)])
        assert len(good.result(timeout=60)) == 1 and len(also_good.result(timeout=60)) == 1
        with pytest.raises(ConfigError, match="exceeds"):
            bad.result(timeout=60)
        batcher.cancel(running)
        assert running.cancelled()
        with pytest.raises(ConfigError, match="sequence-classification"):
            batcher.submit("classify", [ClassificationRequest(a[0], "text")]).result(timeout=60)
    finally:
        batcher.close()
    assert batcher.running() == 0 and engine.scheduler.running() == 0 and not engine._pool.in_use
