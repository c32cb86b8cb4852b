"""Every error the API returns, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Handlers replace FastAPI's own 422 and HTML-ish defaults, so a client never sees a framework
error body or a stack trace.
"""

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException

from api import metrics
from shared.jobs import Failed, FailureCode

log = logging.getLogger("gateway.api")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """A route's documented error statuses (OpenAPI `responses`)."""
    return {status: {"model": ErrorResponse} for status in statuses}


COMPLETION_ERRORS = error_responses(400, 401, 404, 409, 413, 429, 500, 502, 503, 504)
"""What a request that queues a job may answer besides its result."""


# How each job failure reaches the caller: HTTP status and OpenAI error type.
FAILURE_STATUS: dict[FailureCode, tuple[int, str]] = {
    FailureCode.UPSTREAM_AUTH: (502, "upstream_error"),
    FailureCode.UPSTREAM_RATE_LIMITED: (503, "upstream_error"),
    FailureCode.UPSTREAM_ERROR: (502, "upstream_error"),
    FailureCode.BACKEND_UNAVAILABLE: (503, "server_error"),
    FailureCode.QUEUE_TIMEOUT: (503, "server_error"),
    FailureCode.WORKER_SHUTDOWN: (503, "server_error"),
    FailureCode.TIMEOUT: (504, "timeout_error"),
    FailureCode.STALLED: (504, "timeout_error"),
    FailureCode.WORKER_LOST: (502, "server_error"),
    FailureCode.CANCELLED: (409, "invalid_request_error"),
    FailureCode.WORKSPACE_TOO_LARGE: (413, "invalid_request_error"),
    FailureCode.INTERNAL: (500, "server_error"),
}
# A cancelled job stays cancelled: tell clients that retry 409 (the openai SDKs do) not to.
_FAILURE_HEADERS = {FailureCode.CANCELLED: {"x-should-retry": "false"}}


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = dict(headers or {})

    @classmethod
    def invalid(cls, message: str, *, param: str | None = None, code: str | None = None) -> "OpenAIError":
        return cls(400, message, type="invalid_request_error", param=param, code=code)

    @classmethod
    def unsupported(cls, param: str) -> "OpenAIError":
        """400 for a parameter whose meaning the gateway cannot honour (never silently dropped)."""
        return cls.invalid(
            f"The parameter '{param}' is not supported by this gateway.",
            param=param,
            code="unsupported_parameter",
        )

    @classmethod
    def not_found(cls, message: str, *, param: str, code: str) -> "OpenAIError":
        """404 for an id the caller named that does not exist or is another key's (never which)."""
        return cls(404, message, type="invalid_request_error", param=param, code=code)

    @classmethod
    def from_failure(cls, failure: Failed) -> "OpenAIError":
        status, type_ = FAILURE_STATUS[failure.code]
        headers = _FAILURE_HEADERS.get(failure.code)
        return cls(status, failure.message, type=type_, code=failure.code.value, headers=headers)

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        metrics.count_error(self.status, self.info.code or self.info.type)
        body = ErrorResponse(error=self.info).model_dump()
        return JSONResponse(body, status_code=self.status, headers={**self.headers, **(headers or {})})


def _param(loc: Sequence[Any]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    if not parts:
        return None
    text = parts[0]
    for part in parts[1:]:
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return OpenAIError.invalid("The request body is not valid JSON.", code="invalid_json")
    param = _param(first["loc"])
    if first["type"] == "missing":
        return OpenAIError.invalid(f"Missing required parameter: '{param}'.", param=param)
    if param is None:
        return OpenAIError.invalid("The request body must be a JSON object.", code="invalid_json")
    return OpenAIError.invalid(f"Invalid value for '{param}': {first['msg']}.", param=param)


def install(app: FastAPI) -> None:
    async def on_openai_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpenAIError)
        return exc.response()

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation_error(exc).response()

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        error = OpenAIError(exc.status_code, message, type="invalid_request_error")
        return error.response(headers=exc.headers)

    async def on_redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unreachable: %s", type(exc).__name__)
        return OpenAIError(
            503,
            "The gateway's queue is unavailable; retry shortly.",
            type="server_error",
            code="queue_unavailable",
        ).response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return OpenAIError(500, "The gateway failed to handle the request.", type="server_error").response()

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RedisConnectionError, on_redis_down)
    app.add_exception_handler(RedisTimeoutError, on_redis_down)
    app.add_exception_handler(Exception, on_unexpected)
