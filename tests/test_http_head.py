"""The HTTP protocol every gateway server speaks (`shared/http_head.py`): on a transport that records
its writes, a response's head goes out with its first body, or alone once the app waits; on a
gateway's API, a client that stops reading is disconnected."""

import asyncio
import contextlib
import json
import socket
import time
from typing import Any

import httpx
import pytest
import uvicorn
from uvicorn.server import ServerState

from api.middleware import CALLER_RETRIEVALS
from shared.http_head import BoundedHead
from tests.conftest import Gateway, chat


class RecordedTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] == "/later":
        await asyncio.sleep(0.05)
    if scope["path"] == "/slow":  # longer than a head may take
        await asyncio.sleep(1.0)
    await send({"type": "http.response.body", "body": b"first", "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def writes_of(path: str) -> list[bytes]:
    config = uvicorn.Config(app, http=BoundedHead, lifespan="off", log_level="warning")
    config.load()
    transport = RecordedTransport()
    protocol = BoundedHead(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(transport)
    protocol.data_received(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())
    for _ in range(100):
        if transport.writes and transport.writes[-1].endswith(b"0\r\n\r\n"):
            break
        await asyncio.sleep(0.01)
    protocol.connection_lost(None)
    return transport.writes


async def test_a_responses_head_goes_out_with_its_first_body_in_one_write() -> None:
    head, end = await writes_of("/")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n5\r\nfirst\r\n")
    assert end == b"0\r\n\r\n"


async def test_a_head_whose_body_waits_goes_out_alone_at_once() -> None:
    head, first, end = await writes_of("/later")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\n\r\n")
    assert first == b"5\r\nfirst\r\n"
    assert end == b"0\r\n\r\n"


class Hurried(BoundedHead):
    head_timeout_s = 0.5


async def test_a_head_that_does_not_come_in_time_closes_its_connection() -> None:
    """Found by an outside probe: idle connections with no key, and ones that sent a head's first
    lines, held every file an API process could open; it answered no one."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(app, http=Hurried, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    while not server.started:
        await asyncio.sleep(0.01)

    async def exchange(*parts: bytes) -> bytes:
        """What the server sends until it closes, the parts sent 0.2 s apart."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for part in parts:
            try:
                writer.write(part)
                await writer.drain()
            except ConnectionError:
                break  # closed by the server
            await asyncio.sleep(0.2)
        answer = b""
        with contextlib.suppress(ConnectionError):  # reset while parts were still on their way
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                answer += chunk
        writer.close()
        return answer

    request = b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n"
    try:
        assert await exchange() == b""  # nothing sent: closed, nothing to answer
        overdue = await exchange(b"GET / HTTP/1.1\r\n", b"host: x\r\n")
        assert overdue.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), overdue
        assert json.loads(overdue.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
        # A response may take longer than a head; the next head on the connection gets its own time.
        kept_alive = await exchange(request, b"GET / HTTP/1.1\r\n")
        assert kept_alive.startswith(b"HTTP/1.1 200 OK\r\n"), kept_alive
        # After the response it came during, whole (a re-check probe's 408 cut a stream).
        assert kept_alive.index(b"5\r\nfirst\r\n0\r\n\r\nHTTP/1.1 408 Request Timeout\r\n"), kept_alive
        # Empty lines begin no request: they cannot keep a connection past the next head's time.
        # (Closed: it does not wait out `exchange`'s read timeout. Its answer may be lost with the
        # reset of a connection that still sends.)
        trickled = await exchange(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", *[b"\r\n"] * 6)
        assert trickled == b"" or trickled.startswith(b"HTTP/1.1 200 OK\r\n"), trickled
        # A pipelined request's head came with the first: its response is not cut at a head's time
        # (an outside probe's stream ended at 20 s).
        pipelined = await exchange(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n" + request)
        assert pipelined.count(b"5\r\nfirst\r\n0\r\n\r\n") == 2, pipelined
        # A HEAD answer that closes its connection goes out (an outside probe's HTTP/1.0 health
        # check, as HAProxy's, got nothing).
        for head in (b"HEAD / HTTP/1.0\r\n\r\n", b"HEAD / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"):
            answered = await exchange(head)
            assert answered.startswith(b"HTTP/1.1 200 OK\r\n"), (head, answered)
    finally:
        server.should_exit = True
        await serving


# A client that stops reading its response: the response waits in the API, and past
# `SEND_TIMEOUT_S` with under 32 KiB read the connection is dropped, on every route (a resumed
# stream, a retrieved completion); one that reads slowly but steadily gets all of it.

_WORD = "w" * 999 + " "
_TOKENS = 4000  # a 4 MB reply: far beyond what the sockets' buffers hold


@pytest.fixture(scope="module")
def impatient(start_gateway: Any) -> tuple[Gateway, str]:
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", SEND_TIMEOUT_S="2")
    content = "script:" + json.dumps({"text": _WORD, "tokens": _TOKENS})
    reply = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(content, store=True), timeout=60)
    assert reply.status_code == 200
    assert len(reply.content) > _TOKENS * 1000
    return gateway, reply.json()["id"]


def _requested(
    gateway: Gateway, path: str, *, window: int | None = None, method: str = "GET"
) -> socket.socket:
    """A connection that sent `method path` (reading through a `window` of that many bytes)."""
    connection = socket.socket()
    if window is not None:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
    connection.connect(("127.0.0.1", gateway.port))
    connection.sendall(f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 0\r\n\r\n".encode())
    connection.settimeout(10)
    return connection


def _read_all(connection: socket.socket, piece: int = 1 << 20, pause_s: float = 0.0) -> tuple[bytes, bool]:
    """What the connection received until it ended, and whether the server reset it."""
    received = bytearray()
    try:
        while data := connection.recv(piece):
            received += data
            time.sleep(pause_s)
    except ConnectionResetError:
        return bytes(received), True
    return bytes(received), False


@pytest.mark.parametrize("query", ["?stream=true", ""])
def test_a_client_that_stops_reading_is_disconnected(impatient: tuple[Gateway, str], query: str) -> None:
    gateway, completion_id = impatient
    with _requested(gateway, f"/v1/chat/completions/{completion_id}{query}", window=4096) as connection:
        time.sleep(5)  # reads nothing
        received, reset = _read_all(connection)
    assert reset
    assert len(received) < _TOKENS * 1000 / 2


def test_a_client_that_reads_slowly_gets_its_whole_response(impatient: tuple[Gateway, str]) -> None:
    gateway, completion_id = impatient
    with _requested(gateway, f"/v1/chat/completions/{completion_id}?stream=true") as connection:
        received, reset = _read_all(connection, piece=64 * 1024, pause_s=0.05)  # ~1 MiB/s
    assert not reset
    assert received.endswith(b"data: [DONE]\r\n\r\n\r\n0\r\n\r\n")
    assert _streamed_text(received) == _WORD * _TOKENS


def _streamed_text(response: bytes) -> str:
    """The text of a chat completion's chunks, from the raw response (chunked, server-sent events)."""
    body, rest = bytearray(), response.partition(b"\r\n\r\n")[2]
    while (size := int(rest.partition(b"\r\n")[0], 16)) > 0:
        start = rest.index(b"\r\n") + 2
        body += rest[start : start + size]
        rest = rest[start + size + 2 :]
    chunks = [line.removeprefix(b"data: ") for line in body.split(b"\r\n") if line.startswith(b"data: {")]
    return "".join(json.loads(chunk)["choices"][0]["delta"].get("content") or "" for chunk in chunks)


def test_a_caller_reads_a_bounded_number_of_jobs_at_once(impatient: tuple[Gateway, str]) -> None:
    """Found by an outside probe: one key held 353 retrievals of its large job, never read (2.9 GB
    of the API), and a re-check probe 100 cancels of it (each answers with the job). A body goes out
    in pieces as its client takes them, and a caller has at most `CALLER_RETRIEVALS` being sent at
    once per API process; the next waits its turn (429)."""
    gateway, completion_id = impatient
    content = "script:" + json.dumps({"text": _WORD, "tokens": _TOKENS})
    made = httpx.post(
        f"{gateway.url}/v1/responses", json={"model": "claude-sonnet-4-5", "input": content}, timeout=60
    )
    response_id = made.json()["id"]
    paths = [f"/v1/chat/completions/{completion_id}{query}" for query in ("", "?stream=true")]
    # Every way to read a job: a cancel answers with the whole job too (a re-check probe).
    reads = [
        ("GET", paths[0]),
        ("GET", paths[1]),
        ("POST", f"/v1/chat/completions/{completion_id}/cancel"),
        ("GET", f"/v1/responses/{response_id}"),
        ("GET", f"/v1/responses/{response_id}?stream=true"),
        ("POST", f"/v1/responses/{response_id}/cancel"),
    ]
    stalled = [
        _requested(gateway, path, window=4096, method=method)
        for method, path in (reads[n % len(reads)] for n in range(CALLER_RETRIEVALS))
    ]
    try:
        time.sleep(0.5)  # each has its first pieces, waiting in the sockets' buffers
        refused = httpx.get(f"{gateway.url}{paths[0]}", timeout=10)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_retrievals"
        assert refused.headers["retry-after"] == "1"
    finally:
        for connection in stalled:
            connection.close()
    deadline = time.monotonic() + 10
    while (again := httpx.get(f"{gateway.url}{paths[0]}", timeout=10)).status_code == 429:
        assert time.monotonic() < deadline, "the retrievals closed still count"
        time.sleep(0.1)
    assert again.status_code == 200
    assert again.json()["choices"][0]["message"]["content"] == _WORD * _TOKENS


def test_a_caller_has_a_bounded_number_of_answers_open_at_once(start_gateway: Any) -> None:
    """Found by an outside probe: answers to completion requests (not streamed) were bounded by
    nothing once their jobs had ended, and a key reading each slowly held gigabytes of the API.
    A caller has at most twice its concurrent jobs open at once, answers included."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", MAX_CONCURRENT_JOBS_PER_KEY="2")
    asked = chat("script:" + json.dumps({"text": _WORD, "tokens": _TOKENS}))
    bodies = {  # every front end's answer counts
        "/v1/chat/completions": asked,
        "/v1/responses": {"model": asked["model"], "input": asked["messages"][0]["content"]},
        "/v1/messages": {**asked, "max_tokens": 2 * _TOKENS},
    }
    unread = []
    try:
        for path, body in [*bodies.items(), next(iter(bodies.items()))]:
            encoded = json.dumps(body).encode()
            head = (
                b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n" % path.encode()
            )
            request = head + b"content-length: %d\r\n\r\n%s" % (len(encoded), encoded)
            connection = socket.socket()
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            connection.connect(("127.0.0.1", gateway.port))
            connection.sendall(request)
            unread.append(connection)
            time.sleep(1)  # its job ends: its slot is free, its answer waits on its client
        refused = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), timeout=10)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
    finally:
        for connection in unread:
            connection.close()
    deadline = time.monotonic() + 10
    while (
        again := httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), timeout=10)
    ).status_code == 429:
        assert time.monotonic() < deadline, "the answers closed still count"
        time.sleep(0.1)
    assert again.status_code == 200
