"""Operations routes: GET /health (no auth) and GET /metrics (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from adapters.serving.http.middleware import require_bearer_token
from adapters.serving.http.routes.context import Server
from adapters.serving.http.schemas import Health, error_responses

router = APIRouter()


# response_class=Response: no media type of its own, so the error bodies are documented as the JSON they are
_PROMETHEUS_TEXT = {
    200: {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


@router.get(
    "/metrics",
    tags=["operations"],
    response_class=Response,
    dependencies=[Depends(require_bearer_token)],
    responses={**_PROMETHEUS_TEXT, **error_responses(401, 500)},
)
def prometheus_metrics(server: Server):
    """Every metric of adapters.serving.http.metrics in Prometheus' text format (bearer token when one is set)."""
    return PlainTextResponse(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/health", tags=["operations"], response_model=Health, responses=error_responses(500))
def health(server: Server):
    """Liveness: base model, task, resident adapters, capacity and the batcher's queue depth."""
    engine = server.engine
    return {
        "status": "ok",
        "base": engine.base_name,
        "task": engine.task,
        "resident_adapters": len(engine.resident()),
        "capacity": engine.capacity,
        "queue_depth": server.batcher.depth(),
    }
