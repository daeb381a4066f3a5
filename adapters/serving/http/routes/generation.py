"""Text generation routes: POST /v1/completions and /v1/chat/completions (OpenAI's formats; ``stream``: SSE).

``n`` samples of a prompt are ``n`` independent rows of one engine batch; with a seed, sample i uses
(seed + i) mod 2**64 (sample 0 the seed itself). Log-probabilities are the engine's: log-softmax of the logits
at temperature 1 over the whole vocabulary, whatever the sampling settings (adapters.serving.http.logprobs).
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Response

from adapters.errors import ConfigError
from adapters.evaluation.evaluator import first_line_answer
from adapters.modeling.generation import SamplingParams
from adapters.serving.engine import GenerationRequest, GenerationResult
from adapters.serving.http.logprobs import chat_logprobs, completion_logprobs, prompt_text
from adapters.serving.http.middleware import APIError, require_bearer_token
from adapters.serving.http.routes.context import Server, ServerContext
from adapters.serving.http.schemas import (
    AssistantMessage,
    ChatBody,
    ChatChoice,
    ChatResponse,
    CompletionBody,
    CompletionChoice,
    CompletionResponse,
    Usage,
    error_responses,
)
from adapters.serving.http.streaming import ChunkFormat, StreamJob, stream_response

# Response header: how many prompt tokens the adapter's prompt format cut (sent only when some were).
TRUNCATED_HEADER = "X-Prompt-Truncated"

router = APIRouter(dependencies=[Depends(require_bearer_token)])
_ERRORS = error_responses(400, 401, 404, 409, 413, 500)
_STREAMED = {
    200: {
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "string",
                    "description": (
                        "With stream: server-sent events, each `data: {chunk}` (OpenAI's chunk objects), "
                        "then `data: [DONE]`."
                    ),
                }
            }
        }
    }
}


def _sampling(**options) -> SamplingParams:
    try:
        return SamplingParams(**options)
    except ConfigError as err:
        raise APIError(400, str(err)) from None


def _sample_seed(seed: int | None, i: int) -> int | None:
    """The seed of sample ``i`` of a request: the request's seed, then (seed + i) mod 2**64."""
    return seed if seed is None or i == 0 else (seed + i) % 2**64


def _usage(results: list[GenerationResult], n: int) -> Usage:
    prompt = sum(r.prompt_tokens for r in results[::n])  # each prompt once, whatever n
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _traffic_fields(request_id: str, texts: list[str], results, answers_are_labels: bool) -> dict:
    return {
        "request_id": request_id,
        "rows": len(results),
        "input_tokens": sum(r.prompt_tokens for r in results),
        "output_tokens": sum(r.completion_tokens for r in results),
        "texts": texts,
        "outputs": [r.text for r in results],
        "row_input_tokens": [r.prompt_tokens for r in results],
        "row_output_tokens": [r.completion_tokens for r in results],
        "finish_reasons": [r.finish_reason for r in results],
        "confidences": [r.confidence for r in results],
        # an adapter trained to answer from a small set (its reference has a label mix): the answer is a label
        "labels": [first_line_answer(r.text) for r in results] if answers_are_labels else None,
    }


def _check_rows(server: ServerContext, prompts: int, n: int) -> None:
    if prompts * n > server.settings.max_inputs:
        what = "prompts" if n == 1 else f"prompts x n ({prompts} x {n}) rows"
        raise APIError(400, f"prompt: give 1 to {server.settings.max_inputs} {what}", param="prompt" if n == 1 else "n")


def _check_stream_options(body: CompletionBody | ChatBody) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options: only with stream=true", param="stream_options")


def _completion_prompts(server: ServerContext, prompt) -> list[tuple[str | None, list[int] | None]]:
    """(text, None) or (None, token ids) per prompt; 400 for a token id outside the vocabulary."""
    if isinstance(prompt, str):
        prompts = [(prompt, None)]
    elif isinstance(prompt[0], int):
        prompts = [(None, list(prompt))]
    else:
        prompts = [(p, None) if isinstance(p, str) else (None, list(p)) for p in prompt]
    vocab = len(server.engine.tokenizer)
    for _, ids in prompts:
        if ids is not None and max(ids) >= vocab:
            raise APIError(
                400, f"prompt: token id {max(ids)} is outside the vocabulary (0..{vocab - 1})", param="prompt"
            )
    return prompts


