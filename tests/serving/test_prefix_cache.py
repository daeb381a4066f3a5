"""The engine's prefix cache: rows of several adapters, batched in a window or joining a running batch, give the
tokens they give with the cache off, and no adapter ever reuses another's (or an earlier load's) keys and values."""

from __future__ import annotations

import pytest

from adapters.errors import ConfigError
from adapters.modeling.generation import SamplingParams
from adapters.serving.engine import GenerationRequest, InferenceEngine
from tests.helpers.serving import make_adapter
from tests.serving.test_scheduler import run

SYSTEM = "You are a helpful assistant. Answer in one short sentence, and be kind to the user. "
TAILS = ["What is the capital of France?", "Name a prime number.", "Why is the sky blue?", "Count to three."]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-adapters")
    return {
        "A": str(make_adapter(tiny_llama_dir, root / "A", seed=71)),
        "B": str(make_adapter(tiny_llama_dir, root / "B", seed=72)),
        "D": str(make_adapter(tiny_llama_dir, root / "D", method="dora", seed=74)),  # a batch of its own
    }


@pytest.fixture(scope="module")
def engines(tiny_llama_dir, tmp_path_factory, one_torch_thread):
    store = tmp_path_factory.mktemp("prefix-store")
    cached = InferenceEngine(str(tiny_llama_dir), capacity=8, store=store)
    plain = InferenceEngine(str(tiny_llama_dir), capacity=8, store=store, prefix_cache_mib=0)
    return cached, plain


def request(adapter: str, tail: str, n: int = 6) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=n, logprobs=1, ignore_eos=True)
    return GenerationRequest(adapter=adapter, prompt=SYSTEM + tail, params=params)


def _same(got, want):
    assert got.token_ids == want.token_ids, got.adapter
    assert got.logprobs.logprobs == pytest.approx(want.logprobs.logprobs, abs=1e-4)


def test_window_batches_reusing_prefixes_equal_the_cache_off(engines, adapters):
    cached, plain = engines
    a = adapters
    warm = [request(ref, TAILS[0]) for ref in ("base", a["A"], a["B"], a["D"])]
    cached.generate(warm)
    assert cached.prefix_cache.hits == 0 and len(cached.prefix_cache) == 4  # one owner each
    rows = [request(ref, tail) for ref in ("base", a["A"], a["B"], a["D"]) for tail in TAILS[1:3]]
    for got, want in zip(cached.generate(rows), plain.generate(rows)):
        _same(got, want)
    assert cached.prefix_cache.hits == len(rows) and len(plain.prefix_cache) == 0
    # the adapters really differ on these prompts, so a wrong owner would show
    assert len({tuple(r.token_ids) for r in plain.generate(warm)}) == 4


def test_rows_joining_a_running_batch_with_cached_prefixes_equal_the_cache_off(engines, adapters):
    cached, plain = engines
    a = adapters
    schedule = {
        0: [request(a["A"], TAILS[3], 10), request("base", TAILS[2], 4)],
        2: [request(a["B"], TAILS[3], 6), request(a["D"], TAILS[2], 5)],
        4: [request(a["A"], TAILS[1], 7), request(a["B"], "A new question, not seen before?", 4)],
    }
    hits = cached.prefix_cache.hits
    got, _, _ = run(cached, schedule)
    want, _, _ = run(plain, schedule)
    for g, w in zip(got, want):
        _same(g, w)
    assert cached.prefix_cache.hits - hits >= 4  # rows after the first share the system prompt with them


def test_an_adapter_refilled_into_a_slot_does_not_reuse_its_predecessors_prefixes(tiny_llama_dir, adapters, tmp_path):
    a, b = adapters["A"], adapters["B"]  # same shape: B is refilled into A's slot
    fresh_b = InferenceEngine(str(tiny_llama_dir), capacity=1, store=tmp_path, prefix_cache_mib=0)
    want_b = fresh_b.generate([request(b, TAILS[0])])[0]
    engine = InferenceEngine(str(tiny_llama_dir), capacity=1, store=tmp_path)
    first_a = engine.generate([request(a, TAILS[0])])[0]
    slot = engine.resident()[0]["slot"]
    _same(engine.generate([request(b, TAILS[0])])[0], want_b)
    assert engine.resident()[0]["slot"] == slot and engine.prefix_cache.hits == 0
    _same(engine.generate([request(a, TAILS[0])])[0], first_a)  # A's second load: its own prefixes again
    assert engine.prefix_cache.hits == 0
    engine.generate([request(a, TAILS[1])])
    assert engine.prefix_cache.hits == 1  # this load's prefix is reused
    # evicted loads' prefixes went with them (no later row can use them): only the resident load's are kept
    owners = {key[0] for key in engine.prefix_cache._entries}
    assert owners == {entry.owner for entry in engine._pool.resident.values()}
    engine.unload(a)
    assert len(engine.prefix_cache) == 0 and engine.prefix_cache.nbytes == 0


def test_in_bfloat16_reuse_moves_logprobs_no_more_than_batching_does(tiny_llama_dir, tmp_path, one_torch_thread):
    """bfloat16 rounds differently for every batch shape: prefilling a suffix after cached keys is one more
    shape, so first-token logprobs move within bfloat16's rounding (as a batch neighbour moves them), no more."""
    cached, plain = (
        InferenceEngine(str(tiny_llama_dir), store=tmp_path, dtype="bfloat16", prefix_cache_mib=mib) for mib in (64, 0)
    )
    first = [request("base", TAILS[0], 1)]
    cached.generate(first)
    rows = [request("base", tail, 1) for tail in TAILS[1:]]
    on = [r.logprobs.logprobs[0] for r in cached.generate(rows)]
    off = [r.logprobs.logprobs[0] for r in plain.generate(rows)]
    alone = [plain.generate([row])[0].logprobs.logprobs[0] for row in rows]
    assert cached.prefix_cache.hits == len(rows)
    batching = max(abs(a - b) for a, b in zip(off, alone))
    assert max(abs(a - b) for a, b in zip(on, off)) <= max(2 * batching, 0.01)


def test_a_negative_prefix_cache_size_is_refused(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="prefix_cache_mib must be >= 0"):
        InferenceEngine(str(tiny_llama_dir), store=tmp_path, prefix_cache_mib=-1)
