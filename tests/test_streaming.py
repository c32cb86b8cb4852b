"""The stream response itself: keep-alive pings through a silence, and ending open streams at shutdown."""

import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from sse_starlette import ServerSentEvent

from api.app import create_app
from api.core import relay
from api.core.streaming import joined
from cli.embedded_redis import free_port
from shared.settings import Settings
from tests.conftest import Gateway, chat, sse_data
from tests.test_durable_jobs import wait_for


def script(**spec: Any) -> str:
    return "script:" + json.dumps(spec)


@pytest.fixture
async def api_in_process(start_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """An API served in this process (so that `KEEP_ALIVE_S` can be shortened), with a scripted worker."""
    monkeypatch.setattr(relay, "KEEP_ALIVE_S", 0.3)
    workers: Gateway = start_gateway(workers=1, BACKEND="scripted")
    settings = Settings(rate_limit_enabled=False, max_concurrent_jobs_per_key=0, stream_commit_after_s=0.1)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, workers.redis_url), port=port, log_config=None)
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done()
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await serving


async def test_a_silent_job_gets_keep_alive_pings(api_in_process: str) -> None:
    url = f"{api_in_process}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=10) as client:
        body = chat(script(text="late", wait_ms=1500), stream=True)
        async with client.stream("POST", url, json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["x-accel-buffering"] == "no"
            lines = [line async for line in response.aiter_lines()]
        pings = [i for i, line in enumerate(lines) if line == ": ping"]
        text = next(i for i, line in enumerate(lines) if "late" in line)
        assert len(pings) >= 2, lines  # every 0.3 s of the 1.5 s silence
        assert pings[-1] < text, lines
        assert lines[-2:] == ["data: [DONE]", ""]

        # A reply collected whole is not bothered by the silence.
        answer = await client.post(url, json=chat(script(text="late too", wait_ms=1000)))
        assert answer.json()["choices"][0]["message"]["content"] == "late too"


async def test_the_openai_sdk_streams_through_keep_alive_pings(api_in_process: str) -> None:
    """Found by an outside probe: a ping ended as an event (a blank line after it) came out of the
    `openai` SDK's decoder as an event of no data under the last event's id, which it parsed as
    JSON: every Chat Completions or Responses stream silent for `KEEP_ALIVE_S` failed."""
    client = openai.AsyncOpenAI(base_url=f"{api_in_process}/v1", api_key="unused", max_retries=0)
    chunks = await client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": script(text="late", wait_ms=1500)}],
        stream=True,
    )
    assert (
        "".join([chunk.choices[0].delta.content or "" async for chunk in chunks if chunk.choices]) == "late"
    )
    events = await client.responses.create(
        model="claude-sonnet-4-5", input=script(text="late too", wait_ms=1500), stream=True
    )
    done = [event async for event in events if event.type == "response.completed"]
    assert [event.response.output_text for event in done] == ["late too"]


def test_requests_still_waiting_when_the_drain_ends_get_a_503_naming_their_job(start_gateway: Any) -> None:
    """Found by an outside probe: a request waiting for its job (not streamed) when the drain ran
    out got uvicorn's plain-text 500 and a traceback in the log; the SDKs retry a 500, which runs
    the agent again. A second before the drain's end it is answered a 503 that names its job and
    says not to retry, in its front end's shape. A stream still waiting for its first event is
    not held for the drain: it opens at once (its id in its first chunk) and is ended as open
    ones are (an outside probe)."""
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", DRAIN_TIMEOUT_S="2", STREAM_COMMIT_AFTER_S="30"
    )
    api = gateway.processes[-1]
    slow = script(text="after the drain", wait_ms=8000)
    asked = {
        "chat": ("/v1/chat/completions", chat(slow)),
        "chat stream": ("/v1/chat/completions", chat(slow, stream=True)),
        "messages": ("/v1/messages", {**chat(slow), "max_tokens": 100}),
    }
    answers: dict[str, httpx.Response] = {}

    def ask(name: str) -> None:
        path, body = asked[name]
        answers[name] = httpx.post(f"{gateway.url}{path}", json=body, timeout=30)

    threads = [threading.Thread(target=ask, args=(name,)) for name in asked]
    for thread in threads:
        thread.start()
    time.sleep(1)  # all three wait for their jobs
    api.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=20)
    streamed = answers.pop("chat stream")
    assert streamed.status_code == 200, streamed.text
    assert '"code":"server_shutting_down"' in streamed.text
    for name, answer in answers.items():
        assert answer.status_code == 503, (name, answer.text)
        assert answer.headers["x-should-retry"] == "false", name
        error = answer.json()["error"]
        assert "retrieve it by its id" in error["message"], name
    assert answers["chat"].json()["error"]["code"] == "server_shutting_down"
    assert answers["messages"].json()["type"] == "error"  # Anthropic's shape
    assert len(answers) == 2
    api.wait(timeout=5)
    assert not any("Traceback" in log.read_text() for log in gateway.logs.glob("api-*.log"))


