"""A credential-injecting proxy to the model API, so the agent never holds the real credential.

Each CLI gets `ANTHROPIC_BASE_URL` pointing here and, as its `ANTHROPIC_API_KEY` (or, for the
CLI's own login, its `CLAUDE_CODE_OAUTH_TOKEN`), a token that is valid only while its job runs.
The proxy swaps that token for the real credential and forwards the request, streaming the answer
back unchanged. A tool that reads the CLI's environment finds the token, which is worthless
outside this host and after the job; the real credential lives only in this worker process (see
docs/security.md for what that does and does not protect against).

A token can also be issued *warming* (`worker/warm.py`): the proxy answers its requests itself
with an empty, free reply and never contacts the model API, so a CLI started ahead of its job can
run throwaway first turns; `admit` makes it an ordinary job token afterwards.

It runs in its own thread and event loop, so it never competes with arq's loop or signal
handling. It listens on Unix sockets, which the CLI speaks HTTP over (`ANTHROPIC_UNIX_SOCKET`):
no TCP port. Each job's sandbox has a socket of its own bound in (a `door`, `worker/sandbox.py`),
so a job that holds every connection it can holds only its own; the socket given to `start` is for
CLIs run without a sandbox.
"""

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shared.backend_auth import LoginError
from shared.http_head import MAX_HEAD_BYTES, BoundedHead

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}
)
_NOT_FORWARDED = _HOP_BY_HOP | {"content-encoding"}  # the body goes as it was checked: unencoded
_CREDENTIAL_HEADERS = frozenset({"x-api-key", "authorization"})
# What the CLI needs of the model API; anything else a tool asks for with its job's token (the
# rest of the API under the operator's credential: files, batches, admin) is refused.
FORWARDED = frozenset({("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")})
MAX_CONNECTIONS = 256
"""Connections held at once through the socket CLIs without a sandbox share: far more than their
CLIs open, far fewer than the worker's descriptors, which a job opening connections by the
thousand (no token needed to connect) would otherwise use up, failing every other job on the
worker."""
DOOR_CONNECTIONS = 32
"""Connections held at once through one sandbox's own socket: more than its CLI and subagents open."""
MAX_BODY_BYTES = 32 * 1024 * 1024
_MAX_JSON_VALUES = 500_000
"""`{` and `[` in a body (in its strings too), counted before it is parsed, as the API counts its
own: a job's 33 MB of empty objects took 5 s of the worker's loop to parse, and 900 MB (a probe)."""
"""The Messages API's own request limit; a larger body is refused before it is held in memory."""
DOOR_BODY_BYTES = 2 * MAX_BODY_BYTES
"""Request bodies held at once for one sandbox (read, or sent on and not yet answered)."""
BODY_TIMEOUT_S = 60
"""A request's body not whole by then is refused (408): begun bodies are not held for ever."""
SERVER_TOOLS = {"WebSearch": "web_search_"}
"""The model API's own tools a job's CLI asks for through one of its tools (the type's prefix)."""
_FETCHED_BLOCKS = frozenset({"image", "document"})
"""Content blocks with a source the model API may fetch."""
_CALLS = frozenset({"tool_use", "server_tool_use"})
_INLINE_SOURCES = frozenset({"base64", "text", "content"})
"""The sources of images and documents the request itself holds; of the others, only a URL under
`IMAGE_URL_ALLOWLIST` (the gateway's own images by URL) is forwarded."""
_KEPT_INSIDE = ("advisor_", "tool_search_tool_")
"""Server tools Claude Code may send whose work stays within the model API (another model, the
request's own tool list)."""


class _UpstreamCuts(logging.Filter):
    """An answer the model API cuts mid-stream is passed on as a cut (uvicorn closes the CLI's
    connection, and the CLI asks again); uvicorn's ~80-line traceback of it becomes one warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        cut = record.exc_info[1] if record.exc_info else None
        if isinstance(cut, httpx.TransportError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.name = "gateway.worker.proxy"  # not uvicorn's: the worker's proxy says it
            record.msg, record.args = "the model API cut an answer mid-stream (%s)", (type(cut).__name__,)
            record.exc_info = record.exc_text = None
        return True


Credential = Callable[[], tuple[str, str]]
"""The header (name, value) that authenticates a request upstream, read for every request."""


def api_key_header(key: str) -> Credential:
    return lambda: ("x-api-key", key)


def bearer_header(token: Callable[[], str]) -> Credential:
    """An OAuth token, as the CLI itself sends it (it adds the OAuth beta header on its own)."""
    return lambda: ("authorization", f"Bearer {token()}")


def server_tools_of(tools: list[str]) -> frozenset[str]:
    """The server tools (type prefixes) a job with these tools of Claude Code's may ask for."""
    return frozenset(SERVER_TOOLS[tool] for tool in tools if tool in SERVER_TOOLS)


