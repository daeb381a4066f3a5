"""Request bodies before FastAPI sees them: a size limit however the body is sent, and JSON that can be read.

``BodyMiddleware`` (ASGI) answers, in the ``{"error": ...}`` shape:

- 413 when the body is over ``max_bytes``: at once for a Content-Length above it (nothing is read), else as soon
  as the bytes received pass it, whether the body is sent with its true Content-Length, chunked (no
  Content-Length) or with a Content-Length that lies. At most ``max_bytes`` plus one received chunk is ever held.
- 400 for a Content-Length that is not a byte count, and, on the routes that take a JSON body, for a content-type
  other than JSON, an empty body, bytes that are not UTF-8 (RFC 8259 section 8.1), text that is not JSON (or
  nests deeper than the reader's recursion limit), JSON that is not an object, an object with a key twice
  (RFC 8259 section 4 leaves its meaning open; the key is named rather than one value silently kept), an
  integer too long for Python's conversion limit (the field is named) and strings that are not Unicode (lone
  surrogate escapes), each naming what is wrong.

A body that passes is handed on unchanged (FastAPI then validates its fields against the route's schema).
"""

from __future__ import annotations

import json

from adapters.serving.http.middleware import error_response

_WITH_BODY = ("POST", "PUT", "PATCH")
_KINDS = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}


class _BodyTooLarge(Exception):
    pass


class _DuplicateKey(ValueError):
    pass


class _HugeInt:
    """An integer literal over Python's int conversion limit (sys.get_int_max_str_digits()), kept as its
    digit count so the field holding it can be named."""

    def __init__(self, digits: int):
        self.digits = digits


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object_pairs_hook: the object as a dict; _DuplicateKey naming a key given twice."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _int(text: str) -> int | _HugeInt:
    try:
        return int(text)
    except ValueError:  # over the conversion limit (4300 digits by default)
        return _HugeInt(len(text.lstrip("-")))


def json_body_problem(content_type: str | None, body: bytes) -> tuple[str, str] | None:
    """What is wrong with ``body`` as a JSON request body sent with ``content_type``: (message, parameter), or None.

    A missing content-type is taken as JSON (as FastAPI does); a UTF-8 byte-order mark is allowed.
    """
    if content_type:
        media, *params = (p.strip().lower() for p in content_type.split(";"))
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            return f"content-type: send application/json (got {content_type.strip()})", "content-type"
        charset = next((p.split("=", 1)[1].strip('"') for p in params if p.startswith("charset=")), "utf-8")
        if charset not in ("utf-8", "utf8"):
            return f"content-type: the charset must be utf-8 (got {charset})", "content-type"
    if not body.strip():
        return "body: empty; send a JSON object", "body"
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return f"body: not UTF-8 (byte 0x{body[err.start]:02x} at position {err.start})", "body"
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_int=_int)
    except _DuplicateKey as err:
        return f"body: the key {str(err.args[0])!r} is given twice; give each key once", str(err.args[0])
    except json.JSONDecodeError as err:
        return f"body: not valid JSON ({err.msg}: line {err.lineno} column {err.colno})", "body"
    except RecursionError:
        return "body: JSON nested too deeply", "body"
    if not isinstance(value, dict):
        kind = "null" if value is None else _KINDS.get(type(value), type(value).__name__)
        return f"body: must be a JSON object, got {kind}", "body"
    try:
        huge = _find(value, [], lambda v: isinstance(v, _HugeInt))
        where = _find(value, [], _lone_surrogate)
    except RecursionError:
        return "body: JSON nested too deeply", "body"
    if huge:
        return f"{'.'.join(huge[0])}: number too long ({huge[1].digits} digits); out of range", huge[0][0]
    if where:
        return f"{'.'.join(where[0])}: not valid Unicode (a lone UTF-16 surrogate escape, e.g. \\ud800)", where[0][0]
    return None


def _lone_surrogate(value) -> bool:
    """Whether ``value`` is a string holding a lone surrogate ("\\ud800" escapes decode to one): no tokenizer
    nor UTF-8 encoder takes such a string."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _find(value, where: list[str], bad) -> tuple[list[str], object] | None:
    """(path, value) of the first value (or key) in ``value`` for which ``bad`` is true, or None."""
    if bad(value):
        return where or ["body"], value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _find(key, [*where, "<key>"], bad) if isinstance(key, str) else None
        found = found or _find(item, [*where, str(key)], bad)
        if found:
            return found
    return None


class BodyMiddleware:
    """ASGI middleware: the body size limit (413) and the JSON checks (400) of the module doc.

    ``max_bytes``: the largest body accepted. ``json_paths``: the paths whose POST/PUT/PATCH take a JSON body;
    their body is read (bounded) and checked here, then replayed to the app. Other requests' bodies are counted
    as the app reads them.
    """

    def __init__(self, app, max_bytes: int, json_paths: frozenset[str] = frozenset()):
        self.app, self.max_bytes, self.json_paths = app, max_bytes, json_paths

    def _too_large(self):
        return error_response(413, f"request body over the limit of {self.max_bytes} bytes", "request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                message = "content-length: not a byte count"
                return await error_response(400, message, "invalid_request_error", "content-length")(
                    scope, receive, send
                )
            if int(declared) > self.max_bytes:
                return await self._too_large()(scope, receive, send)
        if scope.get("method") in _WITH_BODY and scope.get("path") in self.json_paths:
            try:
                body = await self._read(receive)
            except _BodyTooLarge:
                return await self._too_large()(scope, receive, send)
            if body is None:  # the client went away
                return None
            content_type = headers.get(b"content-type")
            problem = json_body_problem(content_type.decode("latin-1") if content_type else None, body)
            if problem is not None:
                return await error_response(400, problem[0], "invalid_request_error", problem[1])(scope, receive, send)
            return await self.app(scope, _replay(body, receive), send)
        return await self._counted(scope, receive, send)

    async def _read(self, receive) -> bytes | None:
        """The whole body (None when the client disconnected); raises _BodyTooLarge once it passes max_bytes."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _counted(self, scope, receive, send):
        """Run the app with a receive that stops at max_bytes (413 unless the response has begun)."""
        seen, started = 0, False

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
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:  # once the response has begun, a second one cannot be sent
                await self._too_large()(scope, receive, send)


def _replay(body: bytes, receive):
    """A receive that gives ``body`` once, then what the server sends (a disconnect, for a streamed response)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
