"""Pure ASGI middleware (no per-request task or body copy, unlike Starlette's BaseHTTPMiddleware)."""

import asyncio
import logging
import re
import time
import uuid

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.core.limits import bounded_json
from api.core.wire import is_json_type
from api.errors import OpenAIError, speaks_anthropic
from shared import logs
from shared.settings import Settings

log = logging.getLogger("gateway.api")

_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Polled by probes and scrapers every few seconds: logged at DEBUG only.
_QUIET_PATHS = frozenset({"/health", "/ready", "/metrics", "/status"})


class RequestId:
    """Gives every response an `x-request-id`: the caller's, if well-formed, else a new one; a
    response to an Anthropic client also as `request-id`, the header its clients read it from.

    It also binds the id to the request's log context and logs one line when the response ends.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _CLIENT_REQUEST_ID.fullmatch(given) else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        logs.bind_new(request_id=request_id)
        headers = [(b"x-request-id", request_id.encode())]
        if speaks_anthropic(scope):
            headers.append((b"request-id", request_id.encode()))
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *headers]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            level = logging.DEBUG if scope["path"] in _QUIET_PATHS else logging.INFO
            # The path is decoded (`%0a` is a newline): escaped, so a caller cannot forge log lines.
            path = scope["path"].encode("unicode_escape").decode("ascii")
            log.log(level, "%s %s -> %d in %.0f ms", scope["method"], path, status, elapsed_ms)


BODY_TIMEOUT_S = 60
"""A request's body not whole by then is refused (408)."""
CALLER_BODIES = 2
"""Bodies of `MAX_REQUEST_BYTES` one caller's requests may hold at once in one API process."""


class BodyLimit:
    """Refuses bodies over `MAX_REQUEST_BYTES` with 413 while reading them, chunked uploads
    included, and JSON bodies beyond the shape limits (`bounded_json`) with 400.

    The body is read here (JSON endpoints read it whole anyway) so the limits hold before any
    route sees a byte: an oversized request never reaches validation or the queue. What one
    caller's bodies hold while they arrive is bounded too (`CALLER_BODIES`, 429), and so is how
    long one may take (`BODY_TIMEOUT_S`, 408): found by an outside probe, one key held 120 bodies
    of 10 MiB begun and never finished, 1.2 GB of the API, the rate limits counting only starts.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.max_bytes = settings.max_request_bytes
        self._arriving: dict[str, int] = {}  # bytes of bodies being read, by caller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        if any(
            name == b"content-encoding" and value.strip().lower() not in (b"", b"identity")
            for name, value in scope["headers"]
        ):
            await _refusal(scope, receive, send, _ENCODED)  # it was read as text, "not UTF-8" (a probe)
            return
        state = scope.get("state", {})
        caller = state.get("key_id") or f"addr:{state.get('client_address')}"
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                more = True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    self._arriving[caller] = self._arriving.get(caller, 0) + len(chunk)
                    if size > self.max_bytes:
                        await self._refuse(scope, receive, send)
                        return
                    if self._arriving[caller] > CALLER_BODIES * self.max_bytes:
                        await _refusal(scope, receive, send, _TOO_MANY_BODIES)
                        return
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            await _refusal(scope, receive, send, _BODY_TOO_SLOW)
            return
        finally:
            if (left := self._arriving.get(caller, 0) - size) > 0:
                self._arriving[caller] = left
            else:
                self._arriving.pop(caller, None)
        if _is_json(scope) and (refusal := bounded_json(b"".join(chunks), self.settings)) is not None:
            await refusal.response(scope)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = OpenAIError(
            413,
            f"The request body exceeds the limit of {self.max_bytes} bytes.",
            type="invalid_request_error",
            code="request_too_large",
        )
        await _refusal(scope, receive, send, error)


_TOO_MANY_BODIES = OpenAIError(
    429,
    f"Too many request bodies arriving at once: at most {CALLER_BODIES} of the size limit per caller; "
    "send the rest when these are in.",
    type="requests",
    code="too_many_uploads",
    headers={"retry-after": "1"},
)
_ENCODED = OpenAIError(
    415,
    "Request bodies are taken as sent: this gateway decodes no Content-Encoding; send it uncompressed.",
    type="invalid_request_error",
    code="unsupported_content_encoding",
)
_BODY_TOO_SLOW = OpenAIError(
    408,
    f"The request body did not arrive whole within {BODY_TIMEOUT_S} s.",
    type="invalid_request_error",
    code="request_timeout",
)


async def _refusal(scope: Scope, receive: Receive, send: Send, error: OpenAIError) -> None:
    # Connection: close, so the server does not read the rest of the body.
    await error.response(scope, {"connection": "close"})(scope, receive, send)


def _is_json(scope: Scope) -> bool:
    sent = next((value for name, value in scope["headers"] if name == b"content-type"), b"")
    return is_json_type(sent.decode("latin-1"))


CALLER_RETRIEVALS = 16
"""Jobs one caller may be reading at once in one API process (`GET` of a chat completion or a
response, streamed or not, and a cancel, which answers with the job)."""
_RETRIEVAL = re.compile(r"/v1/(?:chat/completions|responses)/[^/]+")
_CANCEL = re.compile(r"/v1/(?:chat/completions|responses)/[^/]+/cancel")  # answers with the whole job
_COMPLETION = frozenset({"/v1/chat/completions", "/v1/responses", "/v1/messages"})
_PIECE_BYTES = 256 * 1024


class ResponseLimit:
    """Bounds what one caller's answers hold in one API process: a completion's answer, or a
    retrieval of one, may be a whole job (up to `JOB_MAX_OUTPUT_CHARS`), held until its client has
    it, however slowly it reads (a reader of 32 KiB every 30 s is not dropped). So a body goes to the
    server in pieces, each once the client has taken most of the one before, and a caller has at
    most `CALLER_RETRIEVALS` retrievals open at once, and as many completion requests as twice its
    concurrent jobs (`MAX_CONCURRENT_JOBS_PER_KEY`; 0: no cap), their answers included: an answer
    left the job's slot when the job ended (outside probes' keys held 353 retrievals, then
    gigabytes of answers to requests they kept sending)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self._caps = {
            "retrievals": CALLER_RETRIEVALS,
            "completions": 2 * settings.max_concurrent_jobs_per_key,
        }
        self._open: dict[tuple[str, str], int] = {}  # requests open, by kind and caller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = _kind(scope)
        if kind is None or not self._caps[kind]:
            await self.app(scope, receive, send)
            return
        state = scope.get("state", {})
        held = (kind, state.get("key_id") or f"addr:{state.get('client_address')}")
        if self._open.get(held, 0) >= self._caps[kind]:
            await _too_many(kind, self._caps[kind]).response(scope)(scope, receive, send)
            return
        self._open[held] = self._open.get(held, 0) + 1

        async def send_in_pieces(message: Message) -> None:
            body = message.get("body", b"")
            if message["type"] != "http.response.body" or len(body) <= _PIECE_BYTES:
                await send(message)
                return
            for start in range(0, len(body) - _PIECE_BYTES, _PIECE_BYTES):
                await send(
                    {
                        "type": "http.response.body",
                        "body": body[start : start + _PIECE_BYTES],
                        "more_body": True,
                    }
                )
            last = {"type": "http.response.body", "body": body[start + _PIECE_BYTES :]}
            await send({**last, "more_body": message.get("more_body", False)})

        try:
            await self.app(scope, receive, send_in_pieces)
        finally:
            if (left := self._open[held] - 1) > 0:
                self._open[held] = left
            else:
                del self._open[held]