def reach_beyond(request: object, server_tools: frozenset[str], image_urls: list[str]) -> str | None:
    """What in a Messages request (parsed) would have the model API reach beyond the model for the
    agent, or None: a server tool the job was not given (web search, web fetch, code execution),
    MCP servers it would connect to, a URL it would fetch that is not one of the operator's image
    prefixes, a file of the operator's Files API, a container. The sandbox has no network; these
    would be one (an outside probe sent a workspace out through `web_fetch`)."""
    if not isinstance(request, dict):
        return "a body that is not a request"  # nothing it cannot check goes on
    if request.get("mcp_servers"):
        return "MCP servers"
    if request.get("container") is not None:  # its files, and skills run in it (a probe)
        return "a container"
    tools = request.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        return "tools it cannot check"  # what it can check, and lets through, is all it passes on
    for tool in tools:
        kind = tool.get("type")
        if kind in (None, "custom"):
            continue
        if not isinstance(kind, str) or not kind.startswith((*server_tools, *_KEPT_INSIDE)):
            return f"the server tool {str(kind)[:100]!r}"
    pending: list[object] = [request.get("system"), request.get("messages")]
    while pending:  # no recursion: the nesting is the agent's to choose
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind in _FETCHED_BLOCKS and (beyond := _source_beyond(node.get("source"), image_urls)):
                return beyond
            if "file_id" in node:  # any block naming one (`container_upload`, a probe found)
                return "a file of the Files API"
            # A tool call's input is the tool's, which the model API reads nothing of (a probe: a
            # todo item's `source` refused a job's next turn).
            pending.extend(value for key, value in node.items() if not (key == "input" and kind in _CALLS))
    return None


def _source_beyond(source: object, image_urls: list[str]) -> str | None:
    """An image's or document's source, if the model API would fetch it from elsewhere."""
    if not isinstance(source, dict) or (kind := source.get("type")) in _INLINE_SOURCES:
        return None
    url = source.get("url")
    if kind == "url" and isinstance(url, str) and url.startswith(tuple(image_urls)):
        return None
    return f"a source of type {str(kind)[:100]!r} (a URL to fetch, a file of the Files API)"


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys each come once: of two, parsers keep either one."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a key comes twice")
    return found


