"""Access hardening on real processes: open mode never returns once a key existed, key guessing is
throttled before the key is looked at, configured keys have a minimum length, an open loopback
gateway answers only requests addressed to loopback, the dashboard page needs no key, callers see
no backend configuration, and resuming a job is not a new chat request."""

import contextlib
import gzip
import json
import os
import re
import socket
import subprocess
import sys
import time
from typing import Any
from unittest.mock import ANY

import httpx
import pytest

from tests.conftest import ROOT, Gateway, chat
from tests.test_access import assert_error, bearer, keys_cli, new_key

KEY = "hardening-configured-key"
PROJECT = "vertex-project-callers-must-not-see"


@pytest.fixture(scope="module")
def keyed(start_gateway: Any) -> Gateway:
    gateway: Gateway = start_gateway(
        workers=1,
        BACKEND="scripted",
        API_KEY=KEY,
        RATE_LIMIT_ENABLED="true",
        RATE_LIMIT_CHAT_PER_MINUTE="2",
        LOG_LEVEL="info",
        CLAUDE_AUTH_METHOD="vertex",
        ANTHROPIC_VERTEX_PROJECT_ID=PROJECT,
        CLOUD_ML_REGION="us-east5",
    )
    return gateway


def test_a_gateway_protected_by_managed_keys_stays_protected_when_they_are_gone(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(workers=0, BACKEND="scripted")
    models = f"{gateway.url}/v1/models"
    key_id, secret = new_key(gateway)
    assert httpx.get(models, headers=bearer(secret)).status_code == 200
    assert httpx.get(models).status_code == 401
    # The last key revoked, then the whole store flushed: never an anonymous operator.
    assert keys_cli(gateway, "revoke", key_id).returncode == 0
    # And a balancer is told that every request is refused (an outside probe saw `/ready` say ready).
    assert_error(httpx.get(f"{gateway.url}/ready"), 503, "access_control_unavailable")
    # Nor in an API process started after it (as `up` restarts one that died).
    restarted = Gateway(redis_url=gateway.redis_url, env=gateway.env, logs=gateway.logs)
    restarted.start_api()
    try:
        for api in (gateway, restarted):
            assert_error(httpx.get(f"{api.url}/v1/models"), 401, "invalid_api_key")
            assert_error(
                httpx.get(f"{api.url}/v1/models", headers=bearer(secret)), 503, "access_control_unavailable"
            )
            assert httpx.get(f"{api.url}/status").status_code == 401
    finally:
        restarted.stop()
    for _ in range(2):
        gone = httpx.get(models, headers=bearer(secret))
        assert_error(gone, 503, "access_control_unavailable")
        # Until an operator acts: the SDKs must not retry it (an outside probe saw them do so).
        assert gone.headers["x-should-retry"] == "false"
        assert_error(httpx.get(models, headers=bearer("sk-anything")), 503, "access_control_unavailable")
        assert_error(httpx.get(models), 401, "invalid_api_key")
        assert httpx.get(f"{gateway.url}/status").status_code in (401, 503)
        gateway.redis().flushdb()
    # A new key protects it again at once.
    _, fresh = new_key(gateway)
    assert httpx.get(models, headers=bearer(fresh)).status_code == 200
    assert_error(httpx.get(f"{gateway.url}/ready"), 503, "no_live_worker")  # keys no longer its problem


def test_only_keys_open_lets_a_gateway_that_had_keys_serve_without_one_again(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(workers=0, BACKEND="scripted")
    key_id, _ = new_key(gateway)
    assert_error(httpx.get(f"{gateway.url}/v1/models"), 401, "invalid_api_key")  # it has seen the key
    refused = keys_cli(gateway, "open")
    assert refused.returncode == 1
    assert "managed keys exist" in refused.stderr
    assert keys_cli(gateway, "revoke", key_id).returncode == 0
    assert keys_cli(gateway, "open").returncode == 0
    # The running process stays protected; one started from now on is open (on loopback).
    assert_error(httpx.get(f"{gateway.url}/v1/models"), 401, "invalid_api_key")
    opened = Gateway(redis_url=gateway.redis_url, env=gateway.env, logs=gateway.logs)
    opened.start_api()
    try:
        assert httpx.get(f"{opened.url}/v1/models").status_code == 200
    finally:
        opened.stop()


def test_a_throttled_address_gets_nowhere_even_with_the_right_key(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(
        workers=0, BACKEND="scripted", API_KEY=KEY, RATE_LIMIT_ENABLED="true", RATE_LIMIT_AUTH_PER_MINUTE="3"
    )
    models = f"{gateway.url}/v1/models"
    assert [httpx.get(models, headers=bearer(f"guess-{i}")).status_code for i in range(4)] == [401] * 3 + [
        429
    ]
    assert_error(httpx.get(models, headers=bearer(KEY)), 429, "rate_limit_exceeded")


def test_a_short_configured_key_is_refused_at_start() -> None:
    short = "tiny-secret-15c"
    env = {**os.environ, "API_KEY": short, "REDIS_URL": "redis://127.0.0.1:1/0"}
    started = subprocess.run(
        [sys.executable, "-m", "cli.main", "api"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert started.returncode != 0
    assert "at least 16 characters" in started.stderr
    assert short not in started.stdout + started.stderr


def test_an_open_gateway_answers_only_requests_addressed_to_loopback(scripted: Gateway) -> None:
    models = f"{scripted.url}/v1/models"
    for host in (
        "localhost",
        f"localhost:{scripted.port}",
        f"127.0.0.1:{scripted.port}",
        "[::1]:80",
        "LOCALHOST",
    ):
        assert httpx.get(models, headers={"host": host}).status_code == 200, host
    # An outside probe's `[::1].evil` and a second Host had passed as loopback.
    for host in ("attacker.example", f"attacker.example:{scripted.port}", "127.0.0.1.nip.io", "[::1].evil"):
        assert_error(httpx.get(models, headers={"host": host}), 403, "host_not_allowed")
        rebound = httpx.post(f"{scripted.url}/v1/chat/completions", json=chat("hi"), headers={"host": host})
        assert_error(rebound, 403, "host_not_allowed")
    two = b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\nhost: attacker.example\r\nconnection: close\r\n\r\n"
    assert _answer_to(scripted.url, two).startswith(b"HTTP/1.1 403 ")


def test_a_body_without_a_json_content_type_is_not_parsed(scripted: Gateway) -> None:
    """A browser sends `text/plain` (or no type) cross-site without a preflight: never a job."""
    body = b'{"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}'
    url = f"{scripted.url}/v1/chat/completions"
    for headers in ({"content-type": "text/plain"}, {}):
        response = httpx.post(url, content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert (
            "'Content-Type: application/json'" in response.json()["error"]["message"]
        )  # both ways (a probe)
    # A compressed body is refused as such: it was read as text, "not UTF-8" (a probe).
    packed = httpx.post(
        url,
        content=gzip.compress(body),
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert_error(packed, 415, "unsupported_content_encoding")
    # A trailing slash is no route (a probe: Starlette's redirect named http:// behind a TLS proxy).
    slashed = httpx.get(f"{scripted.url}/v1/models/")
    assert slashed.status_code == 404
    assert slashed.json()["error"]["message"] == "Invalid URL (GET /v1/models/)"
    assert httpx.post(url, content=body, headers={"content-type": "application/json"}).status_code == 200


def test_the_dashboard_page_needs_no_key_but_its_data_does(keyed: Gateway) -> None:
    page = httpx.get(f"{keyed.url}/dashboard")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert httpx.get(f"{keyed.url}/status").status_code == 401


def test_auth_status_details_are_for_operator_keys(keyed: Gateway) -> None:
    _, caller_key = new_key(keyed, "caller")
    url = f"{keyed.url}/v1/auth/status"
    operator = httpx.get(url, headers=bearer(KEY))
    assert operator.status_code == 200
    assert PROJECT in operator.text
    caller = httpx.get(url, headers=bearer(caller_key))
    assert caller.status_code == 200
    assert PROJECT not in caller.text
    assert "us-east5" not in caller.text
    summary = caller.json()["claude_code_auth"]
    assert summary["method"] == "vertex"
    assert summary["status"]["valid"] == operator.json()["claude_code_auth"]["status"]["valid"]


def test_resuming_and_polling_a_job_are_not_new_chat_requests(keyed: Gateway) -> None:
    url = f"{keyed.url}/v1/chat/completions"
    created = httpx.post(url, json=chat("hi"), headers=bearer(KEY), timeout=30)
    assert created.status_code == 200, created.text
    job = f"{url}/{created.json()['id']}"
    for _ in range(4):  # twice the chat limit
        assert httpx.get(f"{job}?stream=true", headers=bearer(KEY), timeout=30).status_code == 200
        assert httpx.get(job, headers=bearer(KEY), timeout=30).status_code == 200
    assert httpx.post(url, json=chat("again"), headers=bearer(KEY), timeout=30).status_code == 200
    assert_error(
        httpx.post(url, json=chat("third"), headers=bearer(KEY), timeout=30), 429, "rate_limit_exceeded"
    )


def test_a_decoded_path_cannot_forge_log_lines(keyed: Gateway) -> None:
    httpx.get(f"{keyed.url}/v1/models%0aFORGED%20line%0d%0a", headers=bearer(KEY))
    deadline = time.monotonic() + 10
    while "FORGED" not in (logged := "".join(path.read_text() for path in keyed.logs.glob("api-*.log"))):
        assert time.monotonic() < deadline, "the request was never logged"
        time.sleep(0.05)
    assert not [line for line in logged.splitlines() if line.startswith("FORGED")]


def _head_of(url: str, header_lines: int, line_bytes: int) -> bytes:
    """What the server at `url` answers a GET whose head has `header_lines` of `line_bytes` each,
    sent in pieces (b"" if it closed without an answer)."""
    host, _, port = url.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        with contextlib.suppress(OSError):  # closed part-way, as it should be
            connection.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n")
            for number in range(header_lines):
                connection.sendall(b"x-filler-%d: %s\r\n" % (number, b"a" * line_bytes))
            connection.sendall(b"\r\n")
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := connection.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.startswith(b"HTTP/1.1 200"):
                    break
        return answer


def test_a_request_head_of_any_size_is_refused_past_its_bound(scripted: Gateway) -> None:
    """Found by an outside probe: one connection with no key sending 1 MiB header lines grew an
    API process by a gigabyte (httptools keeps a head whole). A head over 64 KiB is a 431."""
    answer = _head_of(scripted.url, header_lines=64, line_bytes=16 * 1024)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_header_fields_too_large"
    assert _head_of(scripted.url, header_lines=4, line_bytes=8 * 1024).startswith(b"HTTP/1.1 200 ")


def _answer_to(url: str, request: bytes) -> bytes:
    """All the server at `url` answers `request`, sent at once, until it closes the connection."""
    host, _, port = url.removeprefix("http://").partition(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        with contextlib.suppress(OSError):
            while chunk := connection.recv(65536):
                answer += chunk
    return answer


def test_a_head_that_comes_in_one_read_is_bounded_too(scripted: Gateway) -> None:
    """Found by an outside probe: a head was counted only after the read it came in was parsed,
    so a 100 KB header sent at once (or 8,000 small ones) was taken."""
    for fillers in (
        [b"x-big: " + b"a" * 100_000],
        [b"x-%d: aaaaa" % n for n in range(8000)],
        [b"a:"] * 50_000,
    ):
        head = b"\r\n".join([b"GET /health HTTP/1.1", b"host: 127.0.0.1", *fillers]) + b"\r\n\r\n"
        answer = _answer_to(scripted.url, head)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert answer.count(b"HTTP/1.1") == 1, answer  # the request itself never ran


def test_a_request_that_is_not_http_gets_an_error_in_openais_shape(scripted: Gateway) -> None:
    """Found by an outside probe: what httptools cannot parse got uvicorn's plain-text 400."""
    for head in (
        b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-request-id: a\x7fb\r\n\r\n",
        b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nbad header: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 2\r\n"
        b"content-length: 3\r\n\r\n{}",
    ):
        answer = _answer_to(scripted.url, head)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b"content-type: application/json" in answer.partition(b"\r\n\r\n")[0]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "invalid_http"


def test_trailers_and_a_whole_request_are_bounded_too(keyed: Gateway) -> None:
    """Found by the next outside probe: after a chunked body, trailer lines without end were kept
    by an API process (500 MiB sent: 1.3 GB), from a client with no key, once its 401 was sent.
    Trailers past 64 KiB are refused as a head is, and so is a request past its size limit."""
    host, _, port = keyed.url.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
        )
        with contextlib.suppress(OSError):  # refused part-way, as it should be
            for number in range(2000):
                connection.sendall(b"x-trailer-%d: %s\r\n" % (number, b"a" * 100))
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := connection.recv(65536):
                answer += chunk
    assert b"HTTP/1.1 431 " in answer, answer[-300:]


def test_trailers_are_never_the_requests_headers(keyed: Gateway) -> None:
    """Found by an outside probe: uvicorn adds a chunked body's trailers to the request's headers,
    which the access check read (a trailer's X-Forwarded-For as the client's address, out of its
    failed attempts' count; its Authorization as a second key; its Host past the loopback check)."""
    request = (
        b"GET /v1/models HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer %s\r\n"
        b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n0\r\n"
        b"authorization: Bearer not-the-key\r\n\r\n"
    ) % KEY.encode()
    answer = _answer_to(keyed.url, request)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:400]


def test_a_refusal_by_the_servers_bounds_is_in_the_callers_shape(scripted: Gateway) -> None:
    """Found by an outside probe: what the server's bounds refuse (a head or a whole request too
    large) got OpenAI's shape on /v1/messages too, and no request id; and a re-check probe: a
    request line too long still did."""
    big = b"x-big: " + b"a" * 100_000
    query = b"?q=" + b"a" * 70_000  # a request line over the bound (a re-check probe's, refused in OpenAI's)
    for path, shape in (
        (b"/v1/messages", "anthropic"),
        (b"/v1/messages" + query, "anthropic"),
        (b"/v1/chat/completions", "openai"),
    ):
        answer = _answer_to(scripted.url, b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\n%s\r\n\r\n" % (path, big))
        head, _, content = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 "), answer[:300]
        assert re.search(rb"\r\nx-request-id: req_\w+", head), head
        error = json.loads(content)
        if shape == "anthropic":
            assert re.search(rb"\r\nrequest-id: req_\w+", head), head  # where its clients read it
            assert error == {"type": "error", "error": {"type": "invalid_request_error", "message": ANY}}
        else:
            assert error["error"]["code"] == "request_header_fields_too_large"


def _begun_body(url: str, declared: int, sent: int) -> socket.socket:
    """A connection whose request declared `declared` body bytes and sent `sent` of them."""
    host, _, port = url.removeprefix("http://").partition(":")
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (declared, b" " * sent)
    )
    return connection


def test_one_callers_bodies_in_flight_are_bounded(start_gateway: Any) -> None:
    """Found by an outside probe: one key held 120 bodies of 10 MiB begun and never finished, 1.2 GB
    of the API (rate limits count only starts). A caller's bodies arriving at once hold two of the
    size limit at most in one API process; the next is a 429."""
    gateway: Gateway = start_gateway(workers=0, BACKEND="scripted", MAX_REQUEST_BYTES="1048576")
    size = 1024 * 1024
    held = [_begun_body(gateway.url, size, size - 1) for _ in range(2)]
    try:
        time.sleep(0.5)  # read as far as they go
        with _begun_body(gateway.url, size, size - 1) as third:
            answer = third.recv(65536)  # its head: the rest may be lost to the connection's close
        assert answer.startswith(b"HTTP/1.1 429 "), answer[:200]
        assert b"retry-after: 1" in answer
    finally:
        for connection in held:
            connection.close()
    time.sleep(0.5)  # their bodies given up: the caller may send again
    with _begun_body(gateway.url, size, size - 1) as again:
        again.sendall(b" ")
        assert again.recv(65536).split(b" ")[1] != b"429"