def test_sigterm_ends_a_stream_still_waiting_for_its_first_event_at_once(start_gateway: Any) -> None:
    """Found by an outside probe: a stream whose job had said nothing yet held the shutdown until
    STREAM_COMMIT_AFTER_S; it opens then and is ended as the open ones are, resumable by its id."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", DRAIN_TIMEOUT_S="60")
    api, redis = gateway.processes[-1], gateway.redis()
    body = chat(script(text="late", wait_ms=8000), stream=True)
    threading.Timer(0.5, api.send_signal, [signal.SIGTERM]).start()
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=30) as response:
        said_yet = sum(redis.xlen(key) for key in redis.keys("gateway:job:*:events"))  # at its headers
        sent = [json.loads(data) for data in sse_data_of(response) if data != "[DONE]"]
    assert sent[0]["choices"][0]["delta"]["role"] == "assistant"  # its id, to resume by
    assert sent[-1]["error"]["code"] == "server_shutting_down"
    assert said_yet == 0  # before the job's first event


def test_a_stream_its_client_cannot_come_back_to_is_cancelled_at_shutdown(start_gateway: Any) -> None:
    """Found by an outside probe: with CANCEL_ON_DISCONNECT off (the default), a Messages stream
    (no ids to resume by; with a session too) and a stream of several choices were told at a
    shutdown to send the request again (or, for the choices, to resume, which replayed the first
    alone), and their jobs ran on: sent again, the agent ran twice, a session's turn kept twice."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", DRAIN_TIMEOUT_S="60", JOBS_PER_WORKER="4")
    api, redis = gateway.processes[-1], gateway.redis()
    slow = script(text="w ", tokens=200, delay_ms=40)
    asked = {
        "messages": ({**chat(slow, stream=True), "max_tokens": 1000}, {}),
        "messages in a session": ({**chat(slow, stream=True), "max_tokens": 1000}, {"x-session-id": "s-1"}),
        "choices": ({**chat(slow, stream=True), "n": 2}, {}),
    }
    paths = {
        "messages": "/v1/messages",
        "messages in a session": "/v1/messages",
        "choices": "/v1/chat/completions",
    }
    with contextlib.ExitStack() as open_streams:
        streams = {
            name: open_streams.enter_context(
                httpx.stream("POST", f"{gateway.url}{paths[name]}", json=body, headers=headers, timeout=30)
            )
            for name, (body, headers) in asked.items()
        }
        lines = {name: stream.iter_lines() for name, stream in streams.items()}
        for each in lines.values():
            next(line for line in each if line.startswith("data: "))  # flowing
        api.send_signal(signal.SIGTERM)
        ends = {name: [line for line in each if line.startswith("data: ")] for name, each in lines.items()}
    said = [json.loads(ends["choices"][-1][6:])["error"]["message"]]
    said += [
        json.loads(ends[name][-1][6:])["error"]["message"] for name in ("messages", "messages in a session")
    ]
    assert all("send the request again" in message for message in said), said
    api.wait(timeout=5)
    records = [key for key in redis.scan_iter("gateway:job:*") if b":" not in key[12:]]
    assert len(records) == 4
    for key in records:
        ended = wait_for(lambda key=key: redis.hget(key, "ended"), 10, "the job's end")
        assert ended == b"cancelled", key