class CredentialProxy:
    def __init__(self, upstream: str, credential: Credential, image_urls: list[str] | None = None) -> None:
        self._upstream = upstream.rstrip("/")
        self._credential = credential
        self._image_urls = image_urls or []  # prefixes of the images the gateway sends by URL
        self._tokens: dict[str, frozenset[str]] = {}  # each job's token: the server tools it may use
        self._warming: dict[str, frozenset[str]] = {}
        self._client: httpx.AsyncClient | None = None
        self._server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsandboxed: asyncio.Server | None = None
        self.socket: Path | None = None

    def issue(self, server_tools: frozenset[str] = frozenset(), *, warming: bool = False) -> str:
        """A token for one job, whose requests may use `server_tools` (`server_tools_of`); `revoke`
        it when the job ends. A warming token is answered by the proxy itself until it is
        `admit`ted."""
        token = f"job-{secrets.token_urlsafe(24)}"
        if warming:
            self._warming[token] = server_tools
        else:
            self._tokens[token] = server_tools
        return token

    def admit(self, token: str) -> None:
        """From now on the warming `token`'s requests go to the model API."""
        if (server_tools := self._warming.pop(token, None)) is not None:
            self._tokens[token] = server_tools

    def revoke(self, token: str) -> None:
        self._tokens.pop(token, None)
        self._warming.pop(token, None)

    def _presented(self, request: Request) -> str:
        if key := request.headers.get("x-api-key"):
            return key
        return request.headers.get("authorization", "").removeprefix("Bearer ").strip()

    async def _forward(self, request: Request) -> Response:
        presented = self._presented(request)
        if presented in self._warming:
            return await _warm_up_reply(request)
        if (server_tools := self._tokens.get(presented)) is None:
            return _error(401, "authentication_error", "invalid token")
        if (request.method, request.url.path) not in FORWARDED:
            return _error(403, "permission_error", "the gateway forwards only the Messages API")
        door: _Door = request.state.door
        body = await _bounded_body(request, door)
        if isinstance(body, Response):
            return body
        held = len(body)  # counted against the door until its answer is over
        if (refusal := self._refusal(request, body, server_tools)) is not None:
            door.release(held)
            return refusal
        try:
            return await self._send(request, body, partial(door.release, held))
        except BaseException:
            door.release(held)
            raise

    def _refusal(self, request: Request, body: bytes, server_tools: frozenset[str]) -> Response | None:
        """Why the body is not forwarded, if it is not: it must be what the proxy reads as the
        model API would, plain JSON the proxy checks (`reach_beyond`). One it could not read (an
        encoding, invalid UTF-8, a key twice, trailing bytes, nesting past its parser) went on
        unchecked, and the model API might have read it (the re-check probe)."""
        if any(value.strip().lower() != "identity" for value in request.headers.getlist("content-encoding")):
            return _error(
                415, "invalid_request_error", "the gateway forwards only bodies without a content encoding"
            )
        if body.count(b"{") + body.count(b"[") > _MAX_JSON_VALUES:
            return _error(
                400, "invalid_request_error", "the body has more JSON values than the gateway checks"
            )
        try:
            parsed = json.loads(body.decode(), object_pairs_hook=_once_each)
        except (ValueError, RecursionError):
            return _error(400, "invalid_request_error", "the body is not JSON the gateway can check")
        if (beyond := reach_beyond(parsed, server_tools, self._image_urls)) is not None:
            # 400, as the model API's own refusal: the caller gets its reason (a 403 read as a
            # credential failure, upstream_authentication_error).
            return _error(400, "invalid_request_error", f"the gateway does not forward {beyond}")
        return None

    async def _send(self, request: Request, body: bytes, done: Callable[[], None]) -> Response:
        """Forwards the request with the real credential; `done` runs once its answer is over."""
        assert self._client is not None
        headers = [
            (name, value)
            for name, value in request.headers.items()
            if name not in _NOT_FORWARDED and name not in _CREDENTIAL_HEADERS
        ]
        try:
            headers.append(self._credential())
        except LoginError as exc:  # the login file went away: the job fails as a credential refusal
            done()
            return _error(401, "authentication_error", str(exc))
        upstream = self._client.build_request(
            request.method,
            self._upstream + request.url.path,
            params=request.url.query,
            headers=headers,
            content=body,
        )
        try:
            response = await self._client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            # The CLI reports this as an upstream failure; the job fails with a 502, not a hang.
            done()
            return _error(502, "api_error", type(exc).__name__)
        returned = {k: v for k, v in response.headers.items() if k not in _HOP_BY_HOP}

        async def closed() -> None:
            await response.aclose()
            done()

        return StreamingResponse(
            response.aiter_raw(),
            status_code=response.status_code,
            headers=returned,
            background=BackgroundTask(closed),
        )

    def start(self, socket: Path) -> None:
        """Serves, and on the Unix socket `socket` (with `MAX_CONNECTIONS`) the CLIs that run
        without a sandbox; the job user may connect to every socket (its token is what counts)."""

        logging.getLogger("uvicorn.error").addFilter(_UpstreamCuts())  # only the proxy serves HTTP here

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            # Upstream connections unlimited here: each door bounds its own (DOOR_CONNECTIONS). Four
            # jobs' doors had used httpx's 100 and held up every other job's calls (an outside probe).
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=DOOR_CONNECTIONS)
            timeout = httpx.Timeout(600, connect=10)
            async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
                self._client = client
                self._loop = asyncio.get_running_loop()
                yield

        # Every method reaches `_forward`, so what it refuses gets the Messages API's error shape.
        methods = ["GET", "POST", "HEAD", "DELETE", "PUT", "PATCH"]
        app = Starlette(routes=[Route("/{path:path}", self._forward, methods=methods)], lifespan=lifespan)
        config = uvicorn.Config(
            app,
            log_level="warning",
            log_config=None,  # through the worker's own handler and format (shared/logs.py)
            access_log=False,
        )
        server = self._server = uvicorn.Server(config)
        # No socket of uvicorn's own: every one is a door, with its own limit.
        threading.Thread(target=lambda: server.run(sockets=[]), name="credential-proxy", daemon=True).start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the credential proxy did not start")
            time.sleep(0.01)
        self._unsandboxed = self._listen(socket, MAX_CONNECTIONS)  # held: a listener is closed once collected
        self.socket = socket

    @contextmanager
    def door(self, path: Path) -> Iterator[Path]:
        """Serves on the Unix socket `path` while in use, with at most `DOOR_CONNECTIONS` at once
        through it: one sandbox's own, where its job holds no other job's connections."""
        listener = self._listen(path, DOOR_CONNECTIONS)
        try:
            yield path
        finally:
            listener.get_loop().call_soon_threadsafe(listener.close)
            path.unlink(missing_ok=True)

    def _listen(self, path: Path, limit: int) -> asyncio.Server:
        """A listener on the Unix socket `path` (which the job user may connect to) that holds at
        most `limit` connections at once."""
        server, loop = self._server, self._loop
        assert server is not None, "start the proxy first"
        assert loop is not None
        door = _Door(limit)

        def connection() -> _Connection:
            state, app_state = server.server_state, server.lifespan.state
            return _Connection(door, config=server.config, server_state=state, app_state=app_state)

        listener = asyncio.run_coroutine_threadsafe(loop.create_unix_server(connection, str(path)), loop)
        listening = listener.result(timeout=10)
        path.chmod(0o666)
        return listening