def _completion_rows(server: ServerContext, body: CompletionBody) -> tuple[str, list[GenerationRequest], list[str]]:
    """The checked reference, the engine rows (n per prompt) and each row's prompt text of a completion request."""
    server.check_task("causal-lm", "/v1/completions")
    ref = server.check_adapter(body.model)
    _check_stream_options(body)
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"best_of: only equal to n ({body.n}); candidates are not ranked", param="best_of")
    server.check_max_tokens(body.max_tokens)
    if body.max_tokens == 0 and not body.echo:  # nothing to return: 0 is for scoring an echoed prompt
        raise APIError(
            400, "max_tokens: 0 only with echo=true (to score the prompt); give 1 or more", param="max_tokens"
        )
    prompts = _completion_prompts(server, body.prompt)
    _check_rows(server, len(prompts), body.n)
    sampling = {
        "max_new_tokens": body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": body.stop or [],
        "ignore_eos": body.ignore_eos,
        "logprobs": body.logprobs,
    }
    rows, texts = [], []
    for text, ids in prompts:
        server.check_tokens(len(ids) if ids is not None else server.engine.count_tokens(text), "prompt")
        for i in range(body.n):
            scored = body.logprobs if body.echo and i == 0 else None  # the prompt's logprobs: once per prompt
            params = _sampling(**sampling, seed=_sample_seed(body.seed, i), prompt_logprobs=scored)
            rows.append(GenerationRequest(adapter=ref, prompt=text, prompt_ids=ids, params=params, raw=body.raw))
            texts.append(text if text is not None else server.engine.tokenizer.decode(ids))
    return ref, rows, texts


def _completion_choice(tokenizer, body: CompletionBody, k: int, results: list[GenerationResult]) -> CompletionChoice:
    """Choice k of a completion: its text (after the prompt when echoed) and logprobs when asked."""
    r = results[k]
    first = results[k - k % body.n]  # sample 0 of this prompt: it holds the prompt's logprobs
    echoed = prompt_text(tokenizer, r.prompt_ids) if body.echo else ""
    logprobs = None
    if body.logprobs is not None:
        logprobs = completion_logprobs(tokenizer, r.logprobs, first.prompt_logprobs if body.echo else None)
    return CompletionChoice(index=k, text=echoed + r.text, finish_reason=r.finish_reason, logprobs=logprobs)


def _truncation_headers(server: ServerContext, rows: list[GenerationRequest], n: int) -> dict[str, str]:
    cut = server.prompt_tokens_cut(rows, n)
    return {TRUNCATED_HEADER: str(cut)} if cut else {}


async def _complete(
    server: ServerContext, body: CompletionBody, headers: dict[str, str]
) -> tuple[CompletionResponse, dict]:
    ref, rows, texts = _completion_rows(server, body)
    results = await server.run_job("generate", rows)
    headers.update(_truncation_headers(server, rows, body.n))
    choices = [_completion_choice(server.engine.tokenizer, body, k, results) for k in range(len(results))]
    response = CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex[:24]}",
        created=int(time.time()),
        model=ref,
        usage=_usage(results, body.n),
        choices=choices,
    )
    return response, _traffic_fields(response.id, texts, results, server.answers_are_labels(ref))


def _chat_rows(server: ServerContext, body: ChatBody) -> tuple[str, list[GenerationRequest], list[dict]]:
    """The checked reference, the engine rows (n) and the messages of a chat request."""
    server.check_task("causal-lm", "/v1/chat/completions")
    ref = server.check_adapter(body.model)
    _check_stream_options(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: only with logprobs=true", param="top_logprobs")
    max_tokens = body.max_completion_tokens or body.max_tokens or 256
    server.check_max_tokens(max_tokens)
    _check_rows(server, 1, body.n)
    messages = [m.for_template() for m in body.messages]
    server.check_tokens(sum(server.engine.count_tokens(m["content"]) for m in messages), "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    rows = [
        GenerationRequest(
            adapter=ref,
            messages=messages,
            params=_sampling(
                max_new_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=_sample_seed(body.seed, i),
                stop=body.stop or [],
                logprobs=logprobs,
            ),
        )
        for i in range(body.n)
    ]
    return ref, rows, messages


def _last_user(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])