def test_sigterm_ends_an_open_stream_at_once_and_the_job_goes_on(start_gateway: Any) -> None:
    """A shutdown does not wait `DRAIN_TIMEOUT_S` for open streams: they end at once with an error
    that says to resume them (the SDK raises it; a silent end looked complete), without `[DONE]`,
    and their jobs go on (even with CANCEL_ON_DISCONNECT), so a client resumes them. A Messages
    stream cannot be resumed: its job is cancelled, unless its request had an `Idempotency-Key`,
    whose request sent again follows the same job (an outside probe saw the agent run twice)."""
    gateway: Gateway = start_gateway(
        workers=1,
        BACKEND="scripted",
        DRAIN_TIMEOUT_S="60",
        STREAM_COMMIT_AFTER_S="0.1",
        CANCEL_ON_DISCONNECT="true",
    )
    api = gateway.processes[-1]
    body = chat(script(text="after the restart", wait_ms=6000), stream=True)
    # The Responses and Messages streams open beside it: each front end's error ends its own.
    messages = {**body, "max_tokens": 100}
    others = {
        "/v1/responses": (
            {"model": body["model"], "input": body["messages"][0]["content"], "stream": True},
            {},
        ),
        "/v1/messages": (messages, {}),
        "/v1/messages again": (messages, {"idempotency-key": "the-same-request"}),
    }
    with contextlib.ExitStack() as open_streams:
        beside = {
            name: open_streams.enter_context(
                httpx.stream("POST", f"{gateway.url}{name.split()[0]}", json=json_body, headers=headers)
            )
            for name, (json_body, headers) in others.items()
        }
        response = open_streams.enter_context(
            httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=30)
        )
        lines = response.iter_lines()
        opening = json.loads(
            next(line for line in lines if line.startswith("data: "))[6:]
        )  # the role, at once
        api.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        rest = list(lines)
        ended_after_s = time.monotonic() - signalled
        sent = {path: [json.loads(data) for data in sse_data_of(stream)] for path, stream in beside.items()}
        ends = {path: events[-2:] for path, events in sent.items()}
        last = {path: end[-1] for path, end in ends.items()}
    assert ended_after_s < 3, ended_after_s
    assert "data: [DONE]" not in rest
    [farewell] = [json.loads(line[6:]) for line in rest if line.startswith("data: ")]
    assert farewell["error"]["code"] == "server_shutting_down"
    assert "resume" in farewell["error"]["message"]
    assert (last["/v1/responses"]["type"], last["/v1/responses"]["code"]) == ("error", "server_shutting_down")
    # Its number is the last event's again, not the next event's (a resume after it lost that one).
    before, error = ends["/v1/responses"]
    assert error["sequence_number"] == before["sequence_number"]
    assert last["/v1/messages"]["type"] == "error"
    # A Messages stream has no event ids to resume by (it told its client to: an outside probe).
    said = last["/v1/messages"]["error"]["message"]
    assert said.endswith("cannot be resumed or retrieved: send the request again."), said
    api.wait(timeout=5)  # the process is gone too (by its re-raised SIGTERM, as uvicorn does)
    job_of = {
        path: events[0]["message"]["id"].removeprefix("msg_")
        for path, events in sent.items()
        if "messages" in path
    }
    redis = gateway.redis()
    ended = wait_for(lambda: redis.hget(f"gateway:job:{job_of['/v1/messages']}", "ended"), 10, "the cancel")
    assert ended == b"cancelled"
    assert redis.hget(f"gateway:job:{job_of['/v1/messages again']}", "ended") is None  # it goes on

    gateway.start_api()
    resumed = httpx.get(
        f"{gateway.url}/v1/chat/completions/{opening['id']}", params={"stream": "true"}, timeout=30
    )
    data = sse_data(resumed)
    assert data[-1] == "[DONE]"
    text = "".join(
        chunk["choices"][0]["delta"].get("content") or ""
        for chunk in map(json.loads, data[:-1])
        if chunk.get("choices")  # an error chunk has none
    )
    assert text == "after the restart"
    again = httpx.post(
        f"{gateway.url}/v1/messages",
        json=messages,
        headers={"idempotency-key": "the-same-request"},
        timeout=30,
    )
    followed = [json.loads(data) for data in sse_data(again)]
    assert followed[0]["message"]["id"] == "msg_" + job_of["/v1/messages again"]
    deltas = [event["delta"].get("text", "") for event in followed if event["type"] == "content_block_delta"]
    assert "".join(deltas) == "after the restart"


def sse_data_of(stream: httpx.Response) -> list[str]:
    """The `data:` payloads of an open SSE response, read to its end."""
    return [line[len("data: ") :] for line in stream.iter_lines() if line.startswith("data: ")]


