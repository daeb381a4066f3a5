"""HTTP serving: an OpenAI-compatible API over an InferenceEngine, with request batching.

``create_app(engine, settings)`` returns a FastAPI app. Concurrent requests are gathered
for a short window (``batch_window_ms``) into one engine batch, which may mix adapters; a
single worker thread runs the batches, so the event loop keeps accepting requests.

Endpoints: POST /v1/completions, /v1/chat/completions (``model`` = "base" or an adapter
reference), /v1/classify, GET /v1/models, POST /v1/adapters/load, /v1/adapters/unload,
GET /health, GET /metrics (Prometheus). Errors are JSON ``{"error": {...}}`` with a 4xx
status for anything the client can fix; one bad request never stops the server.

Traffic logging hook: ``settings.on_request(record)`` is called after each request with the
adapter, input length and token counts, the predicted label and confidence (classification),
latency and status; raw text and token ids only with ``traffic_include_text``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from adapters.serving.engine import BASE, ClassificationRequest, GenerationRequest, InferenceEngine
from adapters.errors import BaseMismatchError, ConfigError, StoreError
from adapters.evaluation.evaluator import first_line_answer
from adapters.modeling.generation import SamplingParams

log = logging.getLogger(__name__)

TOKEN_ENV = "ADAPTERKIT_API_TOKEN"


class ServerSettings(BaseModel):
    """Limits, batching and auth of the HTTP server."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    api_token: str | None = Field(None, description=f"Bearer token required on /v1/* and /metrics (default: env {TOKEN_ENV}).")
    max_body_bytes: int = Field(1_000_000, ge=1, description="Largest request body accepted (413 above).")
    max_prompt_tokens: int = Field(2048, ge=1, description="Longest prompt / input in tokens (400 above).")
    max_tokens: int = Field(512, ge=1, description="Largest max_tokens a request may ask for (400 above).")
    max_inputs: int = Field(32, ge=1, description="Most prompts / texts in one request.")
    max_batch_size: int = Field(16, ge=1, description="Most rows the batcher puts into one engine call.")
    batch_window_ms: float = Field(5.0, ge=0, description="How long the batcher waits for more requests after the first.")
    mix_adapters: bool = Field(True, description="Let one engine batch hold requests for different adapters (off: one batch per adapter).")
    allow_path_refs: bool = Field(False, description="Accept adapter folder paths from clients (off: only store references, so clients cannot probe the server's files).")
    on_request: Callable[[dict], Any] | None = Field(None, exclude=True, description="Traffic hook, called with one record per request.")
    traffic_include_text: bool = Field(False, description="Pass raw input/output text and token ids to on_request.")

    def token(self) -> str | None:
        return self.api_token if self.api_token is not None else (os.environ.get(TOKEN_ENV) or None)


# ------------------------------------------------------------------ request / response bodies
class _Body(BaseModel):
    # OpenAI clients send fields we do not use (user, presence_penalty...): accept and ignore them.
    model_config = ConfigDict(extra="allow")


class CompletionBody(_Body):
    model: str = Field(BASE, description='"base" or an adapter reference: name, name@3, name@prod.')
    prompt: str | list[str] = Field(..., description="A prompt or a list of prompts (one choice each).")
    max_tokens: int = Field(16, ge=1, description="New tokens to generate at most.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, description="Makes sampling reproducible for this request.")
    stop: str | list[str] | None = Field(None, description="Stop strings (not included in the text).")
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: Literal[False] = Field(False, description="Streaming is not supported.")
    raw: bool = Field(False, description="Do not apply the adapter's training prompt format to the prompt.")
    ignore_eos: bool = Field(False, description="Generate max_tokens even past the end-of-sequence token (benchmarks).")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    model: str = Field(BASE, description='"base" or an adapter reference.')
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: Literal[False] = False


class ClassifyBody(_Body):
    model: str = Field(..., description="The classification adapter's reference.")
    input: str | list[str] = Field(..., description="A text or a list of texts.")


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(..., description="Adapter reference: name, name@3, name@prod or a folder.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: str


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Classification(BaseModel):
    index: int
    label: str
    confidence: float
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["classification"] = "classification"
    model: str
    results: list[Classification]
    usage: Usage


# ------------------------------------------------------------------ errors
class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


def api_error_of(err: Exception) -> APIError:
    """Map an engine error to an HTTP status the client can act on."""
    if isinstance(err, APIError):
        return err
    message = str(err)
    if isinstance(err, BaseMismatchError):
        return APIError(409, message, "base_mismatch")
    if isinstance(err, StoreError):
        missing = any(s in message for s in ("no adapter named", "has no version", "has no tag", "does not exist", "has no versions", "was removed"))
        return APIError(404 if missing else 400, message, "adapter_not_found" if missing else "adapter_error", "model")
    if isinstance(err, ConfigError):
        return APIError(400, message)
    return APIError(500, f"internal error: {type(err).__name__}", "server_error")


# ------------------------------------------------------------------ batching
@dataclass
class _Job:
    kind: Literal["generate", "classify"]
    rows: list  # GenerationRequest | ClassificationRequest
    future: Future = field(default_factory=Future)


class Batcher:
    """Gathers jobs for ``window`` seconds (up to ``max_rows`` rows) and runs them as one engine batch."""

    def __init__(self, engine: InferenceEngine, window_s: float, max_rows: int, on_batch: Callable[[int, int], None] | None = None,
                 mix_adapters: bool = True):
        self.engine, self.window_s, self.max_rows, self.on_batch = engine, window_s, max_rows, on_batch
        self.mix_adapters = mix_adapters
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="adapterkit-batcher", daemon=True)
        self._thread.start()

    def submit(self, kind: str, rows: list) -> Future:
        job = _Job(kind, rows)  # type: ignore[arg-type]
        self._queue.put(job)
        return job.future

    def depth(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        pending: list[_Job] = []
        while True:
            job = pending.pop(0) if pending else self._queue.get()
            if job is None:
                return
            batch, rows = [job], len(job.rows)
            deadline = time.perf_counter() + self.window_s
            while rows < self.max_rows:
                remaining = deadline - time.perf_counter()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                if rows + len(nxt.rows) > self.max_rows:
                    pending.append(nxt)
                    break
                batch.append(nxt)
                rows += len(nxt.rows)
            groups: dict[tuple, list[_Job]] = {}
            for j in batch:
                adapter = None if self.mix_adapters else j.rows[0].adapter
                groups.setdefault((j.kind, adapter), []).append(j)
            for (kind, _), jobs in groups.items():
                try:
                    self._execute(kind, jobs)
                except Exception as err:  # noqa: BLE001 - keep the worker alive whatever happens
                    log.exception("batch failed")
                    for j in jobs:
                        if not j.future.done():
                            j.future.set_exception(err)

    def _execute(self, kind: str, jobs: list[_Job]) -> None:
        run = self.engine.generate if kind == "generate" else self.engine.classify
        rows = [r for j in jobs for r in j.rows]
        try:
            results = run(rows)
        except Exception as err:  # noqa: BLE001 - one bad job must not fail the others
            if len(jobs) == 1:
                jobs[0].future.set_exception(err)
            else:  # find the bad one: run each job alone
                for j in jobs:
                    self._execute(kind, [j])
            return
        if self.on_batch:
            self.on_batch(len(rows), len({getattr(r, "adapter", None) for r in rows}))
        start = 0
        for j in jobs:
            j.future.set_result(results[start : start + len(j.rows)])
            start += len(j.rows)


# ------------------------------------------------------------------ metrics
class _Metrics:
    def __init__(self, engine: InferenceEngine):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter("adapterkit_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "adapterkit_request_latency_seconds", "Request latency by endpoint.", ["endpoint"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tokens = Counter("adapterkit_tokens", "Tokens processed, by kind (prompt, completion).", ["kind"], registry=self.registry)
        self.adapter_requests = Counter("adapterkit_adapter_requests", "Served rows per adapter reference.", ["adapter"], registry=self.registry)
        self.batch_rows = Histogram("adapterkit_batch_rows", "Rows per engine batch.", registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_adapters = Histogram("adapterkit_batch_adapters", "Distinct adapters per engine batch.", registry=self.registry, buckets=(1, 2, 4, 8, 16, 32))

        class EngineCollector:
            def collect(self_inner):
                s = engine.stats
                for name, value, doc in (
                    ("adapterkit_adapter_cache_hits", s.hits, "Adapter look-ups served by a resident adapter."),
                    ("adapterkit_adapter_cache_misses", s.misses, "Adapter look-ups that had to load the adapter."),
                    ("adapterkit_adapter_loads", s.loads, "Adapters loaded."),
                    ("adapterkit_adapter_evictions", s.evictions, "Adapters deleted from memory (LRU or unload)."),
                ):
                    family = CounterMetricFamily(name, doc)
                    family.add_metric([], value)
                    yield family
                resident = GaugeMetricFamily("adapterkit_resident_adapters", "Adapters resident in memory.")
                resident.add_metric([], len(engine.resident()))
                yield resident
                capacity = GaugeMetricFamily("adapterkit_adapter_capacity", "Most adapters resident at once.")
                capacity.add_metric([], engine.capacity)
                yield capacity

        self.registry.register(EngineCollector())

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ------------------------------------------------------------------ body size limit
class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Reject bodies over ``max_bytes`` (413), by Content-Length or while reading a chunked body."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _error_response(413, f"request body over the limit of {self.max_bytes} bytes", "request_too_large")(scope, receive, send)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _error_response(413, f"request body over the limit of {self.max_bytes} bytes", "request_too_large")(scope, receive, send)


# ------------------------------------------------------------------ the app
def create_app(engine: InferenceEngine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = _Metrics(engine)
    batcher = Batcher(
        engine, settings.batch_window_ms / 1000.0, settings.max_batch_size,
        on_batch=lambda rows, adapters: (metrics.batch_rows.observe(rows), metrics.batch_adapters.observe(adapters)),
        mix_adapters=settings.mix_adapters,
    )
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(
        lifespan=lifespan,
        title="adapterkit server",
        version=_version(),
        description="Many adapters on one base model. `model` selects `base` or an adapter reference (name, name@3, name@prod).",
    )
    app.state.engine, app.state.settings, app.state.batcher, app.state.metrics = engine, settings, batcher, metrics
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return _error_response(err.status, err.message, err.kind, err.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {e.get('msg')}")
        return _error_response(400, "invalid request: " + "; ".join(problems), "invalid_request_error")

    def check_auth(request: Request) -> None:
        token = settings.token()
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise APIError(401, "missing or wrong bearer token (Authorization: Bearer <token>)", "authentication_error")

    api = APIRouter(dependencies=[Depends(check_auth)])

    # -------------------------------------------------------------- helpers
    def check_adapter(ref: str) -> str:
        if not isinstance(ref, str) or not ref.strip():
            raise APIError(400, "model: give 'base' or an adapter reference", param="model")
        ref = ref.strip()
        from adapters.store.store import is_path_ref

        if is_path_ref(ref) and not settings.allow_path_refs:
            raise APIError(400, "folder references are disabled on this server; use name, name@<version> or name@<tag>", param="model")
        if ref != BASE:
            try:
                engine.key_of(ref)  # cheap: unknown names, versions and tags fail here with 404
            except Exception as err:  # noqa: BLE001
                raise api_error_of(err) from None
        return ref

    def check_task(task: str, endpoint: str) -> None:
        if engine.task != task:
            raise APIError(400, f"{endpoint} needs a {task} model; this server serves {engine.task}", param="model")

    def check_tokens(n: int, what: str) -> None:
        if n > settings.max_prompt_tokens:
            raise APIError(400, f"{what} is {n} tokens, over the limit of {settings.max_prompt_tokens}", param=what)

    def check_max_tokens(value: int) -> None:
        if value > settings.max_tokens:
            raise APIError(400, f"max_tokens {value} is over the server limit of {settings.max_tokens}", param="max_tokens")

    async def run_job(kind: str, rows: list):
        future = batcher.submit(kind, rows)
        try:
            return await asyncio.wrap_future(future)
        except Exception as err:  # noqa: BLE001
            raise api_error_of(err) from None

    def answers_are_labels(ref: str) -> bool:
        """Whether this causal-LM adapter's drift reference watches its answers as labels."""
        if ref == BASE:
            return False
        try:
            stats = engine.adapter_of(ref).manifest.get("reference") or {}  # resident after the request: no file I/O
        except Exception:  # noqa: BLE001 - the request itself succeeded; logging just gets no label
            return False
        return bool(stats.get("labels"))

    def record(endpoint: str, ref: str, started: float, status: int, **fields) -> None:
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        if status < 400:
            metrics.adapter_requests.labels(ref).inc(fields.get("rows", 1))
            metrics.tokens.labels("prompt").inc(fields.get("input_tokens", 0))
            metrics.tokens.labels("completion").inc(fields.get("output_tokens", 0))
        hook = settings.on_request
        if hook is None:
            return
        n = max(1, fields.get("rows", 1) if status < 400 else 1)
        for i in range(n):
            row = {
                "request_id": fields.get("request_id"),
                "timestamp": time.time(),
                "endpoint": endpoint,
                "adapter": ref,
                "base_model": engine.base_name,
                "task": engine.task,
                "status": status,
                "latency_s": time.perf_counter() - started,
                "input_chars": len(t) if (t := _at(fields.get("texts"), i)) is not None else None,
                "input_tokens": _at(fields.get("row_input_tokens"), i),
                "output_tokens": _at(fields.get("row_output_tokens"), i),
                "label": _at(fields.get("labels"), i),
                "confidence": _at(fields.get("confidences"), i),
                "finish_reason": _at(fields.get("finish_reasons"), i),
            }
            if settings.traffic_include_text:
                row["text"] = _at(fields.get("texts"), i)
                row["input_ids"] = _at(fields.get("input_ids"), i)
                row["output_text"] = _at(fields.get("outputs"), i)
            try:
                hook(row)
            except Exception:  # noqa: BLE001 - a logging failure must not fail the request
                log.exception("traffic hook on_request failed")

    async def guarded(endpoint: str, ref: str, work):
        started = time.perf_counter()
        try:
            response, fields = await work()
        except APIError as err:
            record(endpoint, ref, started, err.status)
            raise
        record(endpoint, ref, started, 200, **fields)
        return response

    # -------------------------------------------------------------- endpoints
    @api.post("/v1/completions", response_model=CompletionResponse, tags=["generation"])
    async def completions(body: CompletionBody):
        async def work():
            check_task("causal-lm", "/v1/completions")
            ref = check_adapter(body.model)
            check_max_tokens(body.max_tokens)
            prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
            if not prompts or len(prompts) > settings.max_inputs:
                raise APIError(400, f"prompt: give 1 to {settings.max_inputs} prompts", param="prompt")
            params = _sampling(body.max_tokens, body.temperature, body.top_p, body.seed, body.stop, body.ignore_eos)
            rows = []
            for p in prompts:
                check_tokens(engine.count_tokens(p), "prompt")
                rows.append(GenerationRequest(adapter=ref, prompt=p, params=params, raw=body.raw))
            results = await run_job("generate", rows)
            usage = _usage(results)
            response = CompletionResponse(
                id=f"cmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=ref, usage=usage,
                choices=[CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(results)],
            )
            return response, _gen_fields(response.id, prompts, results, usage, answers_are_labels(ref))

        return await guarded("completions", body.model, work)

    @api.post("/v1/chat/completions", response_model=ChatResponse, tags=["generation"])
    async def chat_completions(body: ChatBody):
        async def work():
            check_task("causal-lm", "/v1/chat/completions")
            ref = check_adapter(body.model)
            max_tokens = body.max_completion_tokens or body.max_tokens or 256
            check_max_tokens(max_tokens)
            messages = [m.model_dump() for m in body.messages]
            check_tokens(sum(engine.count_tokens(m["content"]) for m in messages), "messages")
            params = _sampling(max_tokens, body.temperature, body.top_p, body.seed, body.stop)
            results = await run_job("generate", [GenerationRequest(adapter=ref, messages=messages, params=params)])
            usage = _usage(results)
            r = results[0]
            response = ChatResponse(
                id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=ref, usage=usage,
                choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content=r.text), finish_reason=r.finish_reason)],
            )
            last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
            return response, _gen_fields(response.id, [last_user], results, usage, answers_are_labels(ref))

        return await guarded("chat_completions", body.model, work)

    @api.post("/v1/classify", response_model=ClassifyResponse, tags=["classification"])
    async def classify(body: ClassifyBody):
        async def work():
            check_task("sequence-classification", "/v1/classify")
            ref = check_adapter(body.model)
            if ref == BASE:
                raise APIError(400, "model: classification needs an adapter (the base has no trained head)", param="model")
            texts = [body.input] if isinstance(body.input, str) else list(body.input)
            if not texts or len(texts) > settings.max_inputs:
                raise APIError(400, f"input: give 1 to {settings.max_inputs} texts", param="input")
            for t in texts:
                check_tokens(engine.count_tokens(t), "input")
            results = await run_job("classify", [ClassificationRequest(adapter=ref, text=t) for t in texts])
            tokens = sum(r.input_tokens for r in results)
            response = ClassifyResponse(
                id=f"cls-{uuid.uuid4().hex[:24]}", model=ref, usage=Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens),
                results=[Classification(index=i, label=r.label, confidence=r.confidence, probabilities=r.probabilities) for i, r in enumerate(results)],
            )
            fields = {
                "request_id": response.id, "rows": len(texts), "input_tokens": tokens, "texts": texts,
                "row_input_tokens": [r.input_tokens for r in results], "labels": [r.label for r in results],
                "confidences": [r.confidence for r in results],
            }
            if settings.traffic_include_text:
                fields["input_ids"] = [engine.tokenizer(t)["input_ids"] for t in texts]
            return response, fields

        return await guarded("classify", body.model, work)

    @api.get("/v1/models", tags=["adapters"])
    def models():
        resident = engine.resident()
        data = [{"id": BASE, "object": "model", "owned_by": "adapterkit", "base": engine.base_name, "task": engine.task, "resident": True}]
        by_key = {}
        for r in resident:
            ref = f"{r['name']}@{r['version']}" if r.get("name") and r.get("version") else (r["refs"][0] if r["refs"] else r["key"])
            by_key[r["key"]] = ref
            data.append({"id": ref, "object": "model", "owned_by": "adapterkit", "resident": True, "method": r["method"],
                         "mixable": r["mixable"], "labels": r["labels"], "refs": r["refs"], "uses": r["uses"]})
        try:
            stored = engine.store_of().list()
        except Exception:  # noqa: BLE001 - an unreadable store still lists what is resident
            stored = []
        resident_ids = {d["id"] for d in data}
        for row in stored:
            if row.get("task") not in (None, engine.task):
                continue
            ref = f"{row['name']}@{row['version']}"
            if ref in resident_ids:
                continue
            data.append({"id": ref, "object": "model", "owned_by": "adapterkit", "resident": False, "method": row.get("method"), "tags": row.get("tags")})
        return {"object": "list", "data": data}

    @api.post("/v1/adapters/load", tags=["adapters"])
    async def load_adapter(body: AdapterBody):
        ref = check_adapter(body.adapter)
        if ref == BASE:
            raise APIError(400, "'base' is always loaded", param="adapter")
        from starlette.concurrency import run_in_threadpool

        try:
            entry = await run_in_threadpool(engine.load, ref)
        except Exception as err:  # noqa: BLE001
            raise api_error_of(err) from None
        return {"loaded": ref, "key": entry.adapter.key, "load_seconds": round(entry.load_seconds, 4), "resident": len(engine.resident())}

    @api.post("/v1/adapters/unload", tags=["adapters"])
    async def unload_adapter(body: AdapterBody):
        ref = check_adapter(body.adapter)
        if ref == BASE:
            raise APIError(400, "'base' cannot be unloaded", param="adapter")
        from starlette.concurrency import run_in_threadpool

        unloaded = await run_in_threadpool(engine.unload, ref)
        return {"unloaded": unloaded, "adapter": ref, "resident": len(engine.resident())}

    @api.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", tags=["operations"])
    def health():
        return {"status": "ok", "base": engine.base_name, "task": engine.task, "resident_adapters": len(engine.resident()),
                "capacity": engine.capacity, "queue_depth": batcher.depth()}

    app.include_router(api)
    return app


def _at(values: list | None, i: int):
    return values[i] if values is not None and i < len(values) else None


def _sampling(max_tokens: int, temperature: float, top_p: float, seed: int | None, stop, ignore_eos: bool = False) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop or [], ignore_eos=ignore_eos)
    except ConfigError as err:
        raise APIError(400, str(err)) from None


def _usage(results) -> Usage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _gen_fields(request_id: str, texts: list[str], results, usage: Usage, answers_are_labels: bool) -> dict:
    return {
        "request_id": request_id, "rows": len(results), "input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
        "texts": texts, "outputs": [r.text for r in results], "row_input_tokens": [r.prompt_tokens for r in results],
        "row_output_tokens": [r.completion_tokens for r in results], "finish_reasons": [r.finish_reason for r in results],
        "confidences": [r.confidence for r in results],
        # an adapter trained to answer from a small set (its reference has a label mix): the answer is a label
        "labels": [first_line_answer(r.text) for r in results] if answers_are_labels else None,
    }


def _version() -> str:
    from adapters import __version__

    return __version__


# ------------------------------------------------------------------ running it
class BackgroundServer:
    """uvicorn serving ``app`` from a thread, on ``host`` and a free port (port 0) unless one is given.

    For tests and benchmarks: ``with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")``.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="adapterkit-uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> "BackgroundServer":
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
