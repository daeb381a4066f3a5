"""What every route needs: the engine, settings, batcher and metrics of its app, and the shared checks.

Routes take ``server: Server`` (a FastAPI dependency) and get a ServerContext built from ``request.app.state``,
which ``create_app`` fills; a test can fill it by hand to mount one router alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from adapters.modeling.generation import encode_prompt
from adapters.serving.engine import BASE, GenerationRequest, InferenceEngine
from adapters.serving.http.batcher import Batcher, ContinuousBatcher
from adapters.serving.http.metrics import ServerMetrics
from adapters.serving.http.middleware import APIError, api_error_of
from adapters.serving.http.settings import ServerSettings
from adapters.serving.http.traffic import log_traffic
from adapters.store.refs import is_path_ref


@dataclass(frozen=True)
class ServerContext:
    """One app's engine, settings, batcher and metrics, with the request checks and bookkeeping routes share.

    Every check raises APIError (a 4xx the client can fix) rather than returning a flag.
    """

    engine: InferenceEngine
    settings: ServerSettings
    batcher: Batcher | ContinuousBatcher
    metrics: ServerMetrics

    def check_adapter(self, ref: str, param: str = "model") -> str:
        """The stripped reference ``ref`` ("base", name, name@3, name@tag) given as the request's ``param``;
        404 when the store has no such adapter (the message names neither the store's path nor its adapters).

        Folder references are refused (400) unless ``settings.allow_path_refs``.
        """
        if not isinstance(ref, str) or not ref.strip():
            raise APIError(400, f"{param}: give 'base' or an adapter reference", param=param)
        ref = ref.strip()
        if is_path_ref(ref) and not self.settings.allow_path_refs:
            raise APIError(
                400,
                "folder references are disabled on this server; use name, name@<version> or name@<tag>",
                param=param,
            )
        if ref != BASE:
            try:
                self.engine.key_of(ref)  # cheap: unknown names, versions and tags fail here with 404
            except Exception as err:  # noqa: BLE001
                raise api_error_of(err, ref, param) from None
        return ref

    def check_task(self, task: str, endpoint: str) -> None:
        """400 unless the engine serves ``task`` ("causal-lm" or "sequence-classification")."""
        if self.engine.task != task:
            message = f"{endpoint} needs a {task} model; this server serves {self.engine.task}"
            raise APIError(400, message, param="model")

    def check_tokens(self, n: int, what: str) -> None:
        """400 when an input of ``n`` tokens is over ``settings.max_prompt_tokens``; ``what`` names the field."""
        if n > self.settings.max_prompt_tokens:
            message = f"{what} is {n} tokens, over the limit of {self.settings.max_prompt_tokens}"
            raise APIError(400, message, param=what)

    def check_max_tokens(self, value: int) -> None:
        """400 when a request asks for more than ``settings.max_tokens`` new tokens."""
        if value > self.settings.max_tokens:
            raise APIError(
                400, f"max_tokens {value} is over the server limit of {self.settings.max_tokens}", param="max_tokens"
            )

    async def run_job(self, kind: str, rows: list) -> list:
        """Run ``rows`` through the batcher ("generate" or "classify") and await the engine's results, in order.

        Raises the engine's error mapped to an APIError (api_error_of).
        """
        future = self.batcher.submit(kind, rows)
        try:
            return await asyncio.wrap_future(future)
        except Exception as err:  # noqa: BLE001
            raise api_error_of(err, getattr(rows[0], "adapter", None) if rows else None) from None

    def answers_are_labels(self, ref: str) -> bool:
        """Whether this causal-LM adapter's drift reference watches its answers as labels."""
        if ref == BASE:
            return False
        try:
            # resident after the request: no file I/O
            stats = self.engine.adapter_of(ref).manifest.get("reference") or {}
        except Exception:  # noqa: BLE001 - the request itself succeeded; logging just gets no label
            return False
        return bool(stats.get("labels"))

    def prompt_tokens_cut(self, rows: list[GenerationRequest], n: int = 1) -> int:
        """Tokens the adapter's prompt format cut from the plain-text prompts of ``rows`` (``n`` rows per
        prompt, each prompt counted once): an adapter whose manifest records its training max_length gets its
        input cut as training cut it (adapters.modeling.generation.encode_prompt). Token-id prompts, raw
        prompts, chat messages and the base are never cut (0). Read after the engine ran: the adapter is
        resident, so no file is read."""
        cut = 0
        for row in rows[::n]:
            if row.adapter == BASE or row.raw or row.prompt is None or row.messages is not None:
                continue
            try:
                spec = self.engine.adapter_of(row.adapter).manifest.get("prompt")
            except Exception:  # noqa: BLE001 - the request itself succeeded; the count just stays unknown
                continue
            if spec and spec.get("max_length"):
                tokenizer, text = self.engine.tokenizer, row.prompt
                whole = encode_prompt(tokenizer, text, None, {**spec, "max_length": None})
                used = encode_prompt(tokenizer, text, None, spec, row.params.max_new_tokens)
                cut += max(0, len(whole) - len(used))
        return cut

    def record(self, endpoint: str, ref: str, started: float, status: int, **fields: Any) -> None:
        """Count the request in the metrics and hand its rows to the traffic hook (see log_traffic for ``fields``)."""
        self.metrics.observe_request(endpoint, ref, started, status, fields)
        log_traffic(self.settings, self.engine, endpoint, ref, started, status, fields)

    async def guarded(self, endpoint: str, ref: str, work: Callable[[], Awaitable[tuple[Any, dict]]]) -> Any:
        """Await ``work()`` -> (response, traffic fields), record the request either way and return the response.

        An APIError is recorded with its status and raised again for the exception handler.
        """
        started = time.perf_counter()
        try:
            response, fields = await work()
        except APIError as err:
            self.record(endpoint, ref, started, err.status)
            raise
        self.record(endpoint, ref, started, 200, **fields)
        return response


def server_context(request: Request) -> ServerContext:
    """FastAPI dependency: the ServerContext of the app serving ``request``."""
    state = request.app.state
    return ServerContext(state.engine, state.settings, state.batcher, state.metrics)


Server = Annotated[ServerContext, Depends(server_context)]
