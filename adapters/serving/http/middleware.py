"""Errors and auth of the HTTP server (body limits and JSON checks: adapters.serving.http.bodies).

Every error leaves as JSON ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape), with a
4xx status for anything the client can fix. Messages never show the server's file paths nor the store's other
adapters to a client: an unknown adapter is "not found", pointing at GET /v1/models (which needs the token).
"""

from __future__ import annotations

import hmac
import logging
import re

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


# An absolute file path inside a message (a store's, a base model's): not for clients' eyes.
_PATH = re.compile(r"(?<![\w@.])(?:[A-Za-z]:)?[/\\][^\s'\",;:()]*")


def not_found_message(ref: str | None, what: str = "model") -> str:
    """The 404 text of an adapter reference that names nothing: no store path, no list of other adapters."""
    name = f"{what} {ref!r}" if ref else what
    return f"{name} not found; GET /v1/models lists the models this server serves"


def client_message(message: str) -> str:
    """``message`` with absolute file paths replaced by <path>, on one line."""
    return " ".join(_PATH.sub("<path>", message).split())


def api_error_of(err: Exception, ref: str | None = None, param: str = "model") -> APIError:
    """Map an engine error about the adapter reference ``ref`` (the request's ``param``) to an HTTP status the
    client can act on.

    BaseMismatchError -> 409; StoreError -> 404 for a reference that names nothing (not_found_message), else
    400; ConfigError -> 400, their messages without file paths (client_message; logged in full); anything
    else -> 500 naming only the exception's type, logged with its traceback.
    """
    if isinstance(err, APIError):
        return err
    if isinstance(err, (BaseMismatchError, StoreError, ConfigError)):
        log.info("refused: %s", err)
    message = client_message(str(err))
    if isinstance(err, BaseMismatchError):
        return APIError(409, message, "base_mismatch", param)
    if isinstance(err, StoreError):
        if any(s in str(err) for s in _MISSING):
            return APIError(404, not_found_message(ref, param), "adapter_not_found", param)
        return APIError(400, message, "adapter_error", param)
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
    """Exception handler: the framework's own HTTP errors (an unknown path, a wrong method) in the same JSON
    error shape, with their status and headers, saying what the client asked for."""
    kind = "invalid_request_error" if err.status_code < 500 else "server_error"
    message, method, path = str(err.detail), request.method, request.url.path
    if err.status_code == 404 and message == "Not Found":
        message = f"no route {method} {path}; the API is documented at /docs"
    elif err.status_code == 405:
        allowed = (err.headers or {}).get("Allow", "")
        message = f"method {method} is not allowed on {path}" + (f" (allowed: {allowed})" if allowed else "")
    response = error_response(err.status_code, " ".join(message.split()), kind)  # one line, whatever the path
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
