"""The HTTP API through FastAPI's TestClient: every endpoint, errors, limits, auth, metrics, traffic hook."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from adapters.modeling.generation import SamplingParams, encode_prompt
from adapters.monitoring.traffic_log import TrafficLogger
from adapters.serving.engine import ClassificationRequest, GenerationRequest, InferenceEngine
from adapters.serving.http.app import create_app
from adapters.serving.http.batcher import Batcher
from adapters.serving.http.settings import ServerSettings
from adapters.store.manifest import read_manifest, write_manifest
from adapters.store.store import AdapterStore
from tests.helpers.serving import make_adapter


@pytest.fixture(scope="module")
def lm_store(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("server-store")
    src = tmp_path_factory.mktemp("server-src")
    store = AdapterStore(root / "store")
    store.publish(make_adapter(tiny_llama_dir, src / "alpha", seed=21), "alpha", tags=("latest", "prod"))
    store.publish(make_adapter(tiny_llama_dir, src / "beta", seed=22), "beta")
    store.publish(make_adapter(tiny_llama_dir, src / "beta2", seed=23), "beta")  # beta@2 is latest
    return store


@pytest.fixture(scope="module")
def lm_engine(tiny_llama_dir, lm_store):
    return InferenceEngine(str(tiny_llama_dir), capacity=4, store=lm_store)


@pytest.fixture(scope="module")
def client(lm_engine):
    settings = ServerSettings(max_tokens=32, max_prompt_tokens=64, max_body_bytes=4000, batch_window_ms=2)
    with TestClient(create_app(lm_engine, settings)) as c:
        yield c


def metric_value(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))


def reference(engine, ref, prompt, n):
    return engine.generate([GenerationRequest(adapter=ref, prompt=prompt, params=SamplingParams(max_new_tokens=n))])[0]


def test_completions_for_two_adapters_and_base(client, lm_engine):
    seen = set()
    for ref in ("alpha", "beta@1", "beta", "base"):
        body = {"model": ref, "prompt": "The weather today", "max_tokens": 6, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        body = r.json()
        expected = reference(lm_engine, ref, "The weather today", 6)
        assert body["object"] == "text_completion" and body["model"] == ref
        assert body["choices"][0]["text"] == expected.text
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["prompt_tokens"] == expected.prompt_tokens
        assert body["usage"]["total_tokens"] == expected.prompt_tokens + expected.completion_tokens
        seen.add(body["choices"][0]["text"])
    assert len(seen) == 4  # alpha, beta@1, beta@2 and the base all answer differently
    body = {"model": "alpha@prod", "prompt": ["a", "b c"], "max_tokens": 3, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == [0, 1]


def test_chat_completions(client, lm_engine):
    messages = [{"role": "user", "content": "Say hi"}]
    body = {"model": "alpha", "messages": messages, "max_tokens": 5, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    body = r.json()
    row = GenerationRequest(adapter="alpha", messages=messages, params=SamplingParams(max_new_tokens=5))
    expected = lm_engine.generate([row])[0]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}


def test_errors_are_json_4xx_and_server_keeps_serving(client):
    cases = [
        ({"model": "nope", "prompt": "x"}, 404, "adapter_not_found"),
        ({"model": "alpha@9", "prompt": "x"}, 404, "adapter_not_found"),
        ({"model": "alpha@staging", "prompt": "x"}, 404, "adapter_not_found"),
        ({"model": "../etc", "prompt": "x"}, 400, "invalid_request_error"),  # no folder paths from clients
        ({"model": "/tmp", "prompt": "x"}, 400, "invalid_request_error"),
        ({"model": "alpha"}, 400, "invalid_request_error"),
        ({"model": "alpha", "prompt": "x", "max_tokens": 33}, 400, "invalid_request_error"),
        ({"model": "alpha", "prompt": "word " * 70}, 400, "invalid_request_error"),
        ({"model": "alpha", "prompt": "x", "n": 0}, 400, "invalid_request_error"),
        ({"model": "alpha", "prompt": "x", "n": 2, "best_of": 3}, 400, "invalid_request_error"),
        ({"model": "alpha", "prompt": "x", "stream": "maybe"}, 400, "invalid_request_error"),
        ({"model": "alpha", "prompt": "x", "temperature": -1}, 400, "invalid_request_error"),
    ]
    for body, status, kind in cases:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["type"] == kind and r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    r = client.post("/v1/classify", json={"model": "alpha", "input": "x"})
    assert r.status_code == 400 and "sequence-classification" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": "still alive", "max_tokens": 2})
    assert r.status_code == 200


def test_models_load_unload(client, lm_engine):
    r = client.post("/v1/adapters/load", json={"adapter": "beta@2"})
    assert r.status_code == 200 and r.json()["loaded"] == "beta@2"
    ids = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert ids["base"]["resident"] and ids["beta@2"]["resident"]
    assert "alpha@1" in ids and "beta@1" in ids  # stored versions are listed, resident or not
    r = client.post("/v1/adapters/unload", json={"adapter": "beta@2"})
    assert r.json()["unloaded"] is True
    assert client.get("/v1/models").json()["data"][0]["id"] == "base"
    assert not any(m["id"] == "beta@2" and m["resident"] for m in client.get("/v1/models").json()["data"])
    assert client.post("/v1/adapters/unload", json={"adapter": "beta@2"}).json()["unloaded"] is False
    assert client.post("/v1/adapters/load", json={"adapter": "ghost"}).status_code == 404
    assert client.post("/v1/adapters/load", json={"adapter": "base"}).status_code == 400
    assert client.post("/v1/adapters/load", json={"name": "x"}).status_code == 400


def test_health_docs_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    routes = {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/classify",
        "/v1/models",
        "/v1/adapters/load",
        "/health",
        "/metrics",
    }
    assert routes <= set(paths)
    client.post("/v1/completions", json={"model": "alpha", "prompt": "m", "max_tokens": 2})
    text = client.get("/metrics").text
    assert 'adapterkit_requests_total{endpoint="completions",status="200"}' in text
    assert 'adapterkit_adapter_requests_total{adapter="alpha"}' in text
    assert "adapterkit_request_latency_seconds_bucket" in text
    assert 'adapterkit_tokens_total{kind="completion"}' in text
    hits = metric_value(text, "adapterkit_adapter_cache_hits_total")
    misses = metric_value(text, "adapterkit_adapter_cache_misses_total")
    assert hits >= 1 and misses >= 1
    # the prefix cache: a long prompt sent twice reuses its first send's keys and values
    before = metric_value(text, "adapterkit_prefix_cache_hit_tokens_total")
    prompt = "Tell me, in one sentence, what a LoRA adapter is and why it is small. Then stop."
    for _ in range(2):
        client.post("/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": 1})
    text = client.get("/metrics").text
    assert metric_value(text, "adapterkit_prefix_cache_hit_tokens_total") - before >= 10
    assert metric_value(text, "adapterkit_prefix_cache_bytes") > 0


def test_bearer_token(lm_engine, monkeypatch):
    with TestClient(create_app(lm_engine, ServerSettings(api_token="s3cret"))) as c:
        body = {"model": "base", "prompt": "x", "max_tokens": 1}
        assert c.post("/v1/completions", json=body).status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/metrics").status_code == 401
        assert c.get("/health").status_code == 200
    monkeypatch.setenv("ADAPTERKIT_API_TOKEN", "from-env")
    with TestClient(create_app(lm_engine, ServerSettings())) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_traffic_hook_with_traffic_logger(lm_engine, tmp_path):
    records = []
    with TestClient(create_app(lm_engine, ServerSettings(on_request=records.append))) as c:
        c.post("/v1/completions", json={"model": "alpha", "prompt": "secret words", "max_tokens": 3})
        c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert records[0]["adapter"] == "alpha" and records[0]["status"] == 200
    assert records[0]["input_chars"] == len("secret words") and records[0]["output_tokens"] >= 1
    assert 0.0 < records[0]["confidence"] <= 1.0  # mean token probability: the LLM's drift signal
    assert records[0]["label"] is None  # alpha's reference has no answer set to watch
    assert "text" not in records[0] and "secret" not in json.dumps(records[0])  # raw text only when enabled
    assert records[1]["status"] == 404
    logger = TrafficLogger(tmp_path / "traffic.jsonl", log_text=True)
    with TestClient(create_app(lm_engine, ServerSettings(on_request=logger, traffic_include_text=True))) as c:
        c.post("/v1/completions", json={"model": "alpha", "prompt": "logged words", "max_tokens": 3})
    logger.close()
    stored = [json.loads(line) for line in (tmp_path / "traffic.jsonl").read_text().splitlines()]
    assert stored[0]["adapter"] == "alpha" and stored[0]["text"] == "logged words"


def test_answers_are_logged_as_labels_when_the_reference_watches_them(tiny_llama_dir, tmp_path):
    folder = make_adapter(tiny_llama_dir, tmp_path / "qtype", seed=24)
    manifest = read_manifest(folder)
    labels = {"source": "predictions", "counts": {"location": 3, "number": 2}}
    write_manifest(folder, {**manifest, "reference": {"labels": labels}})
    store = AdapterStore(tmp_path / "store")
    store.publish(folder, "qtype")
    engine = InferenceEngine(str(tiny_llama_dir), capacity=2, store=store)
    records = []
    with TestClient(create_app(engine, ServerSettings(on_request=records.append))) as c:
        body = {"model": "qtype", "prompt": ["Where is Paris?", "How many?"], "max_tokens": 3}
        out = c.post("/v1/completions", json=body).json()
    texts = [choice["text"] for choice in out["choices"]]
    assert [r["label"] for r in records] == [t.split("\n")[0].strip() for t in texts]
    assert all(0.0 < r["confidence"] <= 1.0 for r in records)


@pytest.fixture(scope="module")
def cls_client(tiny_bert_dir, tmp_path_factory):
    src = tmp_path_factory.mktemp("cls-src")
    store = AdapterStore(tmp_path_factory.mktemp("cls-store"))
    for name, seed, labels in (("spam", 31, ["ham", "spam"]), ("topic", 32, ["a", "b", "c"])):
        folder = make_adapter(tiny_bert_dir, src / name, task="sequence-classification", seed=seed, labels=labels)
        store.publish(folder, name)
    engine = InferenceEngine(str(tiny_bert_dir), task="sequence-classification", capacity=4, store=store)
    with TestClient(create_app(engine, ServerSettings())) as c:
        yield c, engine


def test_classify(cls_client):
    client, engine = cls_client
    for ref, labels in (("spam", {"ham", "spam"}), ("topic", {"a", "b", "c"})):
        r = client.post("/v1/classify", json={"model": ref, "input": ["free prize", "see you"]})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        expected = engine.classify([ClassificationRequest(ref, "free prize"), ClassificationRequest(ref, "see you")])
        assert [x["label"] for x in results] == [e.label for e in expected]
        assert set(results[0]["probabilities"]) == labels
        assert results[0]["confidence"] == pytest.approx(expected[0].confidence, abs=1e-5)
    assert client.post("/v1/classify", json={"model": "base", "input": "x"}).status_code == 400
    assert client.post("/v1/completions", json={"model": "spam", "prompt": "x"}).status_code == 400


def test_batcher_gathers_a_window_and_mixes_adapters_or_not():
    class RecordingEngine:
        def __init__(self):
            self.calls = []

        def generate(self, rows):
            self.calls.append([r.adapter for r in rows])
            if any(r.adapter == "bad" for r in rows):
                raise ValueError("bad row")
            return [f"{r.adapter}:{r.prompt}" for r in rows]

    for mix, expected in ((True, [["a", "b", "a"]]), (False, [["a", "a"], ["b"]])):
        engine = RecordingEngine()
        batcher = Batcher(engine, window_s=0.3, max_rows=8, mix_adapters=mix)
        futures = [batcher.submit("generate", [SimpleNamespace(adapter=a, prompt=i)]) for i, a in enumerate("aba")]
        assert [f.result(timeout=10) for f in futures] == [["a:0"], ["b:1"], ["a:2"]]
        assert engine.calls == expected
        batcher.close()
    # one failing request fails alone; the others in its batch are answered
    engine = RecordingEngine()
    batcher = Batcher(engine, window_s=0.3, max_rows=8)
    good, bad = (batcher.submit("generate", [SimpleNamespace(adapter=a, prompt=0)]) for a in ("a", "bad"))
    assert good.result(timeout=10) == ["a:0"]
    with pytest.raises(ValueError):
        bad.result(timeout=10)
    batcher.close()


def test_a_prompt_cut_to_the_adapters_max_length_is_reported(tiny_llama_dir, tmp_path):
    # An adapter trained on rows of 64 tokens: its plain-text prompts are cut as training cut them (left side).
    spec = {"system_prompt": None, "instruction": None, "max_length": 64, "prompt_side": "left"}
    store = AdapterStore(tmp_path / "store")
    store.publish(make_adapter(tiny_llama_dir, tmp_path / "short", seed=31, prompt=spec), "short")
    engine = InferenceEngine(str(tiny_llama_dir), capacity=2, store=store)
    long_prompt = " ".join(f"word{i}" for i in range(40))
    whole = len(encode_prompt(engine.tokenizer, long_prompt, None, {**spec, "max_length": None}))
    settings = ServerSettings(max_tokens=8, max_prompt_tokens=512, batch_window_ms=2)
    with TestClient(create_app(engine, settings)) as client:
        body = {"model": "short", "prompt": long_prompt, "max_tokens": 4, "temperature": 0, "echo": True}
        cut = client.post("/v1/completions", json=body)
        streamed = client.post("/v1/completions", json={**body, "stream": True, "echo": False})
        short = client.post("/v1/completions", json={**body, "prompt": "word1 word2"})
        raw = client.post("/v1/completions", json={**body, "raw": True})
    assert cut.status_code == 200, cut.text
    used = cut.json()["usage"]["prompt_tokens"]
    assert used == len(encode_prompt(engine.tokenizer, long_prompt, None, spec, 4))  # what the model saw
    assert cut.headers["x-prompt-truncated"] == str(whole - used) and whole > used
    echoed = cut.json()["choices"][0]["text"]
    assert "word39" in echoed and "word0 " not in echoed  # the left side went: the end is kept
    assert streamed.status_code == 200 and streamed.headers["x-prompt-truncated"] == str(whole - used)
    assert short.status_code == 200 and "x-prompt-truncated" not in short.headers
    assert raw.status_code == 200 and "x-prompt-truncated" not in raw.headers
