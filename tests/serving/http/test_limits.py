"""Body limits and error messages through a real uvicorn server on loopback (raw sockets: no client library
fixes up the request), and the messages an engine error becomes: no file path, no other adapter's name.
The many single bad requests are in the corpus, tests/bad_inputs/http (test_http.py)."""

from __future__ import annotations

import json
import select
import socket

import pytest
from fastapi.testclient import TestClient

from adapters.errors import BaseMismatchError, StoreError
from adapters.serving.http.app import BackgroundServer, create_app
from adapters.serving.http.middleware import api_error_of
from adapters.serving.http.settings import ServerSettings
from tests.serving.http.test_routes import stub_engine

LIMIT = 4000


@pytest.fixture(scope="module")
def address():
    with BackgroundServer(create_app(stub_engine(), ServerSettings(max_body_bytes=LIMIT))) as server:
        host, port = server.url.removeprefix("http://").split(":")
        yield host, int(port)


def _response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body[: _length(data)])


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    return next(int(line.split(":")[1]) for line in head.split("\r\n") if line.startswith("content-length:"))


def test_a_chunked_body_is_refused_413_after_the_limit_not_read_to_its_end(address):
    total = 64 * 1024 * 1024  # what the client would send: 64 MiB
    chunk = b"x" * 16384
    with socket.create_connection(address, timeout=30) as sock:
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
        sent = 0
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:  # until the server answers
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, body = _response(sock)
    assert status == 413 and body["error"]["type"] == "request_too_large"
    assert body["error"]["message"] == f"request body over the limit of {LIMIT} bytes"
    assert sent < 4 * 1024 * 1024  # answered long before the 64 MiB were sent (socket buffers hold a few MiB)


def test_a_huge_declared_length_is_refused_before_any_body_is_sent(address):
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n")
        status, body = _response(sock)
    assert status == 413 and body["error"]["code"] == 413


def test_a_non_utf8_body_is_a_400_naming_the_byte(address):
    payload = b'{"model": "alpha", "prompt": "\xff"}'
    with socket.create_connection(address, timeout=30) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n"
        sock.sendall(head.encode() + payload)
        status, body = _response(sock)
    assert status == 400 and body["error"] == {
        "message": "body: not UTF-8 (byte 0xff at position 30)",
        "type": "invalid_request_error",
        "param": "body",
        "code": 400,
    }


def _raw_exchange(address, request: bytes) -> bytes:
    """Send ``request`` as is and read until the server closes the connection."""
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    ],
    ids=["negative-content-length", "bad-chunk-size"],
)
def test_http_protocol_errors_are_uvicorns_plain_400_and_the_server_keeps_serving(address, request_bytes):
    # What docs/serving.md says: uvicorn's HTTP parser refuses these before the app runs, so the answer is its
    # own text/plain 400 (not the JSON error shape) and the connection is closed; no traceback, still serving.
    head, _, body = _raw_exchange(address, request_bytes).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").lower().split("\r\n")
    assert lines[0].startswith("http/1.1 400 ")
    assert "content-type: text/plain; charset=utf-8" in lines and "connection: close" in lines
    if "transfer-encoding: chunked" in lines:  # the app had begun reading the body: h11 frames the answer
        body = body.removeprefix(b"1e\r\n").removesuffix(b"\r\n0\r\n\r\n")
    assert body == b"Invalid HTTP request received." and b"Traceback" not in body
    health = _raw_exchange(address, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert health.startswith(b"HTTP/1.1 200 ")


def test_an_integer_over_pythons_digit_limit_is_a_400_naming_the_field():
    # 5000 digits: over sys.get_int_max_str_digits() (4300), whose own message points at a Python setting
    payload = b'{"model": "alpha", "prompt": "x", "max_tokens": 1, "seed": ' + b"7" * 5000 + b"}"
    headers = {"content-type": "application/json"}
    with TestClient(create_app(stub_engine(), ServerSettings(max_body_bytes=10 * LIMIT))) as client:
        response = client.post("/v1/completions", content=payload, headers=headers)
        nested = client.post("/v1/completions", content=b'{"stop": [-' + b"1" * 4400 + b"]}", headers=headers)
    assert response.status_code == 400 and response.json()["error"] == {
        "message": "seed: number too long (5000 digits); out of range",
        "type": "invalid_request_error",
        "param": "seed",
        "code": 400,
    }
    assert "sys." not in nested.text and nested.json()["error"]["message"].startswith("stop.0: number too long (4400")


def test_engine_errors_reach_clients_without_paths_or_other_adapters(tmp_path):
    missing = StoreError(f"adapter 'ghost' has no versions in {tmp_path}/store (have: alpha, beta)")
    err = api_error_of(missing, "ghost")
    assert (err.status, err.param) == (404, "model")
    assert err.message == "model 'ghost' not found; GET /v1/models lists the models this server serves"
    broken = api_error_of(StoreError(f"{tmp_path}/store/alpha/1/manifest.json: unreadable manifest (line 1)"), "alpha")
    assert (broken.status, broken.message) == (400, "<path>: unreadable manifest (line 1)")
    mismatch = api_error_of(BaseMismatchError(f"trained on C:\\models\\base and {tmp_path}/other, not this base"))
    assert mismatch.status == 409 and mismatch.message == "trained on <path> and <path>, not this base"
    assert str(tmp_path) not in broken.message + mismatch.message