def test_a_client_leaving_during_a_silence_cancels_its_job(start_gateway: Any) -> None:
    """With CANCEL_ON_DISCONNECT, a client that goes away while its job is silent (no event to
    send, so no write notices) has its job cancelled within a second or two; one that stays gets
    the whole stream."""
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", STREAM_COMMIT_AFTER_S="0.1", CANCEL_ON_DISCONNECT="true"
    )
    url = f"{gateway.url}/v1/chat/completions"
    body = chat(script(text="never sent", wait_ms=20_000), stream=True)
    with httpx.stream("POST", url, json=body, timeout=30) as response:
        opening = json.loads(next(line for line in response.iter_lines() if line.startswith("data: "))[6:])
    left = time.monotonic()
    status = None
    while time.monotonic() - left < 5:
        status = httpx.get(f"{url}/{opening['id']}", timeout=10).json().get("status")
        if status == "cancelled":
            break
        time.sleep(0.1)
    assert status == "cancelled"

    # A request sent again (its Idempotency-Key) follows the job: leaving, it cancels nothing while
    # the first client reads on (a re-check probe's re-send cancelled it).
    keyed = {"Idempotency-Key": "sent-twice"}
    twice = chat(script(text="read by the first", wait_ms=1500), stream=True)
    with httpx.stream("POST", url, json=twice, headers=keyed, timeout=30) as first:
        with httpx.stream("POST", url, json=twice, headers=keyed, timeout=30) as again:
            next(line for line in again.iter_lines() if line.startswith("data: "))
        said = [json.loads(line[6:]) for line in first.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in said) == "read by the first"

    stayed = httpx.post(url, json=chat(script(text="all of it", wait_ms=500), stream=True), timeout=30)
    data = sse_data(stayed)
    assert data[-1] == "[DONE]"
    text = "".join(json.loads(chunk)["choices"][0]["delta"].get("content") or "" for chunk in data[:-1])
    assert text == "all of it"

    # In the background, the request streams too (found by an outside probe: it answered the
    # queued job as JSON, and the SDK's stream ended with nothing), and a leaving client cancels nothing.
    background = chat(script(text="kept going", wait_ms=1500), stream=True, background=True)
    with httpx.stream("POST", url, json=background, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        opening = json.loads(next(line for line in response.iter_lines() if line.startswith("data: "))[6:])
    deadline = time.monotonic() + 15
    while (job := httpx.get(f"{url}/{opening['id']}", timeout=10).json())["status"] != "completed":
        assert job["status"] in ("queued", "in_progress"), job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["choices"][0]["message"]["content"] == "kept going"


def _body_messages(gateway: Gateway, path: str) -> list[bytes]:
    """The chunks of a chunked response, read off the socket: uvicorn sends each body message
    the app sends as one chunk."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while received := connection.recv(65536):
            raw += received
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    chunks = []
    while (size := int(body.partition(b"\r\n")[0], 16)) > 0:
        start = body.index(b"\r\n") + 2
        chunks.append(body[start : start + size])
        body = body[start + size + 2 :]
    return chunks


def test_a_resumed_stream_sends_what_is_stored_as_one_body_message(scripted: Gateway) -> None:
    """A finished job's events (about one per token here) are read together, so they go out
    together: one socket write and one wake-up of the client, not one per event (the opening goes
    first, before the read)."""
    body = chat(script(text="w ", tokens=40, delay_ms=1), background=True)
    job_id = httpx.post(f"{scripted.url}/v1/chat/completions", json=body, timeout=30).json()["id"]
    path = f"/v1/chat/completions/{job_id}"
    for _ in range(200):
        if httpx.get(f"{scripted.url}{path}", timeout=10).json()["status"] == "completed":
            break
        time.sleep(0.05)
    opening, stored = _body_messages(scripted, f"{path}?stream=true")
    assert json.loads(opening.decode().partition("data: ")[2])["choices"][0]["delta"]["role"] == "assistant"
    data = [line[6:] for line in stored.decode().splitlines() if line.startswith("data: ")]
    texts = [json.loads(item)["choices"][0]["delta"].get("content") for item in data[:-1]]
    assert "".join(text or "" for text in texts) == "w " * 40
    assert data[-1] == "[DONE]"


def test_events_are_encoded_byte_for_byte_as_sse_starlette_encodes_them() -> None:
    events = [
        ServerSentEvent('{"delta":{"content":"a\\nb ✓"}}', id="3"),
        ServerSentEvent('{"type":"response.created"}', event="response.created", id="0"),
        ServerSentEvent("[DONE]"),
        ServerSentEvent("", id="2"),
        ServerSentEvent(comment="ping"),
        ServerSentEvent("two\nlines", id="1"),
        ServerSentEvent("x\r", event="name"),
        ServerSentEvent("x", id="a\nb"),
        ServerSentEvent("x", event="e\r\n"),
        ServerSentEvent("x", retry=1000),
    ]
    for event in events:
        assert joined([event]) == event.encode(), event
    assert joined(events) == b"".join(event.encode() for event in events)
