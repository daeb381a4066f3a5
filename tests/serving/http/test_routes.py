"""Route modules on their own: no model is loaded, the engine is a stub with the attributes the routes read."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from adapters.modeling.prefix_cache import PrefixCache
from adapters.serving.http.app import create_app
from adapters.serving.http.middleware import APIError, handle_api_error
from adapters.serving.http.routes import models, operations
from adapters.serving.http.settings import ServerSettings


class StubStore:
    def list(self):
        return [
            {"name": "alpha", "version": 1, "task": "causal-lm", "method": "lora", "tags": ["prod"]},
            {"name": "alpha", "version": 2, "task": "causal-lm", "method": "lora", "tags": []},
            {"name": "spam", "version": 1, "task": "sequence-classification", "method": "lora", "tags": []},
        ]


def stub_engine():
    resident = [
        {
            "name": "alpha",
            "version": 2,
            "refs": ["alpha"],
            "key": "k2",
            "method": "lora",
            "mixable": True,
            "labels": None,
            "uses": 3,
        }
    ]
    return SimpleNamespace(
        base_name="tiny-base",
        task="causal-lm",
        capacity=4,
        resident=lambda: resident,
        store_of=StubStore,
        loaded_at=1_700_000_000.0,
        stats=SimpleNamespace(hits=5, misses=1, loads=1, evictions=0),
        prefix_cache=PrefixCache(0),
    )


def test_health_and_models_through_the_factory():
    engine = stub_engine()
    with TestClient(create_app(engine, ServerSettings())) as client:
        assert client.get("/health").json() == {
            "status": "ok",
            "base": "tiny-base",
            "task": "causal-lm",
            "resident_adapters": 1,
            "capacity": 4,
            "queue_depth": 0,
        }
        data = client.get("/v1/models").json()["data"]
        assert [(m["id"], m["resident"]) for m in data] == [("base", True), ("alpha@2", True), ("alpha@1", False)]
        assert data[1]["uses"] == 3 and data[2]["tags"] == ["prod"]
        assert "adapterkit_adapter_cache_hits_total 5.0" in client.get("/metrics").text


def test_one_router_mounted_alone_on_a_bare_app():
    app = FastAPI()
    app.add_exception_handler(APIError, handle_api_error)
    app.include_router(operations.router)
    app.include_router(models.router)
    app.state.engine, app.state.settings = stub_engine(), ServerSettings(api_token="s3cret")
    app.state.batcher, app.state.metrics = SimpleNamespace(depth=lambda: 7), None
    client = TestClient(app)
    assert client.get("/health").json()["queue_depth"] == 7  # /health needs no token
    headers = {"Authorization": "Bearer s3cret"}
    assert [m["id"] for m in client.get("/v1/models", headers=headers).json()["data"]] == ["base", "alpha@2", "alpha@1"]
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_an_unexpected_error_is_logged_with_its_traceback_and_answered_as_json_500(caplog):
    engine = stub_engine()
    engine.resident = lambda: 1 / 0  # a bug in a route's path
    engine.key_of = lambda ref: "k"
    engine.load = lambda ref: [][1]  # a bug in the engine, answered through api_error_of
    with caplog.at_level(logging.ERROR), TestClient(create_app(engine, ServerSettings())) as client:
        health = client.get("/health")
        load = client.post("/v1/adapters/load", json={"adapter": "alpha"})
        assert client.post("/v1/adapters/load", json={"adapter": "base"}).status_code == 400  # still serving
    for response, error in ((health, ZeroDivisionError), (load, IndexError)):
        assert response.status_code == 500
        assert response.json()["error"] == {
            "message": f"internal error: {error.__name__}",
            "type": "server_error",
            "param": None,
            "code": 500,
        }
        assert any(r.exc_info and r.exc_info[0] is error for r in caplog.records), error


def test_openapi_declares_every_status_and_constraint_the_server_applies():
    with TestClient(create_app(stub_engine(), ServerSettings())) as client:
        schema = client.get("/openapi.json").json()
        assert client.get("/v1/nowhere").json()["error"]["code"] == 404  # the framework's errors: same shape
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            codes = set(operation["responses"])
            assert "422" not in codes and "500" in codes, (method, path)  # invalid bodies are answered 400
            assert "401" in codes or path == "/health"
            if "requestBody" in operation:
                assert {"400", "413"} <= codes
            for code in codes - {"200"}:
                ref = operation["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse")
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components
    completion, chat = components["CompletionBody"], components["ChatBody"]
    assert completion["additionalProperties"] is False and chat["additionalProperties"] is False
    assert completion["properties"]["model"]["minLength"] == 1
    seed = completion["properties"]["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["exclusiveMaximum"]) == (-(2**63), 2**64)  # torch's seed range, exact as floats
    prompt_forms = completion["properties"]["prompt"]["anyOf"]
    assert prompt_forms[0] == {"type": "string", "minLength": 1}
    assert all(form.get("minItems") == 1 for form in prompt_forms[1:])
    assert completion["properties"]["presence_penalty"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 0}
    assert {"created", "owned_by"} <= set(components["ModelCard"]["required"])
    assert "/v1/models/{model}" in schema["paths"]
