"""Every error the API returns, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`,
or on the Anthropic Messages API (`/v1/messages`) in Anthropic's: `{"type": "error", "error":
{"type", "message"}}`, with the same status.

Handlers replace FastAPI's own 422 and HTML-ish defaults, so a client never sees a framework
error body or a stack trace.
"""

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.types import Scope

from api import metrics
from api.core.wire import is_json_type
from shared.jobs import Failed, FailureCode
from shared.queue import cannot_persist

log = logging.getLogger("gateway.api")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class AnthropicErrorInfo(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorInfo


def error_responses(
    *statuses: int, model: type[BaseModel] = ErrorResponse
) -> dict[int | str, dict[str, object]]:
    """A route's documented error statuses (OpenAPI `responses`)."""
    return {status: {"model": model} for status in statuses}


_COMPLETION_STATUSES = (400, 401, 404, 409, 413, 429, 500, 502, 503, 504)
COMPLETION_ERRORS = error_responses(*_COMPLETION_STATUSES)
"""What a request that queues a job may answer besides its result."""
ANTHROPIC_COMPLETION_ERRORS = error_responses(*_COMPLETION_STATUSES, model=AnthropicErrorResponse)


# How each job failure reaches the caller: HTTP status and OpenAI error type.
FAILURE_STATUS: dict[FailureCode, tuple[int, str]] = {
    FailureCode.UPSTREAM_AUTH: (502, "upstream_error"),
    FailureCode.UPSTREAM_RATE_LIMITED: (503, "upstream_error"),
    FailureCode.UPSTREAM_ERROR: (502, "upstream_error"),
    FailureCode.UPSTREAM_REFUSED: (400, "invalid_request_error"),
    FailureCode.BACKEND_UNAVAILABLE: (503, "server_error"),
    FailureCode.QUEUE_TIMEOUT: (503, "server_error"),
    FailureCode.WORKER_SHUTDOWN: (503, "server_error"),
    FailureCode.TIMEOUT: (504, "timeout_error"),
    FailureCode.STALLED: (504, "timeout_error"),
    FailureCode.WORKER_LOST: (502, "server_error"),
    FailureCode.QUEUE_UNAVAILABLE: (503, "server_error"),
    FailureCode.CANCELLED: (409, "invalid_request_error"),
    FailureCode.RETRY_DIVERGED: (502, "server_error"),
    FailureCode.WORKSPACE_TOO_LARGE: (413, "invalid_request_error"),
    FailureCode.OUTPUT_TOO_LARGE: (502, "server_error"),
    FailureCode.STORAGE_FULL: (503, "server_error"),
    FailureCode.WORKSPACE_UNAVAILABLE: (503, "server_error"),
    FailureCode.INTERNAL: (500, "server_error"),
}
ANTHROPIC_PATH = "/v1/messages"
_MODELS_PATH = "/v1/models"
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}
NO_RETRY = {"x-should-retry": "false"}
"""For a failure the OpenAI and Anthropic SDKs would retry (409, 5xx) that a retry would only repeat
at the cost of a whole agent run (its tools run again): a cancel, a refusal by the model API
(which Claude Code has retried already), a run cut at its time limit, a reply that broke the
requested format. One SDK call made three upstream runs before."""
_STORAGE_FULL_RETRY = {"retry-after": "10"}
_FAILURE_HEADERS = {FailureCode.STORAGE_FULL: _STORAGE_FULL_RETRY} | {
    code: NO_RETRY
    for code in (
        FailureCode.CANCELLED,
        FailureCode.UPSTREAM_AUTH,
        FailureCode.UPSTREAM_ERROR,
        FailureCode.UPSTREAM_REFUSED,
        # Claude Code has waited and asked again already (CLAUDE_MAX_RETRIES): each SDK retry, a
        # new agent run, asked an overloaded API three times more (one call, nine requests).
        FailureCode.UPSTREAM_RATE_LIMITED,
        # The caller waited QUEUE_TIMEOUT_S already: each SDK retry joined the back of the line
        # and waited as long again (an outside probe's call took 47 s, three minutes by default).
        FailureCode.QUEUE_TIMEOUT,
        FailureCode.TIMEOUT,
        FailureCode.STALLED,
        FailureCode.OUTPUT_TOO_LARGE,
        FailureCode.WORKSPACE_UNAVAILABLE,
    )
}


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

    def response(self, scope: Scope, headers: Mapping[str, str] | None = None) -> JSONResponse:
        """The error response to the request of `scope`: in Anthropic's shape to its clients."""
        metrics.count_error(self.status, self.info.code or self.info.type)
        body: dict[str, Any] = ErrorResponse(error=self.info).model_dump()
        if speaks_anthropic(scope):
            body = self.anthropic()
        return JSONResponse(body, status_code=self.status, headers={**self.headers, **(headers or {})})

    def anthropic(self, message: str | None = None) -> dict[str, Any]:
        """`{"type": "error", "error": {"type", "message"}}` with Anthropic's type for the status. A
        503 the caller should not retry is an `api_error`: Claude Code retries an
        `overloaded_error` up to ten times whatever `x-should-retry` says, each a new agent run
        (an outside probe: 8 jobs and 22 upstream requests for one prompt)."""
        default = "api_error" if self.status >= 500 else "invalid_request_error"
        kind = _ANTHROPIC_TYPES.get(self.status, default)
        if kind == "overloaded_error" and self.headers.get("x-should-retry") == "false":
            kind = "api_error"
        info = AnthropicErrorInfo(type=kind, message=self.info.message if message is None else message)
        return AnthropicErrorResponse(error=info).model_dump()