async def _chat(server: ServerContext, body: ChatBody) -> tuple[ChatResponse, dict]:
    ref, rows, messages = _chat_rows(server, body)
    results = await server.run_job("generate", rows)
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=r.text),
            finish_reason=r.finish_reason,
            logprobs=chat_logprobs(server.engine.tokenizer, r.logprobs) if body.logprobs else None,
        )
        for i, r in enumerate(results)
    ]
    response = ChatResponse(
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        created=int(time.time()),
        model=ref,
        usage=_usage(results, body.n),
        choices=choices,
    )
    fields = _traffic_fields(response.id, [_last_user(messages)] * body.n, results, server.answers_are_labels(ref))
    return response, fields


def _stream_completion(server: ServerContext, body: CompletionBody) -> StreamJob:
    ref, rows, texts = _completion_rows(server, body)
    tokenizer = server.engine.tokenizer
    fmt = ChunkFormat(
        chat=False,
        model=ref,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        prefix=(lambda k, ids: prompt_text(tokenizer, ids)) if body.echo else None,
        logprobs=body.logprobs is not None,
        # sample 0 of each prompt holds the prompt's logprobs (see _completion_choice)
        prompt_logprobs=(
            lambda k, results: completion_logprobs(tokenizer, None, results[k - k % body.n].prompt_logprobs)
        )
        if body.echo and body.logprobs is not None
        else None,
    )
    return StreamJob(
        ref,
        rows,
        fmt,
        lambda results: _usage(results, body.n),
        lambda rid, results: _traffic_fields(rid, texts, results, server.answers_are_labels(ref)),
        lambda: _truncation_headers(server, rows, body.n),
    )


def _stream_chat(server: ServerContext, body: ChatBody) -> StreamJob:
    ref, rows, messages = _chat_rows(server, body)
    fmt = ChunkFormat(
        chat=True,
        model=ref,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        logprobs=bool(body.logprobs),
    )
    texts = [_last_user(messages)] * body.n
    return StreamJob(
        ref,
        rows,
        fmt,
        lambda results: _usage(results, body.n),
        lambda rid, results: _traffic_fields(rid, texts, results, server.answers_are_labels(ref)),
    )


_TRUNCATED = {
    TRUNCATED_HEADER: {
        "description": "Prompt tokens cut to fit the adapter's training max_length (sent only when some were).",
        "schema": {"type": "integer", "minimum": 1},
    }
}


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    tags=["generation"],
    responses={**_ERRORS, 200: {**_STREAMED[200], "headers": _TRUNCATED}},
)
async def completions(body: CompletionBody, server: Server, response: Response):
    """Complete each prompt with ``model`` ("base" or an adapter reference): n choices per prompt; with
    ``stream``, as server-sent events. A plain-text prompt cut to the adapter's training max_length is
    answered with the header X-Prompt-Truncated: <tokens cut>; usage.prompt_tokens counts the tokens used."""
    if body.stream:
        return await stream_response(server, "completions", body.model, lambda: _stream_completion(server, body))
    headers: dict[str, str] = {}
    answer = await server.guarded("completions", body.model, lambda: _complete(server, body, headers))
    response.headers.update(headers)
    return answer


@router.post(
    "/v1/chat/completions", response_model=ChatResponse, tags=["generation"], responses={**_ERRORS, **_STREAMED}
)
async def chat_completions(body: ChatBody, server: Server):
    """Answer the conversation ``messages`` with ``model`` (n choices); max_completion_tokens / max_tokens
    default to 256. With ``stream``, as server-sent events."""
    if body.stream:
        return await stream_response(server, "chat_completions", body.model, lambda: _stream_chat(server, body))
    return await server.guarded("chat_completions", body.model, lambda: _chat(server, body))
