"""A bounded load test on loopback: the server started by the test on a free port, many concurrent
clients each on its own adapter, while another client loads and unloads adapters."""

from __future__ import annotations

import random
import threading

import httpx

from adapters.modeling.generation import SamplingParams
from adapters.serving.engine import GenerationRequest, InferenceEngine
from adapters.serving.http.app import BackgroundServer, create_app
from adapters.serving.http.settings import ServerSettings
from adapters.store.store import AdapterStore
from tests.helpers.serving import make_adapter

CLIENTS = 12
REQUESTS_PER_CLIENT = 3
MAX_TOKENS = 6


def test_concurrent_clients_each_on_its_adapter_while_adapters_churn(tiny_llama_dir, tmp_path):
    store = AdapterStore(tmp_path / "store")
    names = []
    for i in range(CLIENTS):
        name = f"client{i}"
        store.publish(make_adapter(tiny_llama_dir, tmp_path / "src" / name, seed=100 + i), name)
        names.append(name)
    # capacity below the number of adapters in flight: batches are split and adapters evicted under load
    engine = InferenceEngine(str(tiny_llama_dir), capacity=5, store=store)
    prompts = {name: f"Request number {i} says" + " hello" * (i % 4) for i, name in enumerate(names)}
    prompts["base"] = "The base model says"
    params = SamplingParams(max_new_tokens=MAX_TOKENS)
    expected = {
        ref: engine.generate([GenerationRequest(adapter=ref, prompt=prompts[ref], params=params)])[0].text
        for ref in [*names, "base"]
    }
    assert len(set(expected.values())) == len(expected)  # every adapter answers differently
    for name in names:
        engine.unload(name)

    app = create_app(engine, ServerSettings(batch_window_ms=20, max_batch_size=16))
    failures: list[str] = []
    done = threading.Event()

    def client(ref: str, url: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            for _ in range(REQUESTS_PER_CLIENT):
                body = {"model": ref, "prompt": prompts[ref], "max_tokens": MAX_TOKENS, "temperature": 0}
                r = http.post("/v1/completions", json=body)
                if r.status_code != 200:
                    failures.append(f"{ref}: HTTP {r.status_code} {r.text}")
                elif r.json()["choices"][0]["text"] != expected[ref]:
                    failures.append(f"{ref}: got {r.json()['choices'][0]['text']!r}, expected {expected[ref]!r}")

    def churn(url: str) -> None:
        rng = random.Random(0)
        with httpx.Client(base_url=url, timeout=120) as http:
            while not done.is_set():
                name = rng.choice(names)
                for action in ("load", "unload"):
                    r = http.post(f"/v1/adapters/{action}", json={"adapter": name})
                    if r.status_code != 200:
                        failures.append(f"{action} {name}: HTTP {r.status_code} {r.text}")

    with BackgroundServer(app) as server:
        assert server.url.startswith("http://127.0.0.1:")
        churner = threading.Thread(target=churn, args=(server.url,))
        clients = [threading.Thread(target=client, args=(ref, server.url)) for ref in [*names, "base"]]
        churner.start()
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        done.set()
        churner.join()
        metrics = httpx.get(server.url + "/metrics").text

    assert not failures, failures[:5]
    lines = metrics.splitlines()
    served = sum(float(line.split()[-1]) for line in lines if line.startswith("adapterkit_adapter_requests_total{"))
    assert served == (CLIENTS + 1) * REQUESTS_PER_CLIENT
    # the batcher really mixed adapters: some batches held more than one adapter
    one_adapter = 'adapterkit_batch_adapters_bucket{le="1.0"}'
    single = float(next(line.split()[-1] for line in lines if line.startswith(one_adapter)))
    total = float(next(line.split()[-1] for line in lines if line.startswith("adapterkit_batch_adapters_count")))
    assert total > single
    assert engine.stats.evictions > 0
