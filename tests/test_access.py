"""Access control and quotas on real processes: keys (configured and managed through the CLI),
rate limits shared by two API processes on one Redis, concurrent-job slots, request hygiene."""

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from tests.conftest import ROOT, Gateway, assert_schema, chat, sse_data

CONFIGURED_KEY = "configured-key-for-tests"


def script(**spec: Any) -> str:
    return "script:" + json.dumps(spec)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def keys_cli(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": gateway.redis_url}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "keys", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def new_key(gateway: Gateway, name: str = "test", *flags: str) -> tuple[str, str]:
    created = keys_cli(gateway, "create", "--name", name, *flags)
    assert created.returncode == 0, created.stderr
    key_id, secret = created.stdout.strip().split("\t")
    return key_id, secret


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert_schema(response.json(), "ErrorResponse")
    assert response.json()["error"]["code"] == code
    assert "Traceback" not in response.text


@pytest.fixture(scope="module")
def guarded(start_gateway: Any) -> Gateway:
    gateway: Gateway = start_gateway(
        workers=2,
        BACKEND="scripted",
        API_KEY=CONFIGURED_KEY,
        RATE_LIMIT_ENABLED="true",
        RATE_LIMIT_CHAT_PER_MINUTE="6",
        RATE_LIMIT_PER_MINUTE="10",
        RATE_LIMIT_AUTH_PER_MINUTE="20",
        MAX_CONCURRENT_JOBS_PER_KEY="2",
        MAX_MESSAGES="5",
        MAX_PROMPT_CHARS="1000",
    )
    return gateway


@pytest.fixture(scope="module")
def second_api(guarded: Gateway) -> Iterator[Gateway]:
    """Another API process on the same Redis database: a second replica."""
    replica = Gateway(redis_url=guarded.redis_url, env=guarded.env, logs=guarded.logs)
    replica.start_api()
    yield replica
    replica.stop()


def test_health_stays_open(guarded: Gateway) -> None:
    # The landing page's links open in a browser, which sends no key (found by an outside probe).
    for path in ("/", "/docs", "/openapi.json"):
        assert httpx.get(f"{guarded.url}{path}").status_code == 200, path
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    assert httpx.head(f"{guarded.url}/health").status_code == 200  # some load balancers probe so


def test_missing_or_wrong_key_is_refused(guarded: Gateway) -> None:
    models = f"{guarded.url}/v1/models"
    missing = httpx.get(models)
    assert_error(missing, 401, "invalid_api_key")
    assert "Missing API key" in missing.json()["error"]["message"]
    # An Anthropic client is told the header it sends (it was told only of Authorization).
    anthropic_missing = httpx.post(f"{guarded.url}/v1/messages", json={})
    assert anthropic_missing.status_code == 401
    assert "'x-api-key: <key>'" in anthropic_missing.json()["error"]["message"]
    assert_error(httpx.get(models, headers=bearer("not-a-key")), 401, "invalid_api_key")
    assert_error(httpx.post(f"{guarded.url}/v1/chat/completions", json=chat("hi")), 401, "invalid_api_key")
    assert httpx.get(models, headers=bearer(CONFIGURED_KEY)).status_code == 200
    assert httpx.get(models, headers={"x-api-key": CONFIGURED_KEY}).status_code == 200
    # Two different keys (found by a hostile-caller probe: the first of two Authorization lines
    # was taken, whatever the second said): neither is taken. The same key twice is one key.
    ambiguous = [
        [("authorization", f"Bearer {CONFIGURED_KEY}"), ("authorization", "Bearer not-a-key")],
        [("authorization", "Bearer not-a-key"), ("authorization", f"Bearer {CONFIGURED_KEY}")],
        [("authorization", f"Bearer {CONFIGURED_KEY}"), ("x-api-key", "not-a-key")],
        [("authorization", f"Bearer\t{CONFIGURED_KEY}"), ("x-api-key", "not-a-key")],  # a re-check probe
    ]
    for headers in ambiguous:
        refused = httpx.get(models, headers=headers)
        assert_error(refused, 401, "invalid_api_key")
        assert "more than one API key" in refused.json()["error"]["message"]
    same = [("authorization", f"Bearer {CONFIGURED_KEY}"), ("x-api-key", CONFIGURED_KEY)]
    assert httpx.get(models, headers=same).status_code == 200
    empty_line = [("authorization", ""), ("x-api-key", CONFIGURED_KEY)]
    assert httpx.get(models, headers=empty_line).status_code == 200


def test_service_wide_views_need_an_operator_key_and_ready_needs_none(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", API_KEY=CONFIGURED_KEY)
    _, caller = new_key(gateway, "a tenant")
    operator_id, operator = new_key(gateway, "on call", "--operator")
    assert httpx.get(f"{gateway.url}/ready").json() == {"status": "ready"}  # load balancers send no key
    for view in ("/status", "/metrics"):
        url = f"{gateway.url}{view}"
        assert_error(httpx.get(url, headers=bearer(caller)), 403, "operator_key_required")
        assert_error(httpx.get(url), 401, "invalid_api_key")
        assert httpx.get(url, headers=bearer(operator)).status_code == 200
        assert httpx.get(url, headers=bearer(CONFIGURED_KEY)).status_code == 200
    assert httpx.get(f"{gateway.url}/v1/models", headers=bearer(caller)).status_code == 200
    listed = [line.split("\t") for line in keys_cli(gateway, "list").stdout.splitlines()]
    roles = {fields[0]: fields[2] for fields in listed}
    assert roles[operator_id] == "operator"
    assert sorted(roles.values()) == ["caller", "operator"]


def test_managed_key_works_on_every_replica_until_revoked(guarded: Gateway, second_api: Gateway) -> None:
    key_id, secret = new_key(guarded, "ci")
    for api in (guarded, second_api):
        assert httpx.get(f"{api.url}/v1/models", headers=bearer(secret)).status_code == 200
    listed = keys_cli(guarded, "list")
    assert key_id in listed.stdout
    assert secret not in listed.stdout
    # Only a hash is stored: the secret appears nowhere in Redis.
    redis = guarded.redis()
    for name in redis.scan_iter("*"):
        if redis.type(name) == b"hash":
            assert secret.encode() not in b"".join(b"".join(pair) for pair in redis.hgetall(name).items())
    # Its unfinished jobs stop with it: they ran on the operator's model API credential.
    slow = chat("script:" + json.dumps({"text": "never", "wait_ms": 20_000}), background=True)
    url = f"{guarded.url}/v1/chat/completions"
    jobs = [httpx.post(url, json=slow, headers=bearer(secret), timeout=10).json()["id"] for _ in range(2)]
    revoked = keys_cli(guarded, "revoke", key_id)
    assert revoked.returncode == 0
    assert "cancelled its 2 unfinished job(s)" in revoked.stderr
    deadline = time.monotonic() + 10
    ended = [None]
    while time.monotonic() < deadline:
        ended = [redis.hget(f"gateway:job:{job.removeprefix('chatcmpl-')}", "ended") for job in jobs]
        if all(ended):
            break
        time.sleep(0.1)
    assert ended == [b"cancelled", b"cancelled"]
    redis.close()
    for api in (guarded, second_api):
        assert_error(httpx.get(f"{api.url}/v1/models", headers=bearer(secret)), 401, "invalid_api_key")
    assert keys_cli(guarded, "revoke", key_id).returncode == 1
    # Secrets never reach the logs.
    for log in guarded.logs.glob("*.log"):
        assert secret not in log.read_text(errors="replace")
        assert CONFIGURED_KEY not in log.read_text(errors="replace")


def test_a_revoke_reaches_the_requests_its_key_let_in_before(guarded: Gateway) -> None:
    """Found by an outside probe: a request the key had let in, whose body came after the revoke,
    ran its agent to the end (200); and the key's running stream was told only that it was
    cancelled, not why. On every front end that queues a job."""
    key_id, secret = new_key(guarded, "leaked")
    url = f"{guarded.url}/v1/chat/completions"
    slow = chat(script(text="w ", tokens=400, delay_ms=25), stream=True)
    bodies = {
        "/v1/chat/completions": chat("hi"),
        "/v1/responses": {"model": "claude-sonnet-4-5", "input": "hi"},
        "/v1/messages": {**chat("hi"), "max_tokens": 10},
    }
    with contextlib.ExitStack() as held_open:
        streamed = held_open.enter_context(
            httpx.stream("POST", url, json=slow, headers=bearer(secret), timeout=30)
        )
        lines = streamed.iter_lines()
        assert any(line.startswith("data: ") for line in lines)
        held = {}
        for path, sent in bodies.items():
            body = json.dumps(sent).encode()
            head = (
                f"POST {path} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {secret}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
            ).encode()
            connection = held_open.enter_context(
                socket.create_connection(("127.0.0.1", guarded.port), timeout=30)
            )
            connection.sendall(head + body[:5])  # let in: its access check runs on the head
            held[path] = (connection, body)
        time.sleep(0.5)
        assert keys_cli(guarded, "revoke", key_id).returncode == 0
        answers = {}
        for path, (connection, body) in held.items():
            connection.sendall(body[5:])
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
            answers[path] = answer
        data = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: {")]
    for path, answer in answers.items():
        assert answer.startswith(b"HTTP/1.1 401"), (path, answer[:300])
        refusal = json.loads(answer.partition(b"\r\n\r\n")[2])
        if path == "/v1/messages":  # Anthropic's shape
            assert refusal["type"] == "error", refusal
            assert "revoked" in refusal["error"]["message"]
        else:
            assert_schema(refusal, "ErrorResponse")
            assert refusal["error"]["code"] == "invalid_api_key"
            assert "revoked" in refusal["error"]["message"]
    assert data[-1]["error"]["message"] == "The API key that started this job was revoked."
    redis = guarded.redis()
    try:
        records = [name for name in redis.scan_iter("gateway:job:*") if name.count(b":") == 2]
        owned = [name for name in records if redis.hget(name, "owner") == key_id.encode()]
    finally:
        redis.close()
    assert len(owned) == 1  # the stream's: the requests let in queued none


def test_only_http_whitespace_separates_a_key(guarded: Gateway) -> None:
    """Found by an outside probe: NBSP and NEL around a key were taken as spaces (Python's), which
    a proxy in front would not: the two would disagree about which key a request presents."""
    models = f"{guarded.url}/v1/models"
    key = CONFIGURED_KEY.encode()
    for name, value in [
        ("authorization", b"Bearer\xa0" + key),
        ("authorization", b"Bearer \x85" + key),
        ("x-api-key", b"\xa0" + key + b"\xa0"),
    ]:
        assert_error(httpx.get(models, headers=[(name.encode(), value)]), 401, "invalid_api_key")
    assert httpx.get(models, headers=[(b"authorization", b"Bearer \t " + key)]).status_code == 200


def test_a_managed_key_is_its_own_caller_on_every_entry_point(guarded: Gateway) -> None:
    """With rate limits on (the default), the admission's one round trip recognises a managed key:
    its role, and its jobs, on chat (streamed), Responses and Messages."""
    _, tenant = new_key(guarded, "tenant")
    _, other = new_key(guarded, "other")
    _, operator = new_key(guarded, "on call", "--operator")
    assert_error(httpx.get(f"{guarded.url}/status", headers=bearer(tenant)), 403, "operator_key_required")
    assert httpx.get(f"{guarded.url}/status", headers=bearer(operator)).status_code == 200
    streamed = httpx.post(
        f"{guarded.url}/v1/chat/completions", json=chat("hi", stream=True), headers=bearer(tenant), timeout=30
    )
    assert streamed.status_code == 200
    assert sse_data(streamed)[-1] == "[DONE]"
    created = httpx.post(
        f"{guarded.url}/v1/responses",
        json={"model": "claude-sonnet-4-5", "input": "hi"},
        headers=bearer(tenant),
        timeout=30,
    )
    assert created.status_code == 200, created.text
    response_url = f"{guarded.url}/v1/responses/{created.json()['id']}"
    assert_error(httpx.get(response_url, headers=bearer(other), timeout=10), 404, "not_found")
    assert httpx.get(response_url, headers=bearer(tenant), timeout=10).status_code == 200
    message = httpx.post(
        f"{guarded.url}/v1/messages",
        json={"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": chat("hi")["messages"]},
        headers={"x-api-key": tenant, "anthropic-version": "2023-06-01"},
        timeout=30,
    )
    assert message.status_code == 200, message.text
    assert message.headers["x-ratelimit-remaining-requests"] == "3"  # its own chat budget of 6


_JOB_ROUTES = {
    "/v1/chat/completions": chat("hi"),
    "/v1/responses": {"model": "claude-sonnet-4-5", "input": "hi"},
    "/v1/messages": {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": chat("hi")["messages"]},
}


def _error_code(response: httpx.Response) -> str:
    """The error's code, in OpenAI's shape, or its type in Anthropic's (`/v1/messages`)."""
    error = response.json()["error"]
    if response.url.path == "/v1/messages":
        assert response.json()["type"] == "error", response.text
        return str(error["type"])
    assert_schema(response.json(), "ErrorResponse")
    return str(error["code"])


def _job_records(redis: Redis) -> int:
    """How many jobs were created (a record lives an hour; its slot and events have keys of their own)."""
    return sum(1 for key in redis.scan_iter("gateway:job:*") if key.count(b":") == 2)


def test_a_job_route_decides_access_before_it_reads_the_body(guarded: Gateway) -> None:
    """The access check comes before the body: its refusal comes first (401 and 429 before 400),
    in each API's shape, and nothing is queued for a refused caller, on chat, Responses and
    Messages alike."""
    redis = Redis.from_url(guarded.redis_url)
    _, secret = new_key(guarded, "spent")
    try:
        for path in _JOB_ROUTES:
            unknown = httpx.post(f"{guarded.url}{path}", json={"model": 7}, headers=bearer("not-a-key"))
            assert unknown.status_code == 401, unknown.text
            assert _error_code(unknown) in ("invalid_api_key", "authentication_error")
        for _ in range(6):  # the key's chat budget
            spent = httpx.post(
                f"{guarded.url}/v1/chat/completions", json=chat("hi"), headers=bearer(secret), timeout=30
            )
            assert spent.status_code == 200, spent.text
        jobs = _job_records(redis)
        for path, body in _JOB_ROUTES.items():
            for sent in (body, {"model": 7}):
                refused = httpx.post(f"{guarded.url}{path}", json=sent, headers=bearer(secret), timeout=30)
                assert refused.status_code == 429, refused.text
                assert _error_code(refused) in ("rate_limit_exceeded", "rate_limit_error")
                assert refused.headers["x-request-id"]
        assert _job_records(redis) == jobs
    finally:
        redis.close()


def test_a_refused_caller_is_answered_without_its_upload_being_read(guarded: Gateway) -> None:
    """A caller without a key gets its 401 while the rest of its upload is still to come: the
    body of a refused request is never waited for."""
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            b'transfer-encoding: chunked\r\n\r\n6\r\n{"a": \r\n'
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def _chat_rejections(api: Gateway) -> float:
    """The API process's count of chat requests refused for the rate limit."""
    metrics = httpx.get(f"{api.url}/metrics", headers=bearer(CONFIGURED_KEY), timeout=10).text
    prefix = 'gateway_rate_limit_rejections_total{limit="chat"} '
    return sum(float(line.removeprefix(prefix)) for line in metrics.splitlines() if line.startswith(prefix))


def test_two_replicas_share_one_rate_limit_exactly(guarded: Gateway, second_api: Gateway) -> None:
    _, secret = new_key(guarded)
    _, other = new_key(guarded)
    remaining = []
    for i in range(6):
        api = (guarded, second_api)[i % 2]
        response = httpx.post(
            f"{api.url}/v1/chat/completions", json=chat("hi"), headers=bearer(secret), timeout=30
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-limit-requests"] == "6"
        remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [5, 4, 3, 2, 1, 0]
    rejected_before = _chat_rejections(second_api)
    refused = httpx.post(
        f"{second_api.url}/v1/chat/completions", json=chat("hi"), headers=bearer(secret), timeout=30
    )
    assert_error(refused, 429, "rate_limit_exceeded")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert 0 < int(refused.headers["retry-after-ms"]) <= 60_000
    assert "x-should-retry" not in refused.headers  # a wait the SDKs honour, then retry
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-request-id"]
    assert _chat_rejections(second_api) == rejected_before + 1  # never counted: an outside probe
    # Per key: another key has its own budget. Per endpoint class: other endpoints still answer.
    ok = httpx.post(f"{guarded.url}/v1/chat/completions", json=chat("hi"), headers=bearer(other), timeout=30)
    assert ok.status_code == 200
    assert httpx.get(f"{guarded.url}/v1/models", headers=bearer(secret)).status_code == 200


async def test_a_concurrent_burst_never_exceeds_the_limit(guarded: Gateway, second_api: Gateway) -> None:
    _, secret = new_key(guarded)
    async with httpx.AsyncClient(headers=bearer(secret), timeout=30) as client:
        responses = await asyncio.gather(
            *(client.get(f"{(guarded, second_api)[i % 2].url}/v1/models") for i in range(40))
        )
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 10 + [429] * 30


def test_concurrent_jobs_per_key_are_capped_and_always_released(guarded: Gateway) -> None:
    key_id, secret = new_key(guarded)
    url = f"{guarded.url}/v1/chat/completions"
    slow = chat(script(text="tick ", tokens=100, delay_ms=50), stream=True)  # 5 s: outlasts a loaded moment
    started = threading.Barrier(3)
    outcomes: list[int] = []

    def stream(disconnect: bool) -> None:
        with httpx.stream("POST", url, json=slow, headers=bearer(secret), timeout=30) as response:
            outcomes.append(response.status_code)
            lines = response.iter_lines()
            next(lines)
            started.wait(timeout=20)
            if disconnect:
                return  # the client leaves; its job runs on and keeps its slot
            for _ in lines:
                pass

    threads = [threading.Thread(target=stream, args=(leave,)) for leave in (True, False)]
    for thread in threads:
        thread.start()
    started.wait(timeout=20)
    third = httpx.post(url, json=chat("hi"), headers=bearer(secret), timeout=30)
    assert_error(third, 429, "concurrency_limit_exceeded")
    assert third.headers["retry-after"]
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes == [200, 200]
    redis = guarded.redis()
    slots = f"gateway:jobslots:{key_id}"
    deadline = time.monotonic() + 20  # both jobs end ~5 s after they started
    while redis.zcard(slots) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert redis.zcard(slots) == 0
    # A job that fails frees its slot too, and a finished job's slot is free for the next.
    failing = chat(script(text="x", fail_after=0))
    for _ in range(3):
        response = httpx.post(url, json=failing, headers=bearer(secret), timeout=30)
        assert response.status_code == 502
    assert redis.zcard(slots) == 0
    assert not list(redis.scan_iter("gateway:job:*:slot"))
    redis.close()


def test_more_choices_than_the_cap_is_a_400_and_queues_nothing(guarded: Gateway) -> None:
    """Found by an outside probe: `n` over the cap was a 429 to retry (it never succeeds), after
    jobs of it had been queued, pushed to workers and cancelled."""
    key_id, secret = new_key(guarded)
    redis = guarded.redis()
    queued = redis.zcard("gateway:queue")
    over = httpx.post(
        f"{guarded.url}/v1/chat/completions", json=chat("hi", n=3), headers=bearer(secret), timeout=30
    )
    assert over.status_code == 400, over.text
    assert over.json()["error"]["param"] == "n"
    assert "at most 2" in over.json()["error"]["message"]
    assert redis.zcard("gateway:queue") == queued
    assert redis.zcard(f"gateway:jobslots:{key_id}") == 0
    redis.close()
    within = httpx.post(
        f"{guarded.url}/v1/chat/completions", json=chat("hi", n=2), headers=bearer(secret), timeout=30
    )
    assert within.status_code == 200, within.text
    assert len(within.json()["choices"]) == 2


def test_choices_that_do_not_all_fit_are_a_429_and_start_nothing(guarded: Gateway) -> None:
    """Found by an outside probe: `n` within the cap but above the free slots got its 429 after its
    first choice had been queued, pushed to a worker, started and cancelled (a CLI launched for
    nothing), and a burst of such requests held slots the caller's other requests were refused."""
    key_id, secret = new_key(guarded)
    url = f"{guarded.url}/v1/chat/completions"
    redis = guarded.redis()
    slow = chat(script(text="tick ", tokens=100, delay_ms=50), stream=True)  # 5 s
    with httpx.stream("POST", url, json=slow, headers=bearer(secret), timeout=30) as running:
        next(running.iter_lines())  # one of the key's two slots is taken
        jobs = sum(1 for key in redis.scan_iter("gateway:job:*") if key.count(b":") == 2)
        refused = httpx.post(url, json=chat("hi", n=2), headers=bearer(secret), timeout=30)
        assert_error(refused, 429, "concurrency_limit_exceeded")
        assert sum(1 for key in redis.scan_iter("gateway:job:*") if key.count(b":") == 2) == jobs
        assert redis.zcard(f"gateway:jobslots:{key_id}") == 1
        # The free slot still serves a request that fits.
        one = httpx.post(url, json=chat("hi"), headers=bearer(secret), timeout=30)
        assert one.status_code == 200, one.text
    redis.close()


def test_message_count_and_prompt_size_are_limited(guarded: Gateway) -> None:
    url = f"{guarded.url}/v1/chat/completions"
    many = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "x"}] * 6}
    assert_error(httpx.post(url, json=many, headers=bearer(CONFIGURED_KEY)), 400, "too_many_messages")
    long = chat("y" * 1001)
    assert_error(httpx.post(url, json=long, headers=bearer(CONFIGURED_KEY)), 400, "prompt_too_large")
    # The calls in the conversation and the caller's functions are sent to the model too: on every
    # front end (they were not counted: a caller could send ~10x the limit in call arguments).
    big = json.dumps({"x": "z" * 1001})
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": big}}
    function = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]
    described = {"type": "function", "function": {"name": "f", "description": "d" * 1001}}
    answered = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{**call, "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c" * 1001, "content": "ok"},  # an id, or a name, is prompt text
    ]
    legacy = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "n" * 1001, "content": "ok"},
    ]
    refused = [
        ("/v1/chat/completions", {"model": "claude-sonnet-4-5", "messages": answered, "tools": [function]}),
        (
            "/v1/chat/completions",
            {"model": "claude-sonnet-4-5", "messages": legacy, "functions": [function["function"]]},
        ),
        ("/v1/chat/completions", {"model": "claude-sonnet-4-5", "messages": turns, "tools": [function]}),
        ("/v1/chat/completions", chat("hi") | {"tools": [described]}),
        (
            "/v1/responses",
            {
                "model": "claude-sonnet-4-5",
                "input": [
                    {"role": "user", "content": "hi"},
                    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": big},
                    {"type": "function_call_output", "call_id": "c1", "output": "ok"},
                ],
                "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            },
        ),
    ]
    answer_only = [
        {"role": "user", "content": "hi"},
        {"type": "function_call_output", "call_id": "c" * 1001, "output": ""},
    ]
    refused.append(("/v1/responses", {"model": "claude-sonnet-4-5", "input": answer_only}))
    # Keys of their own: 6 requests a minute each, and the configured key's are the later tests'.
    own = [new_key(guarded, "prompt sizes")[1] for _ in range(2)]
    for i, (path, body) in enumerate(refused):
        response = httpx.post(f"{guarded.url}{path}", json=body, headers=bearer(own[i % 2]))
        assert_error(response, 400, "prompt_too_large")
    used = {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": "z" * 1001}}
    messages = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [used]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
        ],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
    }
    response = httpx.post(f"{guarded.url}/v1/messages", json=messages, headers=bearer(own[1]))
    assert response.status_code == 400, response.text
    assert "too long" in response.json()["error"]["message"]


