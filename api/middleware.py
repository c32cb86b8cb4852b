"""Pure ASGI middleware (no per-request task or body copy, unlike Starlette's BaseHTTPMiddleware)."""

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.core.limits import bounded_json
from api.errors import OpenAIError
from shared import logs
from shared.settings import Settings

log = logging.getLogger("gateway.api")

_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Polled by probes and scrapers every few seconds: logged at DEBUG only.
_QUIET_PATHS = frozenset({"/health", "/ready", "/metrics", "/status"})


class RequestId:
    """Gives every response an `x-request-id`: the caller's, if well-formed, else a new one.

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
        header = (b"x-request-id", request_id.encode())
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            level = logging.DEBUG if scope["path"] in _QUIET_PATHS else logging.INFO
            # The path is decoded (`%0a` is a newline): escaped, so a caller cannot forge log lines.
            path = scope["path"].encode("unicode_escape").decode("ascii")
            log.log(level, "%s %s -> %d in %.0f ms", scope["method"], path, status, elapsed_ms)


class BodyLimit:
    """Refuses bodies over `MAX_REQUEST_BYTES` with 413 while reading them, chunked uploads
    included, and JSON bodies beyond the shape limits (`bounded_json`) with 400.

    The body is read here (JSON endpoints read it whole anyway) so the limits hold before any
    route sees a byte: an oversized request never reaches validation or the queue.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.max_bytes = settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
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
        # Connection: close, so the server does not read the rest of an oversized upload.
        await error.response(scope, {"connection": "close"})(scope, receive, send)


def _is_json(scope: Scope) -> bool:
    kind: bytes = dict(scope["headers"]).get(b"content-type", b"").partition(b";")[0].strip().lower()
    return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))