def _kind(scope: Scope) -> str | None:
    if scope["type"] != "http":
        return None
    if scope["method"] == "POST" and scope["path"] in _COMPLETION:
        return "completions"
    if (scope["method"] == "GET" and _RETRIEVAL.fullmatch(scope["path"])) or (
        scope["method"] == "POST" and _CANCEL.fullmatch(scope["path"])
    ):
        return "retrievals"
    return None


def _too_many(kind: str, cap: int) -> OpenAIError:
    if kind == "retrievals":
        message = f"Too many retrievals at once: at most {cap} jobs per caller are read at a time"
        code = "too_many_retrievals"
    else:
        message = f"Too many requests open at once: at most {cap} per caller, their answers included"
        code = "concurrency_limit_exceeded"
    return OpenAIError(
        429,
        f"{message}; retry when one has been read.",
        type="requests",
        code=code,
        headers={"retry-after": "1"},
    )


class Cors(CORSMiddleware):
    """Starlette's CORS, its refused preflights in the API's error shape (they were plain text:
    an outside probe), with the CORS headers it gives them."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        # Keys travel in a header, never in cookies: no credentialed CORS, so never `*` with it.
        super().__init__(
            app,
            allow_origins=settings.cors_origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type", "x-api-key", "x-request-id"],
            expose_headers=["x-request-id", "retry-after", "x-ratelimit-remaining-requests"],
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = OpenAIError.invalid(f"{bytes(response.body).decode()}.", code="cors_not_allowed")
        cors = {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}
        return _Refusal(refused, cors)


class _Refusal(Response):
    """An error answered in the shape its request's API speaks (known once it is sent)."""

    def __init__(self, error: OpenAIError, headers: dict[str, str]) -> None:
        super().__init__(status_code=error.status)
        self._error, self._cors = error, headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._error.response(scope, self._cors)(scope, receive, send)
