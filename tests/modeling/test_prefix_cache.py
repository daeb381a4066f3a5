"""Prefix caching (adapters.modeling.prefix_cache, used by adapters.modeling.decoding): rows that copy a cached
prefix's keys and values decode as rows that prefill their whole prompt, and the cache keeps its budget."""

from __future__ import annotations

import pytest
import torch

from adapters.modeling.decoding import DecodeState, decode_batch
from adapters.modeling.generation import SamplingParams
from adapters.modeling.prefix_cache import MIN_PREFIX_TOKENS, PrefixCache

SYSTEM = "You are a helpful assistant. Answer in one short sentence, and be kind to the user. "
TAILS = ["What is the capital of France?", "Name a prime number.", "Why is the sky blue?", "Count to three."]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, one_torch_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def _ids(tok, tails):
    return [tok(SYSTEM + t)["input_ids"] for t in tails]


def _decode(model, tok, prompts, cache=None, owners=None, n=6, **params):
    params = [SamplingParams(max_new_tokens=n, logprobs=1, ignore_eos=True, **params) for _ in prompts]
    return decode_batch(model, tok, prompts, params, {tok.eos_token_id}, prefix_cache=cache, owners=owners)


def test_rows_reusing_a_cached_prefix_decode_as_rows_that_prefill_it(tiny):
    model, tok = tiny
    cache = PrefixCache(64 << 20)
    first = _ids(tok, TAILS[:2])
    _decode(model, tok, first, cache, ["base"] * 2)  # fills the cache
    assert len(cache) == 2 and cache.hits == 0
    shared = len(tok(SYSTEM)["input_ids"])
    # a new tail, a prompt seen whole, a prompt sharing nothing, another new tail: one batch, ragged prefixes
    prompts = [*_ids(tok, TAILS[2:3]), first[0], tok("Plain text without the system prompt at all")["input_ids"]]
    prompts.append(_ids(tok, TAILS[3:])[0])
    got = _decode(model, tok, prompts, cache, ["base"] * 4)
    want = _decode(model, tok, prompts)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert g.logprobs.logprobs == pytest.approx(w.logprobs.logprobs, abs=1e-4)
    assert cache.hits == 3  # all but the unrelated prompt
    assert cache.hit_tokens >= 2 * (shared - 1) + len(first[0]) - 1


def test_a_row_joining_with_a_cached_prefix_equals_it_alone(tiny):
    """The cached prefix's columns and the running rows' KV cache are merged into one batch mid-flight."""
    model, tok = tiny
    cache = PrefixCache(64 << 20)
    prompts = _ids(tok, TAILS)
    _decode(model, tok, prompts[:1], cache, ["base"])
    state = DecodeState(tok, {tok.eos_token_id}, tok.pad_token_id, prefix_cache=cache)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=1)
    state.add(model, ["short"], [tok("Hi")["input_ids"]], [params])
    state.step(model)
    state.add(model, ["joined"], [prompts[1]], [params], owners=["base"])
    assert cache.hits == 1
    results = {}
    while len(state):
        for key, _, done, _ in state.step(model):
            if done is not None:
                results[key] = done
    alone = _decode(model, tok, [prompts[1]], n=5)[0]
    assert results["joined"].token_ids == alone.token_ids
    assert results["joined"].logprobs.logprobs == pytest.approx(alone.logprobs.logprobs, abs=1e-4)


def test_prefixes_belong_to_their_owner_and_scored_prompts_prefill_whole(tiny):
    model, tok = tiny
    cache = PrefixCache(64 << 20)
    prompts = _ids(tok, TAILS[:1])
    _decode(model, tok, prompts, cache, ["adapter-a"])
    _decode(model, tok, prompts, cache, ["adapter-b"])
    assert cache.hits == 0 and len(cache) == 2  # another owner's keys and values are not this one's
    params = [SamplingParams(max_new_tokens=1, prompt_logprobs=1)]
    scored = decode_batch(model, tok, prompts, params, {tok.eos_token_id}, prefix_cache=cache, owners=["adapter-a"])
    plain = decode_batch(model, tok, prompts, params, {tok.eos_token_id})
    assert cache.hits == 0  # every prompt position's logits are needed: nothing is copied
    assert scored[0].prompt_logprobs.logprobs == pytest.approx(plain[0].prompt_logprobs.logprobs, abs=1e-5)


def _kv(tokens: int, layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(2, tokens, 4), torch.randn(2, tokens, 4)) for _ in range(layers)]


def test_cache_matches_the_longest_prefix_and_keeps_its_budget():
    per_token = 2 * 2 * 2 * 4 * 4  # layers x (keys, values) x heads x head dim x float32 bytes
    cache = PrefixCache(per_token * 40)
    a, b = list(range(20)), list(range(15)) + [99] * 5
    kv_a = _kv(20)
    cache.store("o", a, kv_a)
    cache.store("o", b, _kv(20))
    assert cache.nbytes == per_token * 40 and len(cache) == 2
    n, kv = cache.lookup("o", a[:18] + [7, 7])
    assert n == 18 and torch.equal(kv[1][0], kv_a[1][0][:, :18])  # a's prefix, the longer match
    assert cache.lookup("o", a)[0] == 19  # the last token is always computed, for its logits
    assert cache.lookup("other", a) == (0, [])
    cache.store("o", a[:12], _kv(12))  # covered by a: nothing added
    assert len(cache) == 2
    cache.store("o", list(range(100, 120)), _kv(20))  # over budget: the least recently used (b) leaves
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes and not cache.covered("o", b)
    cache.store("o", list(range(200, 300)), _kv(100))  # larger than the whole budget: not stored
    assert len(cache) == 2
    assert cache.lookup("o", a[:MIN_PREFIX_TOKENS] + [5] * 9)[0] == MIN_PREFIX_TOKENS
    assert cache.lookup("o", a[: MIN_PREFIX_TOKENS - 1] + [5] * 9) == (0, [])  # too short to pay
    kv_a[0][0].zero_()
    assert cache.lookup("o", a)[1][0][0].abs().sum() > 0  # the cache holds copies
    cache.drop("o")
    assert len(cache) == 0 and cache.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(-1)


def test_a_disabled_cache_stores_nothing(tiny):
    model, tok = tiny
    cache = PrefixCache(0)
    prompts = _ids(tok, TAILS[:2])
    _decode(model, tok, prompts, cache, ["base", "base"])
    _decode(model, tok, prompts, cache, ["base", "base"])
    assert len(cache) == 0 and cache.lookups == 0