def speaks_anthropic(scope: Scope) -> bool:
    """Whether the request came from an Anthropic client, which reads only Anthropic's shape: any
    request to its Messages API, and one to the model list that sends `anthropic-version` (its
    SDK always does; the list answers it in Anthropic's shape too, api/routes/models.py)."""
    path: str = scope["path"]
    if _under(path, ANTHROPIC_PATH):
        return True
    return _under(path, _MODELS_PATH) and any(name == b"anthropic-version" for name, _ in scope["headers"])


def _under(path: str, route: str) -> bool:
    return path == route or path.startswith(route + "/")


_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})
_UNION_MEMBER = re.compile(r"[a-z-]+\[.*\]|str|int|float|bool|none|bytes|[A-Z]\w*")


def _param(loc: Sequence[Any]) -> str | None:
    """The parameter a validation error's `loc` names, as the client wrote it: without the part
    of the request (`body`, `query`, ...) or pydantic's names of a union's members (`str`,
    `list[tagged-union[...]]`, and the tag that picks a tagged member)."""
    names: list[str | int] = []
    tag_follows = False
    for part in loc[1:] if loc and loc[0] in _LOCATIONS else loc:
        if isinstance(part, int):
            names.append(part)
        elif _UNION_MEMBER.fullmatch(part):
            tag_follows = "tagged-union[" in part
        elif tag_follows:
            tag_follows = False
        else:
            names.append(part)
    if not names:
        return None
    text = str(names[0])
    for name in names[1:]:
        text += f"[{name}]" if isinstance(name, int) else f".{name}"
    return text


def _validation_error(exc: RequestValidationError, content_type: str | None) -> OpenAIError:
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        return OpenAIError.invalid("The request body is not valid JSON.", code="invalid_json")
    # A union's members each report; the one that got furthest says most (a content part's
    # missing field rather than "should be a valid string" from the string form).
    first = max(errors, key=lambda error: len(error["loc"]))
    param = _param(first["loc"])
    if param is None:  # the body itself: not an object, or none at all
        if not is_json_type(content_type):  # then left unparsed (`text/json` was told nothing: a probe)
            return OpenAIError.invalid(
                "The request body must be a JSON object, sent with 'Content-Type: application/json'.",
                code="invalid_json",
            )
        return OpenAIError.invalid("The request body must be a JSON object.", code="invalid_json")
    if first["type"] == "missing":
        return OpenAIError.invalid(f"Missing required parameter: '{param}'.", param=param)
    return OpenAIError.invalid(f"Invalid value for '{param}': {first['msg']}.", param=param)


def storage_full() -> OpenAIError:
    """Redis at its `maxmemory` (noeviction): it refuses every write, so nothing is half-written."""
    return OpenAIError(
        503,
        "The gateway's storage is full; retry later.",
        type="server_error",
        code=FailureCode.STORAGE_FULL.value,
        headers=_STORAGE_FULL_RETRY,
    )


def install(app: FastAPI) -> None:
    async def on_openai_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpenAIError)
        return exc.response(request.scope)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation_error(exc, request.headers.get("content-type")).response(request.scope)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        error = OpenAIError(exc.status_code, message, type="invalid_request_error")
        return error.response(request.scope, exc.headers)

    async def on_redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unreachable: %s", type(exc).__name__)
        return OpenAIError(
            503,
            "The gateway's queue is unavailable; retry shortly.",
            type="server_error",
            code="queue_unavailable",
            headers={"retry-after": "2"},
        ).response(request.scope)

    async def on_redis_full(request: Request, exc: Exception) -> JSONResponse:
        log.error("Redis refuses writes: it reached its maxmemory")
        return storage_full().response(request.scope)

    async def on_redis_refusal(request: Request, exc: Exception) -> JSONResponse:
        if cannot_persist(exc):  # a full disk under a persistent Redis: a 500 and a traceback before
            log.error("Redis refuses writes: it cannot save to its disk (MISCONF)")
            return storage_full().response(request.scope)
        return await on_unexpected(request, exc)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        error = OpenAIError(500, "The gateway failed to handle the request.", type="server_error")
        return error.response(request.scope)

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RedisConnectionError, on_redis_down)
    app.add_exception_handler(RedisTimeoutError, on_redis_down)
    app.add_exception_handler(OutOfMemoryError, on_redis_full)
    app.add_exception_handler(ResponseError, on_redis_refusal)
    app.add_exception_handler(Exception, on_unexpected)
