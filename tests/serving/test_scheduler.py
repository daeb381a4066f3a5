"""Continuous batching in the engine (InferenceEngine.start + engine.scheduler): rows joining and leaving a
running decode batch give the tokens of each row decoded alone, and adapters of running rows stay put."""

from __future__ import annotations

import pytest

from adapters.errors import ConfigError
from adapters.modeling.generation import SamplingParams
from adapters.serving.engine import GenerationRequest, InferenceEngine, generation_result
from tests.helpers.serving import make_adapter

PROMPTS = ["Hello there", "The capital of France is", "Once upon a time, long ago in a land", "x", "2 + 2 ="]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("scheduler-adapters")
    return {
        "A": str(make_adapter(tiny_llama_dir, root / "A", seed=61)),
        "B": str(make_adapter(tiny_llama_dir, root / "B", seed=62)),
        "C": str(make_adapter(tiny_llama_dir, root / "C", seed=63, options={"r": 8, "target_modules": "all"})),
        "D": str(make_adapter(tiny_llama_dir, root / "D", method="dora", seed=64)),  # not mixable: its own batch
    }


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, tmp_path_factory, one_torch_thread):
    return InferenceEngine(str(tiny_llama_dir), capacity=8, store=tmp_path_factory.mktemp("scheduler-store"))


def request(adapter: str, prompt: str, n: int = 8, **params) -> GenerationRequest:
    return GenerationRequest(adapter=adapter, prompt=prompt, params=SamplingParams(max_new_tokens=n, **params))


def run(engine: InferenceEngine, schedule: dict[int, list[GenerationRequest]], cancel: dict[int, list[int]] = None):
    """Admit schedule[s] before step s and step until every row is done. Returns each request's result (None
    if cancelled) in admission order, the order in which they finished, and the tokens each emitted."""
    requests = [r for s in sorted(schedule) for r in schedule[s]]
    live, results, order, tokens = [], {}, [], {}
    step = 0
    while step <= max(schedule) or engine.scheduler.running():
        if step in schedule:
            live.extend(engine.start(schedule[step]))
        for index in (cancel or {}).get(step, []):
            engine.scheduler.cancel([live[index]])
        for event in engine.scheduler.step():
            i = live.index(event.row)
            assert event.error is None
            if event.token is not None:
                tokens.setdefault(i, []).append(event.token)
            if event.done is not None:
                results[i] = generation_result(event.row.ref, event.row.prompt_ids, event.done)
                order.append(i)
        step += 1
        assert step < 500
    return [results.get(i) for i in range(len(requests))], order, tokens


def test_rows_joining_mid_flight_equal_each_row_alone(engine, adapters):
    a = adapters
    schedule = {
        0: [request(a["A"], PROMPTS[0], 12)],
        2: [request(a["B"], PROMPTS[1], 6), request("base", PROMPTS[2], 9)],
        3: [request(a["D"], PROMPTS[3], 7), request(a["C"], PROMPTS[4], 5)],
        5: [request(a["A"], PROMPTS[2], 10, stop=["e"]), request(a["D"], PROMPTS[0], 4)],
        9: [request(a["B"], PROMPTS[3], 3, logprobs=2)],
    }
    got, _, tokens = run(engine, schedule)
    requests = [r for s in sorted(schedule) for r in schedule[s]]
    for i, (req, res) in enumerate(zip(requests, got)):
        alone = engine.generate([req])[0]
        assert res.token_ids == alone.token_ids and res.text == alone.text, req.adapter
        assert res.finish_reason == alone.finish_reason and res.prompt_ids == alone.prompt_ids
        assert tokens.get(i, []) == res.token_ids  # every emitted token was handed out, in order
    assert got[-1].logprobs.token_ids == got[-1].token_ids and len(got[-1].logprobs.top[0]) == 2
    alone = engine.generate([requests[-1]])[0]
    assert got[-1].logprobs.logprobs == pytest.approx(alone.logprobs.logprobs, abs=1e-4)
    assert engine.scheduler.running() == 0 and not engine._pool.in_use


def test_a_short_row_never_waits_for_a_long_one(engine, adapters):
    long = request(adapters["A"], PROMPTS[2], 40, ignore_eos=True)
    short = request(adapters["B"], PROMPTS[0], 3, ignore_eos=True)
    got, order, _ = run(engine, {0: [long], 4: [short]})
    assert order == [1, 0]  # joined after the long one started, finished first
    assert got[0].completion_tokens == 40 and got[1].completion_tokens == 3


