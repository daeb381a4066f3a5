"""InferenceEngine: LRU residency, mixed-adapter batches equal to single-adapter runs, generation options."""

from __future__ import annotations

import threading

import pytest
import torch

from adapters.config import DataConfig
from adapters.data.prompts import build_prompt_ids
from adapters.errors import ConfigError, StoreError
from adapters.modeling.generation import SamplingParams, encode_prompt, format_prompt
from adapters.serving.engine import ClassificationRequest, GenerationRequest, InferenceEngine
from adapters.serving.planner import plan_passes, resolve_rows
from tests.helpers.serving import make_adapter

PROMPTS = ["Hello there", "The capital of France is", "Once upon a time, long ago in a land", "x", "2 + 2 ="]


@pytest.fixture(scope="module")
def lm_adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-adapters")
    return {
        "A": make_adapter(tiny_llama_dir, root / "A", seed=1),
        "B": make_adapter(tiny_llama_dir, root / "B", seed=2),
        "C": make_adapter(tiny_llama_dir, root / "C", seed=3, options={"r": 8, "target_modules": "all"}),
        "D": make_adapter(tiny_llama_dir, root / "D", method="dora", seed=4),  # not mixable: split path
        "P": make_adapter(
            tiny_llama_dir, root / "P", seed=5, prompt={"system_prompt": "Answer briefly.", "instruction": "Classify:"}
        ),
    }


@pytest.fixture(scope="module")
def lm_engine(tiny_llama_dir, tmp_path_factory):
    return InferenceEngine(str(tiny_llama_dir), task="causal-lm", capacity=8, store=tmp_path_factory.mktemp("store"))


def greedy(adapter, prompt, n=8):
    return GenerationRequest(adapter=str(adapter), prompt=prompt, params=SamplingParams(max_new_tokens=n))


def test_mixed_batch_equals_each_row_alone(lm_engine, lm_adapters):
    a = lm_adapters
    rows = [
        (a["A"], PROMPTS[0]),
        (a["B"], PROMPTS[1]),
        ("base", PROMPTS[2]),
        (a["D"], PROMPTS[3]),
        (a["C"], PROMPTS[4]),
        (a["A"], PROMPTS[2]),
        ("base", PROMPTS[0]),
        (a["D"], PROMPTS[1]),
    ]
    requests = [greedy(ad, p, n=6) for ad, p in rows]
    mixed = lm_engine.generate(requests)
    for req, got in zip(requests, mixed):
        alone = lm_engine.generate([req])[0]
        assert got.token_ids == alone.token_ids, req.adapter
        assert got.adapter == req.adapter and got.completion_tokens == len(got.token_ids)
    # the adapters really differ: the same prompt gives different continuations
    same_prompt = lm_engine.generate([greedy(ad, PROMPTS[1], n=6) for ad in ("base", a["A"], a["B"], a["C"], a["D"])])
    assert len({tuple(r.token_ids) for r in same_prompt}) == 5


def test_fast_mixed_lora_equals_peft_loop(lm_engine, lm_adapters, monkeypatch):
    from adapters.serving.mixed_lora import MixedLoraForward

    a = lm_adapters
    rows = [(a["A"], PROMPTS[0]), (a["B"], PROMPTS[1]), ("base", PROMPTS[2]), (a["C"], PROMPTS[4])]
    requests = [
        GenerationRequest(adapter=str(ad), prompt=p, params=SamplingParams(max_new_tokens=8, ignore_eos=True))
        for ad, p in rows
    ]
    stacked = []
    original = MixedLoraForward._stack
    monkeypatch.setattr(
        MixedLoraForward, "_stack", lambda self, layer, names: stacked.append(names) or original(self, layer, names)
    )
    fast = lm_engine.generate(requests)
    assert stacked and all(len(names) == 4 for names in stacked)  # one stack per layer and pass, not per step
    lm_engine._layers.mixed.enabled = False
    try:
        loop = lm_engine.generate(requests)
    finally:
        lm_engine._layers.mixed.enabled = True
    assert [r.token_ids for r in fast] == [r.token_ids for r in loop]


