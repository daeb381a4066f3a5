"""Errors, auth and body-size limits of the HTTP server.

Every error leaves as JSON ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape), with a
4xx status for anything the client can fix.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from adapters.errors import BaseMismatchError, ConfigError, StoreError
from adapters.serving.http.schemas import UNSUPPORTED

log = logging.getLogger(__name__)

# StoreError messages that mean "this reference names nothing" (404) rather than "it is unusable" (400).
_MISSING = ("no adapter named", "has no version", "has no tag", "does not exist", "has no versions", "was removed")


class APIError(Exception):
    """An error answered to the client: HTTP ``status``, ``message``, OpenAI error ``kind`` and the bad ``param``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    """The JSON error body with HTTP ``status``."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def api_error_of(err: Exception) -> APIError:
    """Map an engine error to an HTTP status the client can act on.

    BaseMismatchError -> 409; StoreError -> 404 for a reference that names nothing, else 400;
    ConfigError -> 400; anything else -> 500 naming only the exception's type, logged with its traceback.
    """
    if isinstance(err, APIError):
        return err
    message = str(err)
    if isinstance(err, BaseMismatchError):
        return APIError(409, message, "base_mismatch")
    if isinstance(err, StoreError):
        missing = any(s in message for s in _MISSING)
        return APIError(404 if missing else 400, message, "adapter_not_found" if missing else "adapter_error", "model")
    if isinstance(err, ConfigError):
        return APIError(400, message)
    log.error("internal error", exc_info=err)
    return APIError(500, f"internal error: {type(err).__name__}", "server_error")


async def handle_api_error(request: Request, err: APIError) -> JSONResponse:
    """Exception handler: an APIError as its JSON error response."""
    return error_response(err.status, err.message, err.kind, err.param)


async def handle_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    """Exception handler: a body that fails schema validation (or is not JSON) -> 400 listing every problem.

    An unknown parameter is named as one this server does not implement; a refused value of a parameter in
    schemas.UNSUPPORTED gets that parameter's explanation. ``param`` is the first problem's parameter.
    """
    problems, params = [], []
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        if e.get("type") == "extra_forbidden":
            text = f"{where}: this server does not implement this parameter"
        elif loc and loc[0] in UNSUPPORTED and len(loc) <= 2:
            text = f"{loc[0]}: not implemented by this server ({UNSUPPORTED[loc[0]]})"
        else:
            text = f"{where}: {e.get('msg')}"
        if text not in problems:
            problems.append(text)
        params.append(loc[0] if loc else None)
    return error_response(
        400, "invalid request: " + "; ".join(problems), "invalid_request_error", next((p for p in params if p), None)
    )


async def handle_http_error(request: Request, err: HTTPException) -> JSONResponse:
    """Exception handler: the framework's own HTTP errors (an unparsable body, an unknown path, a wrong method)
    in the same JSON error shape, with their status and headers."""
    kind = "invalid_request_error" if err.status_code < 500 else "server_error"
    response = error_response(err.status_code, str(err.detail), kind)
    response.headers.update(err.headers or {})
    return response


def require_bearer_token(request: Request) -> None:
    """Route dependency: 401 unless ``Authorization: Bearer <token>`` matches ``settings.token()`` (None: no auth).

    The comparison is constant-time (hmac.compare_digest), so response timing does not leak the token.
    """
    token = request.app.state.settings.token()
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise APIError(401, "missing or wrong bearer token (Authorization: Bearer <token>)", "authentication_error")


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """ASGI middleware: reject bodies over ``max_bytes`` (413), by Content-Length or while reading a chunked body."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"request body over the limit of {self.max_bytes} bytes", "request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large()(scope, receive, send)
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
            if not started:  # once the response has begun, a second one cannot be sent
                await self._too_large()(scope, receive, send)


class UnexpectedErrorMiddleware:
    """ASGI middleware, outermost: an exception nothing else answered is logged with its traceback
    (logger.exception) and answered as a JSON 500, unless the response had already begun."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as err:  # noqa: BLE001 - every request gets an answer, the server keeps serving
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                response = error_response(500, f"internal error: {type(err).__name__}", "server_error")
                await response(scope, receive, send)