def test_cancelled_row_leaves_and_the_others_go_on(engine, adapters):
    rows = [request(adapters["A"], PROMPTS[1], 20, ignore_eos=True), request(adapters["C"], PROMPTS[4], 12)]
    got, _, _ = run(engine, {0: rows}, cancel={3: [0]})
    assert got[0] is None
    assert got[1].token_ids == engine.generate([rows[1]])[0].token_ids
    assert engine.scheduler.running() == 0 and not engine._pool.in_use


def test_adapters_of_running_rows_are_never_evicted_and_unload_waits(tiny_llama_dir, adapters, store_root):
    engine = InferenceEngine(str(tiny_llama_dir), capacity=3, store=store_root)
    req = request(adapters["A"], PROMPTS[1], 10, ignore_eos=True)
    expected = engine.generate([req])[0].token_ids
    engine.unload(adapters["A"])
    live = engine.start([req])
    engine.scheduler.step()
    assert engine.unload(adapters["A"])  # deferred: the row still runs on it
    for ref in (adapters["B"], adapters["C"], adapters["D"], adapters["B"]):  # churn past capacity
        engine.load(ref)
        engine.unload(ref)
        engine.load(ref)
    done = None
    while engine.scheduler.running():
        for event in engine.scheduler.step():
            done = event.done or done
    assert event.row is live[0] and done.token_ids == expected
    assert engine._pool.resident.get(engine.key_of(adapters["A"])) is None  # the unload happened at the end
    # two rows of one adapter and a third adapter leave one slot free of running rows: capacity 3 takes them
    assert engine.start([request(adapters["B"], "a"), request(adapters["C"], "b")]) is not None
    assert engine.start([request(adapters["D"], "c")]) is None  # would pin every slot: waits
    while engine.scheduler.running():
        engine.scheduler.step()


def test_bad_rows_fail_alone(engine, adapters):
    live = engine.start([request(adapters["A"], PROMPTS[0], 6)])
    with pytest.raises(ConfigError, match="exceeds"):
        engine.start([request(adapters["B"], PROMPTS[1], 10_000)])
    while engine.scheduler.running():
        engine.scheduler.step()
    assert live and not engine._pool.in_use


def test_prompt_learning_rows_are_generated_at_admission(tiny_llama_dir, store_root, tmp_path):
    pt = str(
        make_adapter(
            tiny_llama_dir, tmp_path / "pt", method="prompt-tuning", seed=71, options={"num_virtual_tokens": 4}
        )
    )
    engine = InferenceEngine(str(tiny_llama_dir), capacity=2, store=store_root)
    rows = [request(pt, PROMPTS[0], 6), request("base", PROMPTS[1], 6)]
    got, _, _ = run(engine, {0: rows[:1], 1: rows[1:]})
    assert [g.token_ids for g in got] == [engine.generate([r])[0].token_ids for r in rows]


def test_a_refilled_slot_joins_a_running_mixed_batch_with_its_own_weights(
    tiny_llama_dir, adapters, store_root, tmp_path
):
    """The mixed-LoRA stacks follow residency: C is loaded and unloaded while A and B decode, E refills C's
    pooled slot and joins the running batch; every row still gets the tokens it gets alone."""
    e = str(make_adapter(tiny_llama_dir, tmp_path / "E", seed=65, options={"r": 8, "target_modules": "all"}))
    engine = InferenceEngine(str(tiny_llama_dir), capacity=5, store=store_root)
    rows = [request(adapters["A"], PROMPTS[1], 14, ignore_eos=True), request(adapters["B"], PROMPTS[2], 12)]
    late = [request(adapters["C"], PROMPTS[4], 6, ignore_eos=True), request(e, PROMPTS[0], 8, ignore_eos=True)]
    reference = InferenceEngine(str(tiny_llama_dir), capacity=5, store=store_root)
    expected = [reference.generate([r])[0].token_ids for r in rows + late]
    live = engine.start(rows)  # C's slot does not exist yet
    engine.scheduler.step()
    engine.load(adapters["C"])
    slot_c = engine.resident()[-1]["slot"]
    live += engine.start(late[:1])
    engine.scheduler.step()
    engine.scheduler.cancel(live[2:])
    engine.unload(adapters["C"])
    live += engine.start(late)  # E refills C's slot (same shapes); C loads again beside it
    assert slot_c in {entry["slot"] for entry in engine.resident()}
    done = {}
    while engine.scheduler.running():
        for event in engine.scheduler.step():
            if event.done is not None:
                done[live.index(event.row)] = event.done.token_ids
    assert [done[i] for i in (0, 1, 3, 4)] == expected