def test_plan_mixes_lora_and_base_rows_and_splits_dora(lm_engine, lm_adapters):
    a = lm_adapters
    adapters = resolve_rows([str(a["A"]), "base", str(a["D"]), str(a["B"])], lm_engine.adapter_of)
    passes = plan_passes(adapters, lm_engine.task, lm_engine.capacity)
    assert (True, [0, 1, 3]) in passes and (False, [2]) in passes  # LoRA + base mix; DoRA alone


def test_more_adapters_than_capacity_in_one_batch(tiny_llama_dir, lm_adapters, store_root):
    engine = InferenceEngine(str(tiny_llama_dir), capacity=2, store=store_root)
    a = lm_adapters
    requests = [greedy(a[k], PROMPTS[i % len(PROMPTS)], n=4) for i, k in enumerate("ABCAB")]
    mixed = engine.generate(requests)
    assert len(engine.resident()) == 2
    for req, got in zip(requests, mixed):
        assert got.token_ids == engine.generate([req])[0].token_ids


def test_lru_eviction_load_unload(tiny_llama_dir, lm_adapters, store_root):
    a = lm_adapters
    engine = InferenceEngine(str(tiny_llama_dir), capacity=2, store=store_root)
    before = engine.generate([greedy("base", PROMPTS[1])])[0].token_ids
    engine.load(str(a["A"]))
    engine.load(str(a["B"]))
    engine.activate(str(a["A"]))  # A becomes most recently used
    engine.load(str(a["C"]))  # evicts B, the least recently used
    keys = [r["key"] for r in engine.resident()]
    assert keys == [str(a["A"].resolve()), str(a["C"].resolve())]
    assert engine.stats.evictions == 1 and engine.stats.loads == 3 and engine.stats.hits >= 1
    assert "a1" not in engine._layers.peft.peft_config  # B's peft adapter was deleted, not just hidden
    # the same folder through another spelling shares one slot
    engine.load(str(a["A"]) + "/")
    assert len(engine.resident()) == 2
    assert engine.unload(str(a["A"])) is True and engine.unload(str(a["A"])) is False
    assert engine.unload(str(a["C"])) is True
    assert engine.resident() == [] and len(engine._pool.free) == 2  # their layers are pooled for the next load
    assert engine.trim() == 2 and engine._layers.peft is None
    # with every adapter gone the base is untouched
    assert engine.generate([greedy("base", PROMPTS[1])])[0].token_ids == before
    with pytest.raises(StoreError, match="not an adapter folder"):
        engine.load(str(tiny_llama_dir))
    with pytest.raises(StoreError, match="no adapter named"):
        engine.generate([greedy("no-such-adapter@3", "hi")])


def test_activate_then_reload_is_consistent(tiny_llama_dir, lm_adapters, store_root):
    engine = InferenceEngine(str(tiny_llama_dir), capacity=3, store=store_root)
    ref = str(lm_adapters["B"])
    first = engine.generate([greedy(ref, PROMPTS[0])])[0].token_ids
    engine.unload(ref)
    engine.load(str(lm_adapters["A"]))
    assert engine.generate([greedy(ref, PROMPTS[0])])[0].token_ids == first


def test_pooled_slot_is_refilled_with_the_new_adapters_weights(tiny_llama_dir, lm_adapters, store_root):
    a, b = str(lm_adapters["A"]), str(lm_adapters["B"])  # same shape: B reuses A's layers
    fresh_b = (
        InferenceEngine(str(tiny_llama_dir), capacity=1, store=store_root)
        .generate([greedy(b, PROMPTS[2])])[0]
        .token_ids
    )
    engine = InferenceEngine(str(tiny_llama_dir), capacity=1, store=store_root)
    first_a = engine.generate([greedy(a, PROMPTS[2])])[0].token_ids
    slot_a = engine.resident()[0]["slot"]
    assert engine.generate([greedy(b, PROMPTS[2])])[0].token_ids == fresh_b
    assert engine.resident()[0]["slot"] == slot_a and len(engine._layers.peft.peft_config) == 1  # refilled, not rebuilt
    assert slot_a in engine._pool.buffers.layouts  # by one read into the slot's flat buffer
    assert engine.generate([greedy(a, PROMPTS[2])])[0].token_ids == first_a
    assert first_a != fresh_b
    # another shape cannot reuse the slot: it is deleted and a new one built
    engine.generate([greedy(str(lm_adapters["C"]), PROMPTS[2])])
    assert engine.resident()[0]["slot"] != slot_a and len(engine._layers.peft.peft_config) == 1