@dataclass
class _Door:
    """One listener's connections and what their requests' bodies hold."""

    limit: int
    """Connections at once."""
    held: set["_Connection"] = field(default_factory=set)
    body_bytes: int = 0
    """Of the bodies read or being read, and not answered yet (`DOOR_BODY_BYTES` at most)."""

    def release(self, size: int) -> None:
        self.body_bytes -= size


class _Connection(BoundedHead):
    """uvicorn's HTTP protocol (a request's head bounded in size and time), counted against its
    door's limit and known to its requests (`request.state.door`)."""

    max_message_bytes = MAX_BODY_BYTES + 2 * MAX_HEAD_BYTES

    def __init__(self, door: _Door, **protocol: Any) -> None:
        super().__init__(**protocol)
        self._door = door

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._door.held.add(self)
        if len(self._door.held) > self._door.limit:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._door.held.discard(self)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["state"]["door"] = self._door


def _error(status: int, kind: str, message: str) -> JSONResponse:
    """An error in the Messages API's shape, which the CLI reports as the API's own."""
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)


async def _bounded_body(request: Request, door: "_Door") -> bytes | Response:
    """The request's body, counted against its door (kept counted: `_Door.release` it), or the
    error that refused it: over `MAX_BODY_BYTES`, over the door's `DOOR_BODY_BYTES`, or not whole
    within `BODY_TIMEOUT_S` (read no further)."""
    too_large = f"a request body is at most {MAX_BODY_BYTES} bytes"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return _error(413, "request_too_large", too_large)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                door.body_bytes += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise _Refused(
                        413, "request_too_large", f"a request body is at most {MAX_BODY_BYTES} bytes"
                    )
                if door.body_bytes > DOOR_BODY_BYTES:
                    message = f"this sandbox's requests hold {DOOR_BODY_BYTES} bytes at most at once"
                    raise _Refused(413, "request_too_large", message)
                chunks.append(chunk)
    except _Refused as refused:
        door.release(size)
        return _error(*refused.args)
    except TimeoutError:
        door.release(size)
        return _error(408, "timeout_error", f"the request's body was not whole within {BODY_TIMEOUT_S} s")
    except BaseException:
        door.release(size)
        raise
    return b"".join(chunks)


class _Refused(Exception):
    """A body refused while it is read: (status, error type, message)."""


async def _warm_up_reply(request: Request) -> Response:
    """What a warming CLI gets instead of the model API: a streamed message that says "ok" and
    uses no tokens (so the CLI counts no cost for it); any other request is refused."""
    if request.method != "POST" or not request.url.path.endswith("/v1/messages"):
        return _error(404, "not_found_error", "not while warming up")
    door: _Door = request.state.door
    body = await _bounded_body(request, door)
    if isinstance(body, Response):
        return body
    door.release(len(body))
    try:
        model = str(json.loads(body or b"{}").get("model", ""))
    except (ValueError, AttributeError):
        model = ""
    return StreamingResponse(_empty_message(model), media_type="text/event-stream")


def _empty_message(model: str) -> Iterator[bytes]:
    usage = {"input_tokens": 0, "output_tokens": 0}
    message: dict[str, Any] = {
        "id": f"msg_warm_up_{secrets.token_hex(8)}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": usage,
        },
        {"type": "message_stop"},
    ]
    for event in events:
        yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
