"""Classification route: POST /v1/classify, for a server whose base is a sequence-classification model."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends

from adapters.serving.engine import BASE, ClassificationRequest
from adapters.serving.http.middleware import APIError, require_bearer_token
from adapters.serving.http.routes.context import Server, ServerContext
from adapters.serving.http.schemas import Classification, ClassifyBody, ClassifyResponse, Usage, error_responses

router = APIRouter(dependencies=[Depends(require_bearer_token)])


async def _classify(server: ServerContext, body: ClassifyBody) -> tuple[ClassifyResponse, dict]:
    server.check_task("sequence-classification", "/v1/classify")
    ref = server.check_adapter(body.model)
    if ref == BASE:
        raise APIError(400, "model: classification needs an adapter (the base has no trained head)", param="model")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or len(texts) > server.settings.max_inputs:
        raise APIError(400, f"input: give 1 to {server.settings.max_inputs} texts", param="input")
    for t in texts:
        server.check_tokens(server.engine.count_tokens(t), "input")
    results = await server.run_job("classify", [ClassificationRequest(adapter=ref, text=t) for t in texts])
    tokens = sum(r.input_tokens for r in results)
    response = ClassifyResponse(
        id=f"cls-{uuid.uuid4().hex[:24]}",
        model=ref,
        usage=Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens),
        results=[
            Classification(index=i, label=r.label, confidence=r.confidence, probabilities=r.probabilities)
            for i, r in enumerate(results)
        ],
    )
    fields = {
        "request_id": response.id,
        "rows": len(texts),
        "input_tokens": tokens,
        "texts": texts,
        "row_input_tokens": [r.input_tokens for r in results],
        "labels": [r.label for r in results],
        "confidences": [r.confidence for r in results],
    }
    if server.settings.traffic_include_text:
        fields["input_ids"] = [server.engine.tokenizer(t)["input_ids"] for t in texts]
    return response, fields


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    tags=["classification"],
    responses=error_responses(400, 401, 404, 409, 413, 500),
)
async def classify(body: ClassifyBody, server: Server):
    """Classify each text with adapter ``model``: label, its probability and every label's probability."""
    return await server.guarded("classify", body.model, lambda: _classify(server, body))