def test_failed_authentications_are_throttled_per_address(guarded: Gateway) -> None:
    models = f"{guarded.url}/v1/models"
    statuses = [httpx.get(models, headers=bearer(f"guess-{i}")).status_code for i in range(21)]
    assert statuses[-1] == 429
    assert set(statuses) == {401, 429}
    # Throttled before the key is looked at: even the right key gets nowhere from this address.
    assert httpx.get(models, headers=bearer(CONFIGURED_KEY)).status_code == 429
    guarded.redis().delete("gateway:ratelimit:auth:addr:127.0.0.1")  # the later tests call from here too
    assert httpx.get(models, headers=bearer(CONFIGURED_KEY)).status_code == 200


@pytest.fixture(scope="module")
def behind_proxy(start_gateway: Any) -> Gateway:
    """No keys (loopback), one trusted proxy, tight anonymous limits, CORS for one origin."""
    gateway: Gateway = start_gateway(
        workers=1,
        BACKEND="scripted",
        RATE_LIMIT_ENABLED="true",
        RATE_LIMIT_PER_MINUTE="2",
        TRUSTED_PROXIES='["127.0.0.1/32"]',
        CORS_ORIGINS='["https://app.example"]',
    )
    return gateway


def test_anonymous_callers_are_limited_by_address_from_trusted_proxies_only(behind_proxy: Gateway) -> None:
    models = f"{behind_proxy.url}/v1/models"

    def status(forwarded: str) -> int:
        return httpx.get(models, headers={"x-forwarded-for": forwarded}).status_code

    assert [status("203.0.113.7"), status("203.0.113.7"), status("203.0.113.7")] == [200, 200, 429]
    # A client cannot escape by prepending addresses: the nearest untrusted hop is what counts.
    assert status("198.51.100.1, 203.0.113.7") == 429
    assert status("203.0.113.8") == 200