def test_store_versions_are_mapped_into_pooled_slots(tiny_llama_dir, lm_adapters, tmp_path):
    from adapters.serving import file_mapping
    from adapters.store.store import AdapterStore

    store = AdapterStore(tmp_path / "store")
    store.publish(lm_adapters["A"], "a")
    store.publish(lm_adapters["B"], "b")
    fresh = {
        r: InferenceEngine(str(tiny_llama_dir), capacity=1, store=store.root)
        .generate([greedy(r, PROMPTS[2])])[0]
        .token_ids
        for r in ("a@1", "b@1")
    }
    engine = InferenceEngine(str(tiny_llama_dir), capacity=1, store=store.root)
    for ref in ("a@1", "b@1", "a@1", "b@1"):  # each load reuses the one slot
        assert engine.generate([greedy(ref, PROMPTS[2])])[0].token_ids == fresh[ref]
    assert fresh["a@1"] != fresh["b@1"] and len(engine._layers.peft.peft_config) == 1
    ((_, _, mapping),) = engine._pool.buffers.layouts.values()
    assert (mapping is not None) == file_mapping.supported()
    assert store.verify() == {"a@1": [], "b@1": []}  # mapped, never written


def test_slot_buffer_never_moves_accelerator_weights_to_the_cpu(tiny_llama_dir, lm_adapters, store_root, monkeypatch):
    # The flat slot buffer lives in host memory: weights on another device (CUDA; "meta" stands in
    # for it here) must keep their own storage, or the forward would mix devices.
    engine = InferenceEngine(str(tiny_llama_dir), capacity=2, store=store_root)
    engine.load(str(lm_adapters["A"]))
    slot = engine.resident()[0]["slot"]
    buffers = engine._pool.buffers
    buffers.layouts.clear()
    on_device = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in buffers.tensors(slot).items()}
    monkeypatch.setattr(buffers, "tensors", lambda s: on_device)
    buffers.flatten(slot, lm_adapters["A"] / "adapter_model.safetensors", immutable=False)
    assert slot not in buffers.layouts and all(t.device.type == "meta" for t in on_device.values())


def test_changed_adapter_file_is_refused(tiny_llama_dir, lm_adapters, tmp_path, store_root):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(lm_adapters["A"], folder)
    engine = InferenceEngine(str(tiny_llama_dir), capacity=2, store=store_root)
    engine.load(str(folder))
    engine.unload(str(folder))
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # one weight becomes +inf
    weights.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="failed verification"):
        engine.load(str(folder))


def test_new_engine_skips_hashing_a_version_verified_before(tiny_llama_dir, lm_adapters, tmp_path, monkeypatch):
    import adapters.store.verified as verified
    from adapters.store.store import AdapterStore

    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verified, "RACY_SECONDS", 0.0)
    hashed = []
    real = verified.verify_folder
    monkeypatch.setattr(verified, "verify_folder", lambda folder: hashed.append(folder) or real(folder))
    store = AdapterStore(tmp_path / "store")
    store.publish(lm_adapters["A"], "a")
    assert list(store.verify("a@1").values()) == [[]]  # `adapters verify` (or an earlier process's load) records it
    InferenceEngine(str(tiny_llama_dir), capacity=2, store=store.root).generate([greedy("a@1", PROMPTS[1])])
    assert len(hashed) == 1  # the second process (engine) did not hash again
    weights = store.root / "a" / "1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"
    weights.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="failed verification"):
        InferenceEngine(str(tiny_llama_dir), capacity=2, store=store.root).load("a@1")


