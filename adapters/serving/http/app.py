"""The app factory ``create_app(engine, settings)``, and BackgroundServer to run an app from a thread."""

from __future__ import annotations

import threading
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from adapters import __version__
from adapters.serving.engine import InferenceEngine
from adapters.serving.http.batcher import Batcher, ContinuousBatcher
from adapters.serving.http.bodies import BodyMiddleware
from adapters.serving.http.metrics import ServerMetrics
from adapters.serving.http.middleware import (
    APIError,
    UnexpectedErrorMiddleware,
    handle_api_error,
    handle_http_error,
    handle_validation_error,
)
from adapters.serving.http.routes import ROUTERS
from adapters.serving.http.settings import ServerSettings


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    app.state.batcher.close()


def create_app(engine: InferenceEngine, settings: ServerSettings | None = None) -> FastAPI:
    """A FastAPI app serving ``engine`` (an OpenAI-compatible API, see adapters.serving.http).

    ``app.state`` holds the engine, settings (default ServerSettings()), batcher and metrics the routes read;
    the batcher's worker thread starts here and stops when the app shuts down (its lifespan).
    """
    settings = settings or ServerSettings()
    metrics = ServerMetrics(engine)
    if settings.batching == "continuous":
        batcher = ContinuousBatcher(
            engine,
            settings.max_batch_size,
            on_batch=metrics.observe_batch,
            mix_adapters=settings.mix_adapters,
            join_every_steps=settings.join_every_steps,
        )
    else:
        batcher = Batcher(
            engine,
            settings.batch_window_ms / 1000.0,
            settings.max_batch_size,
            on_batch=metrics.observe_batch,
            mix_adapters=settings.mix_adapters,
        )
    app = FastAPI(
        lifespan=_lifespan,
        title="adapterkit server",
        version=__version__,
        description="Many adapters on one base model. `model` selects `base` or an adapter reference "
        "(name, name@3, name@prod).",
    )
    app.state.engine, app.state.settings, app.state.batcher, app.state.metrics = engine, settings, batcher, metrics
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(HTTPException, handle_http_error)
    for router in ROUTERS:
        app.include_router(router)
    # the routes (included without a prefix) that take a JSON body: BodyMiddleware checks it before FastAPI
    json_paths = frozenset(
        r.path for router in ROUTERS for r in router.routes if isinstance(r, APIRoute) and r.dependant.body_params
    )
    app.add_middleware(BodyMiddleware, max_bytes=settings.max_body_bytes, json_paths=json_paths)
    app.add_middleware(UnexpectedErrorMiddleware)  # added last: outermost
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's OpenAPI document without the 422 it declares for every body: invalid bodies are answered 400
    (middleware.handle_validation_error), and each route declares its statuses with schemas.error_responses."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


class BackgroundServer:
    """uvicorn serving ``app`` from a thread, on ``host`` and a free port (port 0) unless one is given.

    For tests and benchmarks: ``with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")``.
    Entering raises RuntimeError when uvicorn has not started within 30 s.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="adapterkit-uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
