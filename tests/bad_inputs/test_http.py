"""The HTTP kind of the bad-input corpus: every request of tests/bad_inputs/http/cases.yaml gets its 4xx status
and one-line message in the documented shape {"error": {"message", "type", "param", "code"}}, with no traceback,
no store path and no other adapter's name in the body; the store is left byte-identical and the server still
answers a good request afterwards.

The server: FastAPI's TestClient over create_app with the tiny Llama (tests/conftest.py) and a store of two
adapters (tests/helpers/serving.make_adapter). Bodies that need generating (oversized, chunked, a Content-Length
that lies) come from the builders below, named by a case's ``build``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from adapters.serving.engine import InferenceEngine
from adapters.serving.http.app import create_app
from adapters.serving.http.settings import ServerSettings
from adapters.store.store import AdapterStore
from tests.helpers.serving import make_adapter

HERE = Path(__file__).parent / "http"
CASES = yaml.safe_load((HERE / "cases.yaml").read_text(encoding="utf-8"))
TOKEN = "corpus-token"
LIMIT = 4000  # max_body_bytes of the server under test
GOOD = {"model": "alpha", "prompt": "still here", "max_tokens": 1, "temperature": 0}


def _oversized_json() -> bytes:
    body = json.dumps({"model": "alpha", "prompt": "x" * (LIMIT + 1000), "max_tokens": 1}).encode()
    assert len(body) > LIMIT
    return body


def oversized() -> dict:
    """A body over the limit with its true Content-Length."""
    return {"content": _oversized_json()}


def chunked() -> dict:
    """A body over the limit sent chunked (a generator: no Content-Length)."""
    body = _oversized_json()
    return {"content": (body[i : i + 512] for i in range(0, len(body), 512))}


def lying_length() -> dict:
    """A body over the limit whose Content-Length claims 100 bytes."""
    return {"content": _oversized_json(), "headers": {"content-length": "100"}}


def declared_huge() -> dict:
    """A small body whose Content-Length claims a terabyte."""
    return {"content": b"{}", "headers": {"content-length": str(10**12)}}


BUILDERS = {f.__name__: f for f in (oversized, chunked, lying_length, declared_huge)}


@pytest.fixture(scope="module")
def store(tiny_llama_dir, tmp_path_factory) -> AdapterStore:
    src = tmp_path_factory.mktemp("bad-http-src")
    store = AdapterStore(tmp_path_factory.mktemp("bad-http-store") / "store")
    store.publish(make_adapter(tiny_llama_dir, src / "alpha", seed=61), "alpha", tags=("prod",))
    store.publish(make_adapter(tiny_llama_dir, src / "beta", seed=62), "beta")
    return store


@pytest.fixture(scope="module")
def client(tiny_llama_dir, store, one_torch_thread):
    engine = InferenceEngine(str(tiny_llama_dir), capacity=2, store=store)
    settings = ServerSettings(api_token=TOKEN, max_body_bytes=LIMIT, max_tokens=32, max_prompt_tokens=64, max_inputs=4)
    with TestClient(create_app(engine, settings), raise_server_exceptions=False) as c:
        yield c


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _send(client: TestClient, case: dict):
    headers = {"content-type": "application/json"}
    if case.get("auth", True):
        headers["authorization"] = f"Bearer {TOKEN}"
    kwargs: dict = {}
    if "json" in case:
        kwargs["content"] = json.dumps(case["json"]).encode()
    elif "body" in case:
        kwargs["content"] = case["body"].encode("utf-8")
    elif "body_file" in case:
        kwargs["content"] = (HERE / case["body_file"]).read_bytes()
    elif "build" in case:
        kwargs = BUILDERS[case["build"]]()
    headers.update(kwargs.pop("headers", {}))
    headers.update(case.get("headers") or {})
    return client.request(case.get("method", "POST"), case.get("path", "/v1/completions"), headers=headers, **kwargs)


def test_the_corpus_holds_at_least_30_distinct_cases():
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    assert all(c.get("about") and c["expect"].get("message") and 400 <= c["expect"]["status"] < 500 for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_request_gets_its_4xx_in_the_documented_shape(case, client, store):
    before = _snapshot(store.root)
    response = _send(client, case)
    expect = case["expect"]
    text = response.text
    assert response.status_code == expect["status"], text
    assert "Traceback" not in text and str(store.root) not in text and "/tmp" not in text
    assert "beta" not in text  # another adapter's name is never listed to a client
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["code"] == expect["status"] and isinstance(error["type"], str) and error["type"]
    message = error["message"]
    assert "\n" not in message, message
    assert re.search(expect["message"], message), message
    if "param" in expect:
        assert error["param"] == expect["param"], error
    assert _snapshot(store.root) == before  # a bad request writes nothing
    good = client.post("/v1/completions", json=GOOD, headers={"authorization": f"Bearer {TOKEN}"})
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length"), good.text