def test_generation_confidence_is_the_mean_token_probability(lm_engine, lm_adapters):
    a, b = str(lm_adapters["A"]), str(lm_adapters["B"])
    request = GenerationRequest(adapter=a, prompt=PROMPTS[1], params=SamplingParams(max_new_tokens=6), raw=True)
    alone = lm_engine.generate([request])[0]
    mixed = lm_engine.generate(
        [request, GenerationRequest(adapter=b, prompt=PROMPTS[2], params=SamplingParams(max_new_tokens=6))]
    )[0]
    ids = encode_prompt(lm_engine.tokenizer, PROMPTS[1], None, None)
    lm_engine.activate(a)
    with torch.no_grad():  # one forward over prompt + answer: log p(token | everything before it)
        logits = lm_engine._layers.peft(input_ids=torch.tensor([ids + alone.token_ids])).logits[0].float()
    steps = torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(alone.token_ids)], -1)
    expected = float(steps.gather(-1, torch.tensor(alone.token_ids).unsqueeze(-1)).mean().exp())
    assert alone.confidence == pytest.approx(expected, rel=1e-4)
    assert mixed.token_ids == alone.token_ids and mixed.confidence == pytest.approx(alone.confidence, rel=1e-4)


def test_sampling_seed_stop_and_length(lm_engine, lm_adapters):
    ref = str(lm_adapters["A"])
    sampled = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    r1 = lm_engine.generate([GenerationRequest(adapter=ref, prompt=PROMPTS[0], params=sampled)])[0]
    r2 = lm_engine.generate(
        [GenerationRequest(adapter=ref, prompt=PROMPTS[0], params=sampled), greedy(lm_adapters["B"], PROMPTS[1])]
    )[0]
    assert r1.token_ids == r2.token_ids  # the seed is per row, not per batch
    other = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=8)
    r3 = lm_engine.generate([GenerationRequest(adapter=ref, prompt=PROMPTS[0], params=other)])[0]
    assert r3.token_ids != r1.token_ids
    full = lm_engine.generate([greedy(ref, PROMPTS[1], n=12)])[0]
    assert full.finish_reason == "length" and full.completion_tokens == 12
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop
    stopped = lm_engine.generate(
        [GenerationRequest(adapter=ref, prompt=PROMPTS[1], params=SamplingParams(max_new_tokens=12, stop=[stop]))]
    )[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.text and full.text.startswith(stopped.text)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0)


def test_manifest_prompt_format_and_chat(lm_engine, lm_adapters):
    ref = str(lm_adapters["P"])
    tok = lm_engine.tokenizer
    formatted = format_prompt(
        tok, "Where is Paris?", None, {"system_prompt": "Answer briefly.", "instruction": "Classify:"}
    )
    assert (
        "Answer briefly." in formatted
        and "Classify:\nWhere is Paris?" in formatted
        and formatted.endswith("assistant\n")
    )
    # exactly the ids training built for this format
    data_cfg = DataConfig(name="x", system_prompt="Answer briefly.", instruction="Classify:")
    assert encode_prompt(
        tok, "Where is Paris?", None, {"system_prompt": "Answer briefly.", "instruction": "Classify:"}
    ) == build_prompt_ids(tok, "Where is Paris?", data_cfg)
    plain = lm_engine.generate([greedy(ref, "Where is Paris?")])[0]
    as_chat = lm_engine.generate(
        [
            GenerationRequest(
                adapter=ref,
                messages=[
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "Classify:\nWhere is Paris?"},
                ],
                params=SamplingParams(max_new_tokens=8),
            )
        ]
    )[0]
    raw = lm_engine.generate(
        [GenerationRequest(adapter=ref, prompt="Where is Paris?", raw=True, params=SamplingParams(max_new_tokens=8))]
    )[0]
    assert plain.token_ids == as_chat.token_ids  # the recorded format was applied
    assert plain.prompt_tokens > raw.prompt_tokens
    with pytest.raises(ConfigError, match="exceeds"):
        lm_engine.generate([greedy(ref, "word " * 300)])


