"""Typed errors and the one place that turns them into OpenAI-style responses.

Every failure a client can see is ``{"error": {"message", "type", "param", "code"}}`` with a real status code —
never 200 with an error body (LM Studio lms#362), never FastAPI's ``{"detail": ...}`` and never a 422 for a field
we do not know (openai-agents-python#442). Code anywhere below the routes raises an :class:`APIError` subclass;
:func:`install_error_handlers` renders it, and also renders the framework's own errors (malformed JSON, validation,
unknown route, wrong method) and any unexpected exception (as a 500 that does not leak internals).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BadRequest(APIError):
    status, type, code = 400, "invalid_request_error", None


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class Unauthorized(APIError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"

    def __init__(self, message: str = "missing or invalid API key: send 'Authorization: Bearer <key>'"):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(APIError):
    status, type, code = 403, "invalid_request_error", "forbidden"


class NotFound(APIError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(APIError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class BodyTimeout(APIError):
    """408: the body did not arrive within --body-timeout (a slow or stalled upload). Not retried by the SDK."""

    status, type, code = 408, "invalid_request_error", "body_timeout"

    def __init__(self, message: str):
        super().__init__(message, headers={"x-should-retry": "false", "Connection": "close"})


class UnsupportedMediaType(APIError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


class QueueFull(APIError):
    """429: the engine's waiting queue is at its bound. Retry-After tells clients (the openai SDK obeys it) when."""

    status, type, code = 429, "rate_limit_error", "queue_full"


class ServiceUnavailable(APIError):
    """503: still loading, shutting down, or out of memory for this request; the server itself keeps serving."""

    status, type, code = 503, "server_error", "unavailable"


class RequestTimeout(APIError):
    """504: the request outlived --request-timeout. ``x-should-retry: false`` stops the openai SDK from re-running
    the same long generation on its own."""

    status, type, code = 504, "timeout_error", "request_timeout"

    def __init__(self, message: str):
        super().__init__(message, headers={"x-should-retry": "false"})


class InternalError(APIError):
    """500: a bug or an engine failure; the details go to the log, not to the client."""


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic errors → (one readable message, the ``param`` path of the first error)."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return msg, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return BadRequest(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err: APIError = NotFound(f"no route {request.method} {request.url.path}")
        else:
            err = APIError(str(exc.detail))
            err.status, err.code = exc.status_code, {405: "method_not_allowed"}.get(exc.status_code)
            err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err.headers.update(exc.headers or {})
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return InternalError("internal server error (details are in the server log)").response()
