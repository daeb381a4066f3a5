"""Server-sent events for ``stream: true``: OpenAI's chunk formats for completions and chat.

A streamed request's rows go to the batcher like any other, with an ``on_token`` callback: the continuous
batcher calls it from its worker thread for every token a row emits, and each token's text goes out as a
chunk (``data: {...}\\n\\n``) as soon as it is safe to send (``StreamText``); the window batcher calls it
never, so each choice's chunks go out when its batch ends. With ``logprobs``, each chunk carries the
log-probabilities of the tokens whose text it sends (OpenAI's format of the endpoint), so the chunks' entries
joined are the non-streamed response's; an echoed prompt's come in the prompt's chunk. After the last choice's
final chunk (with its ``finish_reason``) come a usage chunk when ``stream_options.include_usage`` asked, then
``data: [DONE]``.

The response starts only once the request's first token (or its whole result) is there, so a request the
engine refuses (a prompt too long, an adapter of another type) still gets its 4xx status and JSON error.
A client that disconnects cancels its rows: they leave the running batch before the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from adapters.serving.engine import GenerationRequest, GenerationResult
from adapters.serving.http.logprobs import LogprobStream, completion_format
from adapters.serving.http.middleware import APIError, api_error_of
from adapters.serving.http.routes.context import ServerContext
from adapters.serving.http.schemas import ChatLogprobs, CompletionLogprobs

CLIENT_CLOSED = 499  # status recorded for a stream whose client went away (nginx's convention)


class StreamText:
    """The text of one streamed choice, sent as it grows without ever taking back a character.

    ``push(token)`` returns the new text that is safe to send: the decoded text of the tokens so far,
    less an incomplete UTF-8 character at its end and less any end that could be the start of a stop
    string (that text is held back until the next tokens show it is not a stop string). ``finish(text)``
    returns the rest of the final text (a stop string and what follows it excluded, as the engine cut it).
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        """Add one emitted token; returns the text newly safe to send ("" if none)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        safe = text.rstrip("\ufffd")  # an incomplete character decodes to U+FFFD until its last byte comes
        safe = safe[: len(safe) - _held_back(safe, self.stop)]
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent) :], safe
        return delta

    def finish(self, text: str) -> str:
        """The rest of the choice's final ``text`` (as the engine returned it) after what was sent."""
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent = text
        return delta


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` to hold back: a stop string found in it cuts there, else the
    longest end of ``text`` that is the start of a stop string."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut >= 0:
        return len(text) - cut
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)


class ChunkFormat:
    """OpenAI's stream chunks of one request: completions (``chat=False``) or chat completions.

    ``model``: the reference the response names. ``include_usage``: a usage chunk last (and ``usage: null``
    in the others). ``prefix(k, prompt_ids)``: text before choice k's completion (echo), or None.
    ``logprobs``: every chunk with text carries the log-probabilities of its tokens (in the format of ``chat``).
    ``prompt_logprobs(k, results)``: the echoed prompt's log-probabilities of choice k (completions with echo and
    logprobs); they exist only once the request has run, so such a choice is sent when the request ends, its
    prompt chunk first, then its tokens as from the live stream.
    """

    def __init__(
        self,
        chat: bool,
        model: str,
        include_usage: bool,
        prefix: Callable[[int, list[int]], str] | None = None,
        logprobs: bool = False,
        prompt_logprobs: Callable[[int, list[GenerationResult]], CompletionLogprobs] | None = None,
    ):
        self.chat, self.model, self.include_usage, self.prefix = chat, model, include_usage, prefix
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def opening(self, k: int) -> dict | None:
        """The choice fields that open choice k (chat: the assistant role), or None."""
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None} if self.chat else None

    def text(self, k: int, text: str, entries: list | None = None) -> dict:
        """The choice fields carrying ``text`` and the LogprobStream ``entries`` of its tokens (None: no logprobs)."""
        if self.chat:
            logprobs = None if entries is None else ChatLogprobs(content=entries).model_dump()
            return {"delta": {"content": text}, "logprobs": logprobs}
        return {"text": text, "logprobs": None if entries is None else completion_format(entries).model_dump()}

    def closing(self, k: int, finish_reason: str) -> dict:
        """The choice fields of choice k's last chunk."""
        fields = {"delta": {}} if self.chat else {"text": ""}
        return {**fields, "logprobs": None, "finish_reason": finish_reason}

    def event(self, k: int, fields: dict) -> str:
        """One SSE event: a chunk holding choice k with ``fields``."""
        choice = {"index": k, **fields}
        choice.setdefault("finish_reason", None)
        return self._sse({"choices": [choice]})

    def usage_event(self, usage: dict) -> str:
        """The usage chunk (no choices)."""
        return self._sse({"choices": [], "usage": usage})

    def _sse(self, body: dict) -> str:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            **body,
        }
        if self.include_usage:
            chunk.setdefault("usage", None)
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


class _Choices:
    """Turns the batcher's token callbacks and final results into the chunks of one request's choices.

    Each choice's tokens go through ``_push`` once each, in order: live from the batcher's callbacks, else (the
    window batcher, a deferred echo) from the results when the request ends. A chunk goes out when a token makes
    text safe to send (StreamText), carrying the log-probabilities of the tokens since the last chunk.
    """

    def __init__(self, fmt: ChunkFormat, rows: list[GenerationRequest], tokenizer):
        self.fmt, self.tokenizer = fmt, tokenizer
        self.texts = [StreamText(tokenizer, r.params.stop) for r in rows]
        self.logs: list[LogprobStream | None] = [None] * len(rows)
        self.pending: list[list] = [[] for _ in rows]  # entries of tokens whose text is not sent yet
        self.pushed = [0] * len(rows)
        self.opened = [False] * len(rows)

    def _open(self, k: int, prompt_ids: list[int], results: list[GenerationResult] | None = None) -> list[str]:
        if self.opened[k]:
            return []
        self.opened[k] = True
        out = []
        opening = self.fmt.opening(k)
        if opening is not None:
            out.append(self.fmt.event(k, opening))
        prefix = self.fmt.prefix(k, prompt_ids) if self.fmt.prefix else ""
        scored = self.fmt.prompt_logprobs(k, results) if self.fmt.prompt_logprobs and results else None
        if prefix or scored is not None:
            fields = self.fmt.text(k, prefix)
            if scored is not None:
                fields["logprobs"] = scored.model_dump()
            out.append(self.fmt.event(k, fields))
        if self.fmt.logprobs:
            self.logs[k] = LogprobStream(self.tokenizer, self.fmt.chat, offset=len(prefix))
        return out

    def _push(self, k: int, token: int, scored: tuple[float, list | None] | None) -> list[str]:
        self.pushed[k] += 1
        if self.logs[k] is not None and scored is not None:
            self.pending[k].append(self.logs[k].push(token, *scored))
        delta = self.texts[k].push(token)
        return [self._text_event(k, delta)] if delta else []

    def _text_event(self, k: int, text: str) -> str:
        entries, self.pending[k] = (self.pending[k] if self.logs[k] is not None else None), []
        return self.fmt.event(k, self.fmt.text(k, text, entries))

    def token(self, k: int, prompt_ids: list[int], token: int, scored: tuple[float, list | None] | None) -> list[str]:
        """Chunks for a token row k emitted, scored (log-probability, alternatives) when asked: its opening the
        first time, then its text as it becomes safe. A deferred choice (echo with logprobs) waits for the end."""
        if self.fmt.prompt_logprobs is not None:
            return []
        return self._open(k, prompt_ids) + self._push(k, token, scored)

    def end(self, results: list[GenerationResult]) -> list[str]:
        """Every choice's remaining chunks, in order, once all are done."""
        out = []
        for k, r in enumerate(results):
            out.extend(self._open(k, r.prompt_ids, results))
            for j in range(self.pushed[k], len(r.token_ids)):  # tokens no callback handed out
                scored = (r.logprobs.logprobs[j], r.logprobs.top[j]) if r.logprobs is not None else None
                out.extend(self._push(k, r.token_ids[j], scored))
            delta = self.texts[k].finish(r.text)
            if delta or self.pending[k]:
                out.append(self._text_event(k, delta))
            out.append(self.fmt.event(k, self.fmt.closing(k, r.finish_reason)))
        return out


@dataclass
class StreamJob:
    """What a streamed request runs and how it is answered: its reference, engine rows, chunk format, its
    Usage of the results (``usage(results)``), its traffic fields (``traffic(response id, results)``) and its extra
    response headers (``headers()``)."""

    ref: str
    rows: list[GenerationRequest]
    fmt: ChunkFormat
    usage: Callable[[list[GenerationResult]], Any]
    traffic: Callable[[str, list[GenerationResult]], dict]
    headers: Callable[[], dict[str, str]] = dict  # extra response headers, read once the first token is out


async def stream_response(
    server: ServerContext, endpoint: str, model: str, prepare: Callable[[], StreamJob]
) -> StreamingResponse:
    """Stream a request's choices as server-sent events: ``prepare()`` checks it and builds its StreamJob, whose
    rows go through the batcher.

    The request is recorded with ServerContext.record (as ``model`` until prepared) when the stream ends, with
    status 499 when the client left first. Raises APIError (and records it) for a request that ``prepare``
    refuses or that the engine fails before its first token.
    """
    started = time.perf_counter()
    try:
        job = prepare()
    except APIError as err:
        server.record(endpoint, model, started, err.status)
        raise
    ref, fmt = job.ref, job.fmt
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def on_token(k: int, row, token: int, logprobs) -> None:  # the batcher's worker thread
        # this token's entry, read now: the worker appends the next token's to the same TokenLogprobs
        scored = (logprobs.logprobs[-1], logprobs.top[-1]) if logprobs is not None else None
        loop.call_soon_threadsafe(events.put_nowait, (k, row.prompt_ids, token, scored))

    future = server.batcher.submit("generate", job.rows, on_token=on_token)
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
    try:
        first = await events.get()
        if first is None and _failure(future) is not None:
            raise api_error_of(_failure(future), ref)
    except BaseException as err:
        server.batcher.cancel(future)
        server.record(endpoint, ref, started, err.status if isinstance(err, APIError) else CLIENT_CLOSED)
        raise
    choices = _Choices(fmt, job.rows, server.engine.tokenizer)

    async def body() -> AsyncIterator[str]:
        item, status, results = first, CLIENT_CLOSED, None
        try:
            while item is not None:
                for chunk in choices.token(*item):
                    yield chunk
                item = await events.get()
            if _failure(future) is not None:  # a forward pass failed mid-stream: say so in the stream
                err = api_error_of(_failure(future), ref)
                error = {"message": err.message, "type": err.kind, "code": err.status}
                yield f"data: {json.dumps({'error': error})}\n\n"
                status = err.status
                return
            results = future.result()
            for chunk in choices.end(results):
                yield chunk
            if fmt.include_usage:
                yield fmt.usage_event(job.usage(results).model_dump())
            yield "data: [DONE]\n\n"
            status = 200
        finally:
            if not future.done():
                server.batcher.cancel(future)
            fields = job.traffic(fmt.id, results) if results is not None else {}
            server.record(endpoint, ref, started, status, **fields)

    headers = {"Cache-Control": "no-cache", **job.headers()}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _failure(future) -> BaseException | None:
    """The exception that ended a done Future (a cancelled one's CancelledError), or None."""
    return asyncio.CancelledError() if future.cancelled() else future.exception()