def test_cors_is_for_configured_origins_only_and_never_with_credentials(behind_proxy: Gateway) -> None:
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "authorization"}
    url = f"{behind_proxy.url}/v1/chat/completions"
    allowed = httpx.options(url, headers={"origin": "https://app.example", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-credentials" not in allowed.headers
    other = httpx.options(url, headers={"origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    # Refused in the API's error shape (it was plain text: an outside probe), Anthropic's on its path.
    assert_error(other, 400, "cors_not_allowed")
    assert "Disallowed CORS origin" in other.json()["error"]["message"]
    messages = httpx.options(
        f"{behind_proxy.url}/v1/messages", headers={"origin": "https://evil.example", **preflight}
    )
    assert (messages.status_code, messages.json()["type"]) == (400, "error")


def test_cors_is_off_by_default(guarded: Gateway) -> None:
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    response = httpx.options(f"{guarded.url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in response.headers


def test_sse_still_streams_through_the_access_layer(guarded: Gateway) -> None:
    response = httpx.post(
        f"{guarded.url}/v1/chat/completions",
        json=chat(script(text="a b"), stream=True),
        headers=bearer(CONFIGURED_KEY),
        timeout=30,
    )
    assert response.status_code == 200
    assert sse_data(response)[-1] == "[DONE]"


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def _upload(port: int, head: bytes, frames: Iterator[bytes]) -> bytes:
    """Sends a request as fast as the server takes it, while reading whatever it answers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    received: list[bytes] = []

    def read() -> None:
        try:
            while chunk := sock.recv(65536):
                received.append(chunk)
        except OSError:
            pass

    reader = threading.Thread(target=read)
    reader.start()
    try:
        sock.sendall(head)
        for frame in frames:
            sock.sendall(frame)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the server closed the connection: what it answered is in `received`
    reader.join(timeout=30)
    sock.close()
    return b"".join(received)


def test_a_100_mb_body_is_refused_without_the_api_growing_by_100_mb(behind_proxy: Gateway) -> None:
    api = behind_proxy.processes[-1]  # the API is started after its workers
    before = _peak_rss_kib(api.pid)
    mib = b"a" * (1 << 20)
    start = b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
    chunked = _upload(
        behind_proxy.port,
        start + b"transfer-encoding: chunked\r\n\r\n",
        (b"100000\r\n" + mib + b"\r\n" for _ in range(100)),
    )
    assert chunked.startswith(b"HTTP/1.1 413"), chunked[:200]
    declared = _upload(
        behind_proxy.port, start + b"content-length: 104857600\r\n\r\n", (mib for _ in range(100))
    )
    assert declared.startswith(b"HTTP/1.1 413"), declared[:200]
    grown_mib = (_peak_rss_kib(api.pid) - before) / 1024
    print(f"API peak RSS grew by {grown_mib:.1f} MiB")
    assert grown_mib < 50


def test_a_job_no_worker_starts_gives_its_slot_back(start_gateway: Any) -> None:
    idle: Gateway = start_gateway(
        workers=0, BACKEND="scripted", QUEUE_TIMEOUT_S="1", MAX_CONCURRENT_JOBS_PER_KEY="1"
    )
    for _ in range(2):  # the second would get 429 if the first had kept the only slot
        response = httpx.post(f"{idle.url}/v1/chat/completions", json=chat("hi"), timeout=30)
        assert_error(response, 503, "queue_timeout")
        # It waited QUEUE_TIMEOUT_S: an SDK's retry would wait as long again, at the line's end.
        assert response.headers["x-should-retry"] == "false"
    redis = idle.redis()
    assert not list(redis.scan_iter("gateway:jobslots:*"))
    assert not list(redis.scan_iter("gateway:job:*:slot"))
    redis.close()


def test_one_key_cannot_see_or_cancel_another_keys_jobs(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", API_KEYS="first-caller-key,other-caller-key"
    )
    body = chat("script:" + json.dumps({"text": "mine", "wait_ms": 300}), background=True)
    created = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=body, headers=bearer("first-caller-key"), timeout=10
    )
    assert created.status_code == 200
    job_url = f"{gateway.url}/v1/chat/completions/{created.json()['id']}"
    assert_error(httpx.get(job_url, headers=bearer("other-caller-key"), timeout=10), 404, "not_found")
    assert_error(
        httpx.get(f"{job_url}?stream=true", headers=bearer("other-caller-key"), timeout=10), 404, "not_found"
    )
    assert_error(
        httpx.post(f"{job_url}/cancel", headers=bearer("other-caller-key"), timeout=10), 404, "not_found"
    )
    assert_error(httpx.delete(job_url, headers=bearer("other-caller-key"), timeout=10), 404, "not_found")
    deadline = time.monotonic() + 10
    while (own := httpx.get(job_url, headers=bearer("first-caller-key"), timeout=10).json())[
        "status"
    ] != "completed":
        assert time.monotonic() < deadline, own
        time.sleep(0.1)
    assert own["choices"][0]["message"]["content"] == "mine"  # key B's cancel did nothing


def test_what_a_key_keeps_in_redis_is_bounded_per_key(start_gateway: Any) -> None:
    """Found by an outside probe: one key's Responses requests (4 MB each, kept for an hour) filled
    Redis for every key. What a key's jobs keep once answered (stored requests, events) counts
    against MAX_STORED_BYTES_PER_KEY: at it, that key's new jobs get a 429, on every front end,
    and no other key's do; deleting what it keeps frees the room."""
    gateway: Gateway = start_gateway(
        workers=1,
        BACKEND="scripted",
        API_KEYS="key-a-for-the-storage-test,key-b-for-the-storage-test",
        MAX_STORED_BYTES_PER_KEY="300000",
    )
    a, b = bearer("key-a-for-the-storage-test"), bearer("key-b-for-the-storage-test")
    responses, chats = f"{gateway.url}/v1/responses", f"{gateway.url}/v1/chat/completions"
    big = {"model": "claude-sonnet-4-5", "input": "x" * 200_000}
    stored = httpx.post(responses, json=big, headers=a, timeout=60)
    assert stored.status_code == 200, stored.text
    refused = httpx.post(responses, json=big, headers=a, timeout=60)  # 400 KB would not fit
    assert_error(refused, 429, "storage_limit_exceeded")
    assert 60 < int(refused.headers["retry-after"]) <= 4260  # the stored request expires by then
    # Longer than the SDKs wait: they would retry at once, twice, for nothing.
    assert refused.headers["x-should-retry"] == "false"
    assert httpx.post(responses, json=big, headers=b, timeout=60).status_code == 200
    # The key's jobs' output counts once they end: 260 KB of it puts the key at its limit.
    long_reply = httpx.post(
        chats, json=chat(script(text="abcdefghijklm ", tokens=20_000)), headers=a, timeout=60
    )
    assert long_reply.status_code == 200, long_reply.text
    assert_error(httpx.post(chats, json=chat("Hi"), headers=a, timeout=60), 429, "storage_limit_exceeded")
    message = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    anthropic = httpx.post(f"{gateway.url}/v1/messages", json=message, headers=a, timeout=60)
    assert anthropic.status_code == 429
    assert anthropic.json()["error"]["type"] == "rate_limit_error"
    for body in (chat("Hi", stream=True), chat("Hi", n=2)):  # a stream gets it before it begins
        assert_error(httpx.post(chats, json=body, headers=a, timeout=60), 429, "storage_limit_exceeded")
    background = {"model": "claude-sonnet-4-5", "input": "Hi", "background": True}
    assert_error(httpx.post(responses, json=background, headers=a, timeout=60), 429, "storage_limit_exceeded")
    # What it keeps stays its own to read: resuming a stream starts no job.
    resumed = httpx.get(
        f"{chats}/{long_reply.json()['id']}", params={"stream": "true"}, headers=a, timeout=60
    )
    assert resumed.status_code == 200, resumed.text
    assert sse_data(resumed)[-1] == "[DONE]"
    assert httpx.post(chats, json=chat("Hi"), headers=b, timeout=60).status_code == 200
    # Nothing of a refused request stays: its stored request and job never were.
    redis = gateway.redis()
    assert len(redis.keys("gateway:response:*")) == 2
    # Deleting what the key keeps gives it room again.
    assert httpx.delete(f"{responses}/{stored.json()['id']}", headers=a).status_code == 200
    assert httpx.delete(f"{chats}/{long_reply.json()['id']}", headers=a).status_code == 200
    assert httpx.post(chats, json=chat("Hi"), headers=a, timeout=60).status_code == 200


def test_sessions_repeats_and_stored_requests_count_as_they_should(start_gateway: Any) -> None:
    """Found by a re-check probe of the per-key bound: sessions' histories (each turn's whole
    prompt) were not counted, so one key's sessions of 3 MB turns filled Redis past its limit; a
    Responses request repeated with its Idempotency-Key was refused for room it would not take; a
    stored request outlived its job's record by 11 minutes, counted but neither readable nor
    deletable."""
    gateway: Gateway = start_gateway(
        workers=1,
        BACKEND="scripted",
        API_KEYS="key-a-for-the-sessions-test,key-b-for-the-sessions-test",
        MAX_STORED_BYTES_PER_KEY="500000",
    )
    a, b = bearer("key-a-for-the-sessions-test"), bearer("key-b-for-the-sessions-test")
    chats, responses = f"{gateway.url}/v1/chat/completions", f"{gateway.url}/v1/responses"

    def turn(session: str) -> httpx.Response:
        headers = {**a, "x-session-id": session}
        return httpx.post(chats, json=chat("h" * 200_000), headers=headers, timeout=60)

    for session in ("s-0", "s-1", "s-2"):  # the key's total is checked as each job is queued
        assert turn(session).status_code == 200
    assert_error(turn("s-3"), 429, "storage_limit_exceeded")  # 600 KB of histories kept
    assert httpx.delete(f"{gateway.url}/v1/sessions/s-0", headers=a).status_code == 200
    assert turn("s-3").status_code == 200
    # A repeat attaches to its earlier job and stores nothing: it is answered, not refused.
    body = {"model": "claude-sonnet-4-5", "input": "z" * 300_000}
    first = httpx.post(responses, json=body, headers={**b, "idempotency-key": "k-1"}, timeout=60)
    again = httpx.post(responses, json=body, headers={**b, "idempotency-key": "k-1"}, timeout=60)
    assert first.status_code == again.status_code == 200, again.text
    assert first.json()["id"] == again.json()["id"]
    # Once its job ended, the stored request expires with the job's record.
    job_id = first.json()["id"].removeprefix("resp_")
    redis = gateway.redis()
    assert 0 < redis.ttl(f"gateway:response:{job_id}") <= redis.ttl(f"gateway:job:{job_id}") + 1


def test_a_sessions_tool_configuration_counts_with_the_session(start_gateway: Any) -> None:
    """Found by an outside probe: a session's tool configuration (up to 20 KiB) was kept in its
    record but never counted: 100 sessions of one key held 2.6 MB that its limit did not see."""
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", API_KEYS="key-a-for-the-tools-test", MAX_STORED_BYTES_PER_KEY="200000"
    )
    a = bearer("key-a-for-the-tools-test")
    rules = [f"Bash({i:03d} {'x' * 180})" for i in range(90)]  # 17 KB of rules
    refusals = []
    for i in range(20):
        headers = {**a, "x-session-id": f"cfg-{i}"}
        turn = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), headers=headers, timeout=30)
        body = {"session_id": f"cfg-{i}", "disallowed_tools": rules}
        config = httpx.post(f"{gateway.url}/v1/tools/config", json=body, headers=a, timeout=10)
        refusals += [r for r in (turn, config) if r.status_code != 200]
        if refusals:
            break
    assert refusals, "20 sessions of 17 KB configurations were kept under a 200 KB limit"
    assert_error(refusals[0], 429, "storage_limit_exceeded")
    redis = gateway.redis()
    [ledger] = redis.keys("gateway:stored:*:bytes")  # the one key's
    assert 180_000 <= int(redis.hget(ledger, "total") or 0) <= 200_000 + 20_000
