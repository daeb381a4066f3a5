"""Streaming (server-sent events) and continuous batching through the server on loopback, with the official
`openai` client: streamed text equals the non-streamed result, usage in the last chunk, stop strings never
leak, a client that goes away cancels its row, a short request finishes while a long one still runs."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from adapters.serving.http.app import BackgroundServer, create_app
from adapters.serving.http.settings import ServerSettings
from adapters.serving.http.streaming import StreamText
from adapters.store.store import AdapterStore
from tests.helpers.serving import make_adapter

PROMPT = "The weather today"


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, tmp_path_factory, one_torch_thread):
    from adapters.serving.engine import InferenceEngine

    src = tmp_path_factory.mktemp("stream-src")
    store = AdapterStore(tmp_path_factory.mktemp("stream-store"))
    for i, name in enumerate(("alpha", "beta", "gamma")):
        store.publish(make_adapter(tiny_llama_dir, src / name, seed=81 + i), name)
    return InferenceEngine(str(tiny_llama_dir), capacity=4, store=store)


@pytest.fixture(scope="module", params=["continuous", "window"])
def server(engine, request):
    settings = ServerSettings(max_tokens=256, max_prompt_tokens=128, batching=request.param, batch_window_ms=2)
    with BackgroundServer(create_app(engine, settings)) as srv:
        srv.app_state = srv.config.app.state
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_idle(server, seconds: float = 20) -> bool:
    state = server.app_state
    deadline = time.time() + seconds
    while time.time() < deadline:
        if state.batcher.running() == 0 and state.batcher.depth() == 0 and state.engine.scheduler.running() == 0:
            return True
        time.sleep(0.05)
    return False


def decode_steps(server) -> float:
    """Engine batches so far (continuous batching: decode steps), from /metrics."""
    text = httpx.get(server.url + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("adapterkit_batch_rows_count")))


@pytest.mark.parametrize("model", ["alpha", "base"])
def test_streamed_completion_equals_the_non_streamed_one(client, model):
    body = {"model": model, "prompt": [PROMPT, "Once upon"], "max_tokens": 12, "temperature": 0, "n": 2}
    whole = client.completions.create(**body)
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    texts, finish = ["", "", "", ""], [None] * 4
    for chunk in chunks[:-1]:
        assert chunk.usage is None and len(chunk.choices) == 1 and chunk.id == chunks[0].id
        texts[chunk.choices[0].index] += chunk.choices[0].text
        finish[chunk.choices[0].index] = chunk.choices[0].finish_reason or finish[chunk.choices[0].index]
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # usage last, when asked


def test_streamed_chat_sends_the_role_then_the_content(client):
    body = {"model": "beta", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 10, "temperature": 0}
    whole = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(**body, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_streamed_stop_strings_never_leak(client):
    free = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 3]  # a stop string in the middle of the free text
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stop": [stop, "zzzz"]}
    whole = client.completions.create(**body)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**body, stream=True))
    assert streamed == whole.choices[0].text == free[: free.find(stop)]


def _joined(chunks, field: str) -> list:
    return [v for c in chunks if c.choices and c.choices[0].logprobs for v in getattr(c.choices[0].logprobs, field)]


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_completion_logprobs_come_token_by_token_and_equal_the_non_streamed_ones(client, server, echo):
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2, "echo": echo}
    whole = client.completions.create(**body).choices[0]
    chunks = list(client.completions.create(**body, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert _joined(chunks, field) == getattr(whole.logprobs, field), field  # same tokens, same values
    scored = [c.choices[0] for c in chunks if c.choices[0].logprobs is not None]
    # each chunk carries the tokens of its own text, not all of them at the end
    assert len(scored) > 2 and all("".join(c.logprobs.tokens) == c.text for c in scored)
    assert all(c.logprobs is None for c in chunks[-1].choices)  # the closing chunk: finish_reason only
    if not echo and server.app_state.settings.batching == "continuous":
        assert max(len(c.logprobs.tokens) for c in scored) <= 2  # live: a chunk per token (or two, held back)


def test_streamed_chat_logprobs_come_token_by_token_and_equal_the_non_streamed_ones(client):
    chat = {
        "model": "alpha",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.chat.completions.create(**chat).choices[0]
    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.message.content
    content = _joined(chunks, "content")
    assert [t.model_dump() for t in content] == [t.model_dump() for t in whole.logprobs.content]
    scored = [c.choices[0] for c in chunks if c.choices and c.choices[0].logprobs is not None]
    assert len(scored) > 2 and all("".join(t.token for t in c.logprobs.content) == c.delta.content for c in scored)


def test_engine_errors_before_the_first_token_are_http_errors(client):
    with pytest.raises(openai.NotFoundError):
        list(client.completions.create(model="nope", prompt=PROMPT, max_tokens=3, stream=True))
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.completions.create(model="alpha", prompt=PROMPT, max_tokens=3, stream_options={"include_usage": True})


def test_a_client_that_disconnects_cancels_its_row(server, client):
    body = {"model": "gamma", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    steps_before = decode_steps(server)
    with httpx.Client(base_url=server.url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[len("data: ") :])["object"] == "text_completion"
    assert wait_idle(server)
    if server.app_state.settings.batching == "continuous":  # the row left the batch long before its 200 tokens
        assert decode_steps(server) - steps_before < 100
    assert client.completions.create(model="gamma", prompt=PROMPT, max_tokens=3, temperature=0).choices


def test_a_short_request_finishes_while_a_long_one_runs(server, client):
    if server.app_state.settings.batching != "continuous":
        pytest.skip("the window batcher runs a batch to its end before the next starts")
    finished: list[str] = []
    started = threading.Event()

    def long_request() -> None:
        body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 200, "temperature": 0}
        try:
            for _ in client.completions.create(**body, stream=True, extra_body={"ignore_eos": True}):
                started.set()
            finished.append("long")
        finally:
            started.set()

    t = threading.Thread(target=long_request)
    t.start()
    assert started.wait(60)
    client.completions.create(model="beta", prompt="Hi", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    finished.append("short")
    t.join()
    assert finished == ["short", "long"]


def test_stream_text_holds_back_what_could_start_a_stop_string():
    class CharTokenizer:  # token i is chr(i); 0xFFFD stands for an incomplete character
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    stream = StreamText(CharTokenizer(), stop=["STOP"])
    sent = [stream.push(ord(c)) for c in "abST"]
    assert sent == ["a", "b", "", ""]  # "ST" could be the start of "STOP"
    assert stream.push(ord("x")) == "STx"  # it was not
    assert stream.push(0xFFFD) == ""
    assert stream.finish("abSTx\u00e9") == "\u00e9"
