"""HTTP serving: an OpenAI-compatible API over an InferenceEngine, with request batching.

``app.create_app(engine, settings)`` builds the FastAPI app. Endpoints: POST /v1/completions,
/v1/chat/completions (``model`` = "base" or an adapter reference), /v1/classify, GET /v1/models,
GET /v1/models/{model}, POST /v1/adapters/load, /v1/adapters/unload, GET /health, GET /metrics (Prometheus).
Errors are JSON ``{"error": {...}}`` (``schemas.ErrorResponse``) with a 4xx status for anything the client can
fix, naming the parameter at fault (an unknown or unimplemented one included); anything unexpected is logged
with its traceback and answered 500 (``middleware.UnexpectedErrorMiddleware``). One bad request never stops the
server. The OpenAPI document (/openapi.json) declares every status a route answers; ``logprobs`` formats
token log-probabilities in OpenAI's two formats.

The path of a request, e.g. POST /v1/completions:

1. ``bodies.BodyMiddleware`` refuses a body over ``settings.max_body_bytes`` (413), however it is sent, and a
   body that is not a UTF-8 JSON object sent as JSON (400).
2. ``middleware.require_bearer_token`` checks the bearer token (401), then FastAPI validates the JSON
   against ``schemas.CompletionBody`` (400 via ``middleware.handle_validation_error``).
3. ``routes.generation.completions`` receives the body and a ``routes.context.ServerContext`` (engine,
   settings, batcher, metrics of ``request.app.state``); ``ServerContext.guarded`` runs
   ``routes.generation._complete``, which checks the task, adapter reference, token limits
   (``ServerContext.check_*``) and builds one ``engine.GenerationRequest`` per prompt.
4. ``ServerContext.run_job`` hands the rows to the batcher's ``submit`` and awaits the Future (with
   ``stream``, ``streaming.stream_response`` submits them with an ``on_token`` callback and sends each
   token's text as a server-sent event).
5. With ``settings.batching = "continuous"`` (``batcher.ContinuousBatcher``), the worker thread admits the
   rows into the running decode batch between steps (``InferenceEngine.start``; adapters.serving.scheduler),
   steps every running row one token, hands each token to ``on_token`` and resolves a job's Future when its
   last row finishes. With ``"window"`` (``batcher.Batcher``) it gathers jobs for ``settings.batch_window_ms``
   into one batch and calls ``InferenceEngine.generate`` on it; classification is one ``.classify`` call either way.
6. The engine activates each row's adapter on the base model (rows of different adapters share a forward
   pass) and decodes; each job gets one result per row.
7. The route builds ``schemas.CompletionResponse``; ``ServerContext.record`` counts the request in
   ``metrics.ServerMetrics`` and hands one record per row to ``settings.on_request`` (``traffic.log_traffic``,
   usually an ``adapters.monitoring.traffic_log.TrafficLogger``). Any ``middleware.APIError`` raised on the
   way becomes a JSON error response (``middleware.handle_api_error``).
"""