def test_concurrent_generate_while_loading(tiny_llama_dir, lm_adapters, store_root):
    engine = InferenceEngine(str(tiny_llama_dir), capacity=2, store=store_root)
    a = lm_adapters
    refs = [str(a[k]) for k in "ABC"]
    expected = {r: engine.generate([greedy(r, PROMPTS[0], n=6)])[0].token_ids for r in refs}
    errors, done = [], threading.Event()

    def churn():
        while not done.is_set():
            for r in refs:
                engine.load(r)
                engine.unload(r)

    def client(r):
        try:
            for _ in range(3):
                assert engine.generate([greedy(r, PROMPTS[0], n=6)])[0].token_ids == expected[r]
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    churner = threading.Thread(target=churn)
    churner.start()
    clients = [threading.Thread(target=client, args=(r,)) for r in refs * 2]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    done.set()
    churner.join()
    assert not errors


# ------------------------------------------------------------------ classification
@pytest.fixture(scope="module")
def cls_adapters(tiny_bert_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cls-adapters")
    return {
        "spam": make_adapter(
            tiny_bert_dir, root / "spam", task="sequence-classification", seed=11, labels=["ham", "spam"]
        ),
        "topic": make_adapter(
            tiny_bert_dir, root / "topic", task="sequence-classification", seed=12, labels=["a", "b", "c"]
        ),
        "topic2": make_adapter(
            tiny_bert_dir, root / "topic2", task="sequence-classification", seed=13, labels=["x", "y", "z"]
        ),
        "dora": make_adapter(
            tiny_bert_dir, root / "dora", task="sequence-classification", method="dora", seed=14, labels=["no", "yes"]
        ),
    }


def test_mixed_classification_equals_each_row_alone(tiny_bert_dir, cls_adapters, store_root):
    engine = InferenceEngine(str(tiny_bert_dir), task="sequence-classification", capacity=4, store=store_root)
    c = cls_adapters
    texts = [
        "win a free prize now",
        "see you at lunch",
        "what is the capital of peru",
        "call me",
        "hello world again and again",
    ]
    refs = [c["spam"], c["topic"], c["topic2"], c["dora"], c["topic"], c["spam"]]
    requests = [ClassificationRequest(adapter=str(r), text=texts[i % len(texts)]) for i, r in enumerate(refs)]
    mixed = engine.classify(requests)
    for req, got in zip(requests, mixed):
        alone = engine.classify([req])[0]
        assert got.label == alone.label
        torch.testing.assert_close(torch.tensor(got.logits), torch.tensor(alone.logits), atol=1e-5, rtol=1e-5)
        assert abs(sum(got.probabilities.values()) - 1) < 1e-5
    assert set(mixed[0].probabilities) == {"ham", "spam"} and set(mixed[1].probabilities) == {"a", "b", "c"}
    # two three-label adapters give different logits for the same text: each row used its own head
    same = engine.classify(
        [
            ClassificationRequest(adapter=str(c["topic"]), text=texts[0]),
            ClassificationRequest(adapter=str(c["topic2"]), text=texts[0]),
        ]
    )
    assert same[0].logits != same[1].logits
    with pytest.raises(ConfigError, match="needs an adapter"):
        engine.classify([ClassificationRequest(adapter="base", text="hi")])
    with pytest.raises(ConfigError, match="causal-lm"):
        engine.generate([greedy("base", "hi")])


def test_infer_script_prompt_and_jsonl(tiny_llama_dir, lm_adapters, tmp_path, capsys, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "infer_script", Path(__file__).resolve().parents[2] / "scripts" / "infer.py"
    )
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    monkeypatch.setenv("ADAPTERKIT_STORE", str(tmp_path / "store"))
    a, b = str(lm_adapters["A"]), str(lm_adapters["B"])
    rows = [{"id": 1, "prompt": PROMPTS[0]}, {"id": 2, "prompt": PROMPTS[1], "adapter": b, "max_new_tokens": 3}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        infer.main(
            [
                "--base",
                str(tiny_llama_dir),
                "--adapter",
                a,
                "--input",
                str(tmp_path / "in.jsonl"),
                "--output",
                str(tmp_path / "out.jsonl"),
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == [1, 2] and [o["adapter"] for o in out] == [a, b]
    assert out[0]["completion_tokens"] <= 5 and out[1]["completion_tokens"] <= 3
    engine = InferenceEngine(str(tiny_llama_dir), store=tmp_path / "store")
    assert out[1]["output"] == engine.generate([greedy(b, PROMPTS[1], n=3)])[0].text
    assert (
        infer.main(["--base", str(tiny_llama_dir), "--adapter", a, "--prompt", PROMPTS[0], "--max-new-tokens", "5"])
        == 0
    )
    assert capsys.readouterr().out.strip() == out[0]["output"].strip()
    assert infer.main(["--base", str(tiny_llama_dir), "--adapter", "missing@1", "--prompt", "x"]) == 2


def test_prompt_tuning_adapter_and_one_peft_type_per_engine(tiny_llama_dir, lm_adapters, tmp_path, store_root):
    pt = make_adapter(
        tiny_llama_dir, tmp_path / "pt", method="prompt-tuning", seed=51, options={"num_virtual_tokens": 4}
    )
    engine = InferenceEngine(str(tiny_llama_dir), capacity=2, store=store_root)
    requests = [greedy(pt, PROMPTS[0], n=6), greedy("base", PROMPTS[1], n=6), greedy(pt, PROMPTS[2], n=6)]
    out = engine.generate(requests)
    for req, got in zip(requests, out):
        assert got.token_ids == engine.generate([req])[0].token_ids
    base_only = engine.generate([greedy("base", PROMPTS[0], n=6)])[0].token_ids
    assert out[0].token_ids != base_only  # the virtual tokens change the continuation
    plain = InferenceEngine(str(tiny_llama_dir), store=store_root)
    assert (
        base_only == plain.generate([greedy("base", PROMPTS[0], n=6)])[0].token_ids
    )  # base rows get no virtual tokens
    with pytest.raises(ConfigError, match="one peft type at a time"):
        engine.load(str(lm_adapters["A"]))
    engine.unload(str(pt))
    engine.load(str(lm_adapters["A"]))  # nothing resident: the engine switches type


def test_bfloat16_engine_equals_plain_peft_in_bfloat16(tiny_llama_dir, lm_adapters, store_root):
    """``serve --dtype bfloat16``: a mixed batch of LoRA rows decodes with the log-probabilities plain peft gives
    each row alone on a bfloat16 base (teacher-forced), and the adapters' weights stay float32 (peft's default)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = InferenceEngine(str(tiny_llama_dir), capacity=4, store=store_root, dtype="bfloat16")
    a = lm_adapters
    rows = [(a["A"], PROMPTS[1]), (a["B"], PROMPTS[2]), ("base", PROMPTS[0]), (a["C"], PROMPTS[4])]
    ids = [engine.tokenizer(p, add_special_tokens=False)["input_ids"] for _, p in rows]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=0)
    results = engine.generate(
        [GenerationRequest(adapter=str(ad), prompt_ids=i, params=params) for (ad, _), i in zip(rows, ids)]
    )
    assert engine._layers.base_model.lm_head.weight.dtype == torch.bfloat16
    lora = [p for n, p in engine._layers.peft.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16).eval()
    worst, gaps = 0.0, []
    for (ad, _), prompt, got in zip(rows, ids, results):
        model = base if ad == "base" else PeftModel.from_pretrained(base, str(ad)).eval()
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt + got.token_ids])).logits[0].float()
        if ad != "base":
            base = model.unload()  # the same base for the next adapter, without this one's layers
        want = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(1, torch.tensor(got.token_ids)[:, None])
        gap = (torch.tensor(got.logprobs.logprobs) - want[:, 0]).abs().max().item()
        worst = max(worst, gap)
        gaps.append(gap)
    # bfloat16 keeps ~3 significant digits: a decode step and a teacher-forced pass round differently
    assert worst < 0.03, gaps
    fp32 = InferenceEngine(str(tiny_llama_dir), capacity=4, store=store_root).generate(
        [GenerationRequest(adapter=str(ad), prompt_ids=i, params=params) for (ad, _), i in zip(rows, ids)]
    )
    assert any(r.logprobs.logprobs != f.logprobs.logprobs for r, f in zip(results, fp32))  # really bfloat16
