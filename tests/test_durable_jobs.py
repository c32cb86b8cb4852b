"""Durable jobs under faults, with real processes and a real Redis: each test states the behaviour
it expects and the time within which it must hold.

Gateways here run short leases (`LEASE_S=2`, renewed every 0.5 s), so a lost worker is noticed
within about 3 s.
"""

import concurrent.futures
import json
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis as AsyncRedis

from api.errors import OpenAIError
from cli.embedded_redis import EmbeddedRedis
from shared import heartbeats
from shared.events import EventWriter
from shared.jobs import CompletionJob, Done, Failed, FinishReason, SessionRef, Turn, Usage
from shared.jobstore import JobStore
from shared.keys import record_key, session_lock_key
from shared.settings import Settings
from tests.conftest import Gateway, assert_schema, chat, claude_env
from tests.fake_anthropic import FakeAnthropic, Reply
from tests.test_operations import scrape, status_json
from worker.main import CLOSE_BOUND_S, CLOSE_REPORT_S
from worker.session_store import JobTranscript, RedisSessionStore
from worker.task import _commit_turn

FAST_LEASES = {"LEASE_S": "2", "LEASE_RENEW_S": "0.5"}


def script(**spec: Any) -> str:
    return "script:" + json.dumps(spec)


def words(n: int) -> str:
    return "".join(f"w{i} " for i in range(n))


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str | None, str]]:
    """(id, data) of each SSE event from a stream of lines."""
    event_id: str | None = None
    for line in lines:
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            yield event_id, line[6:]
            event_id = None


def content_of(data: str) -> str:
    chunk = json.loads(data)
    return "".join(choice["delta"].get("content") or "" for choice in chunk["choices"])


def job_id_of(completion_id: str) -> str:
    return completion_id.removeprefix("chatcmpl-")


def wait_for(predicate: Any, within_s: float, what: str | Callable[[], str]) -> Any:
    """`what` may be a function: what was waited for, described once the wait is over."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {within_s} s: {what if isinstance(what, str) else what()}")


def worker_running(gateway: Gateway, job_id: str) -> subprocess.Popen[bytes]:
    """The worker process running the job: the job record names the worker, its heartbeat its pid."""
    client = gateway.redis()
    worker = wait_for(lambda: client.hget(f"gateway:job:{job_id}", "worker"), 10, "the job starts")
    pid = json.loads(client.get(heartbeats.worker_key(worker.decode())) or "{}")["pid"]
    return next(p for p in gateway.workers if p.pid == pid)


@pytest.fixture(scope="module")
def durable(start_gateway: Any) -> Gateway:
    gateway: Gateway = start_gateway(workers=2, BACKEND="scripted", **FAST_LEASES)
    return gateway


def start_background(gateway: Gateway, content: str, **extra: Any) -> str:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat(content, background=True, **extra), timeout=10
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert body["choices"] == []
    assert "usage" not in body  # not null: the spec's usage is an object when present
    return str(body["id"])


def retrieve(gateway: Gateway, completion_id: str) -> dict[str, Any]:
    response = httpx.get(f"{gateway.url}/v1/chat/completions/{completion_id}", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_background_job_runs_to_completion_and_polls_through_its_statuses(durable: Gateway) -> None:
    completion_id = start_background(durable, script(text="a b c", wait_ms=500))
    seen = {retrieve(durable, completion_id)["status"]}
    final = wait_for(
        lambda: (body := retrieve(durable, completion_id))["status"] == "completed" and body, 10, "completion"
    )
    seen |= {"completed"}
    assert seen <= {"queued", "in_progress", "completed"}
    assert_schema(final, "CreateChatCompletionResponse")
    assert final["choices"][0]["message"]["content"] == "a b c"
    assert final["usage"]["completion_tokens"] == 3


def test_resume_after_completion_replays_exactly_the_rest(durable: Gateway) -> None:
    completion_id = start_background(durable, script(text="one two three four"))
    wait_for(lambda: retrieve(durable, completion_id)["status"] == "completed", 10, "completion")
    url = f"{durable.url}/v1/chat/completions/{completion_id}"
    full = httpx.get(url, params={"stream": "true", "include_usage": "true"}, timeout=10)
    events = list(sse_events(iter(full.text.splitlines())))
    assert events[0][0] == "0"
    assert events[-1] == (None, "[DONE]")
    for _, data in events[:-1]:
        assert_schema(json.loads(data), "CreateChatCompletionStreamResponse")
    assert json.loads(events[-2][1])["usage"]["completion_tokens"] == 4
    # Resume after the second content event: the rest, and nothing before it.
    second_id = [eid for eid, data in events if eid not in (None, "0") and content_of(data)][1]
    rest = httpx.get(url, params={"stream": "true", "starting_after": second_id}, timeout=10)
    rest_events = list(sse_events(iter(rest.text.splitlines())))
    text_before = "".join(
        content_of(d) for eid, d in events if eid not in (None,) and int(eid) <= int(second_id)
    )
    assert text_before + "".join(content_of(d) for _, d in rest_events[:-1]) == "one two three four"
    assert all(eid is None or int(eid) > int(second_id) for eid, _ in rest_events)
    # From the last event, or past it: nothing but the end (it waited with pings forever).
    last_id = [eid for eid, _ in events if eid is not None][-1]
    for after in (last_id, "1000"):
        began = time.monotonic()
        tail = httpx.get(url, params={"stream": "true", "starting_after": after}, timeout=10)
        assert list(sse_events(iter(tail.text.splitlines()))) == [(None, "[DONE]")]
        assert time.monotonic() - began < 5  # at once, not after a lease's check
        headers = {"Last-Event-ID": after}
        assert httpx.get(url, params={"stream": "true"}, headers=headers, timeout=10).text == tail.text
    # An id Redis could not take is the client's mistake (it was relayed as a lost queue).
    huge = httpx.get(url, params={"stream": "true", "starting_after": str(2**64)}, timeout=10)
    assert huge.status_code == 400
    assert huge.json()["error"]["param"] == "starting_after"
    responses_url = f"{durable.url}/v1/responses/resp_{job_id_of(completion_id)}"
    huge = httpx.get(responses_url, params={"stream": "true", "starting_after": str(2**64)}, timeout=10)
    assert huge.json()["error"]["param"] == "starting_after"


def test_resume_from_any_chunk_gets_exactly_the_rest_even_within_one_event(durable: Gateway) -> None:
    # The end of a turn of function calls is one job event and three chunks (the calls, the finish,
    # the usage): a client whose connection dropped between two of them resumes after the last it
    # got, and must get neither the calls twice (their arguments would be joined) nor less.
    weather = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}}]
    calls = [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    completion_id = start_background(durable, script(text="Let me look.", calls=calls), tools=tools)
    wait_for(lambda: retrieve(durable, completion_id)["status"] == "completed", 10, "completion")
    url = f"{durable.url}/v1/chat/completions/{completion_id}"
    params = {"stream": "true", "include_usage": "true"}
    full = list(sse_events(iter(httpx.get(url, params=params, timeout=10).text.splitlines())))
    chunks = [json.loads(data) for _, data in full[:-1]]
    assert [
        bool(chunk["choices"] and chunk["choices"][0]["delta"].get("tool_calls")) for chunk in chunks[-3:]
    ] == [
        True,
        False,
        False,
    ]
    ids = [event_id for event_id, _ in full[:-1]]
    assert None not in ids
    assert [int(i) for i in ids] == sorted({int(i) for i in ids})  # every chunk's own, increasing
    for sent, (event_id, _) in enumerate(full[:-1], start=1):
        for resumed in (
            httpx.get(url, params={**params, "starting_after": event_id}, timeout=10),
            httpx.get(url, params=params, headers={"Last-Event-ID": event_id}, timeout=10),
        ):
            assert full[:sent] + list(sse_events(iter(resumed.text.splitlines()))) == full


def test_disconnect_mid_stream_then_resume_many_times_loses_and_repeats_nothing(durable: Gateway) -> None:
    """Within 60 s: 30 disconnects, each resumed from Last-Event-ID; the text arrives exactly once."""
    tokens = 600
    body = chat(script(text=words(tokens), delay_ms=2), stream=True)
    text, last_id, resumes = "", None, 0
    with httpx.stream("POST", f"{durable.url}/v1/chat/completions", json=body, timeout=30) as response:
        completion_id = None
        for event_id, data in sse_events(response.iter_lines()):
            completion_id = json.loads(data)["id"]
            text += content_of(data)
            last_id = event_id or last_id
            if event_id not in (None, "0"):
                break  # disconnect after the first content chunk
    assert completion_id is not None
    done = False
    deadline = time.monotonic() + 60
    while not done and time.monotonic() < deadline:
        headers = {"Last-Event-ID": str(last_id)}
        url = f"{durable.url}/v1/chat/completions/{completion_id}?stream=true"
        with httpx.stream("GET", url, headers=headers, timeout=30) as response:
            assert response.status_code == 200
            for received, (event_id, data) in enumerate(sse_events(response.iter_lines()), start=1):
                if data == "[DONE]":
                    done = True
                    break
                text += content_of(data)
                last_id = event_id or last_id
                if resumes < 30 and received >= 3:
                    break  # drop the connection again mid-stream
        resumes += 1
    assert done
    assert resumes >= 30
    assert text == words(tokens)


def test_cancel_stops_a_running_job_and_is_harmless_to_repeat(durable: Gateway) -> None:
    """Cancel answers within 5 s with status cancelled; the stream ends with a cancelled error."""
    body = chat(script(text=words(1000), delay_ms=20), stream=True)
    with httpx.stream("POST", f"{durable.url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        completion_id = None
        for _, data in sse_events(lines):
            completion_id = json.loads(data)["id"]
            if content_of(data):
                break
        began = time.monotonic()
        cancel = httpx.post(f"{durable.url}/v1/chat/completions/{completion_id}/cancel", timeout=10)
        assert cancel.status_code == 200
        assert cancel.json()["status"] == "cancelled"
        assert time.monotonic() - began < 5
        rest = [data for _, data in sse_events(lines)]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["error"]["code"] == "cancelled"
    again = httpx.post(f"{durable.url}/v1/chat/completions/{completion_id}/cancel", timeout=10)
    assert again.json()["status"] == "cancelled"
    # A later job is unaffected.
    after = httpx.post(f"{durable.url}/v1/chat/completions", json=chat(script(text="fine")), timeout=10)
    assert after.json()["choices"][0]["message"]["content"] == "fine"


def test_cancel_of_unknown_or_finished_jobs(durable: Gateway) -> None:
    for bad in ("chatcmpl-" + "0" * 32, "nonsense", "chatcmpl-../../x"):
        response = httpx.post(f"{durable.url}/v1/chat/completions/{bad}/cancel", timeout=10)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    finished = httpx.post(f"{durable.url}/v1/chat/completions", json=chat(script(text="done")), timeout=10)
    completion_id = finished.json()["id"]
    response = httpx.post(f"{durable.url}/v1/chat/completions/{completion_id}/cancel", timeout=10)
    assert response.json()["status"] == "completed"
    assert response.json()["choices"][0]["message"]["content"] == "done"


def test_delete_removes_a_job_and_its_events_cancelling_it_first(durable: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{durable.url}/v1", api_key="unused", max_retries=0, timeout=30)
    finished = client.chat.completions.create(model="claude-sonnet-4-5", messages=chat("hi")["messages"])
    deleted = client.chat.completions.delete(finished.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (finished.id, True, "chat.completion.deleted")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(finished.id)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.delete(finished.id)
    body = chat(script(text="never", wait_ms=20_000), background=True)
    running = httpx.post(f"{durable.url}/v1/chat/completions", json=body, timeout=10).json()
    assert client.chat.completions.delete(running["id"]).deleted
    job_id = running["id"].removeprefix("chatcmpl-")
    redis = durable.redis()
    assert redis.exists(f"gateway:job:{job_id}", f"gateway:job:{job_id}:events") == 0
    assert redis.zscore("gateway:running", job_id) is None
    # Every choice of an n > 1 request goes with it (the others' ids were never the caller's).
    two = client.chat.completions.create(model="claude-sonnet-4-5", messages=chat("hi")["messages"], n=2)
    first = two.id.removeprefix("chatcmpl-")
    [other] = redis.hget(f"gateway:job:{first}", "choices").decode().split()
    assert redis.exists(f"gateway:job:{other}", f"gateway:job:{other}:events") == 2
    client.chat.completions.delete(two.id)
    assert redis.exists(*(f"gateway:job:{i}{part}" for i in (first, other) for part in ("", ":events"))) == 0
    # A deleted job's Idempotency-Key is free again: the same request runs anew (it got 409s).
    url, keyed = f"{durable.url}/v1/chat/completions", {"Idempotency-Key": "delete-then-again"}
    earlier = httpx.post(url, json=chat("hi"), headers=keyed, timeout=10).json()["id"]
    client.chat.completions.delete(earlier)
    again = httpx.post(url, json=chat("hi"), headers=keyed, timeout=10)
    assert again.status_code == 200, again.text
    assert again.json()["id"] != earlier
    assert httpx.post(url, json=chat("hi"), headers=keyed, timeout=10).json()["id"] == again.json()["id"]
    redis.close()


def test_the_same_idempotency_key_attaches_to_the_same_job(durable: Gateway) -> None:
    body = chat(script(text="only once", wait_ms=300))
    headers = {"Idempotency-Key": "order-42"}
    first = httpx.post(f"{durable.url}/v1/chat/completions", json=body, headers=headers, timeout=10)
    second = httpx.post(f"{durable.url}/v1/chat/completions", json=body, headers=headers, timeout=10)
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert second.json()["choices"][0]["message"]["content"] == "only once"
    other = httpx.post(f"{durable.url}/v1/chat/completions", json=chat("other"), headers=headers, timeout=10)
    assert other.status_code == 400
    assert other.json()["error"]["code"] == "idempotency_key_reused"


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
def test_the_same_idempotency_key_attaches_on_responses_and_messages_too(durable: Gateway, path: str) -> None:
    """Every front end that queues a job honours the key (it was chat's only): a client that timed
    out and sends again gets the same job, not a second agent run."""
    asked = script(text="only once", wait_ms=300)
    if path == "/v1/responses":
        body: dict[str, Any] = {"model": "claude-sonnet-4-5", "input": asked}
    else:
        body = {**chat(asked), "max_tokens": 100}
    headers = {"Idempotency-Key": f"once-on-{path}"}
    redis = durable.redis()
    stored = len(list(redis.scan_iter("gateway:response:*")))
    first = httpx.post(f"{durable.url}{path}", json=body, headers=headers, timeout=10)
    second = httpx.post(f"{durable.url}{path}", json=body, headers=headers, timeout=10)
    assert first.status_code == second.status_code == 200, second.text
    assert first.json()["id"] == second.json()["id"]
    # The second request's stored Responses request is not kept beside a job that never was.
    assert len(list(redis.scan_iter("gateway:response:*"))) == stored + (path == "/v1/responses")
    redis.close()
    assert "only once" in second.text
    other = httpx.post(f"{durable.url}{path}", json={**body, "model": "sonnet"}, headers=headers, timeout=10)
    assert other.status_code == 400
    said = other.json()["error"]
    assert "Idempotency-Key was already used" in said["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_a_stream_sent_again_with_its_key_resumes_after_its_last_event_id(
    durable: Gateway, path: str
) -> None:
    """Found by an outside probe: SSE clients that lose a POST's stream send it again with the
    `Last-Event-ID` they had; under the same `Idempotency-Key`, the whole stream came again (the
    text before the drop twice). A new request's `Last-Event-ID` names nothing of it: ignored."""
    text = words(40)
    asked = script(text=text, delay_ms=5)
    body = {"model": "claude-sonnet-4-5", "input": asked} if path == "/v1/responses" else chat(asked)
    body["stream"] = True
    url, keyed = f"{durable.url}{path}", {"Idempotency-Key": f"resent-{path}"}

    def read(response: httpx.Response) -> list[tuple[str | None, str]]:
        assert response.status_code == 200, response.text
        return list(sse_events(iter(response.text.splitlines())))

    def said(events: list[tuple[str | None, str]]) -> str:
        if path == "/v1/responses":
            deltas = (json.loads(data) for _, data in events)
            return "".join(
                event["delta"] for event in deltas if event["type"] == "response.output_text.delta"
            )
        return "".join(content_of(data) for _, data in events if data != "[DONE]")

    with httpx.stream("POST", url, json=body, headers=keyed, timeout=30) as first:
        head = []
        for event in sse_events(first.iter_lines()):
            head.append(event)
            if len(said(head).split()) >= 5:
                break
    last_id = [eid for eid, _ in head if eid is not None][-1]
    rest = read(httpx.post(url, json=body, headers={**keyed, "Last-Event-ID": last_id}, timeout=30))
    assert all(eid is None or int(eid) > int(last_id) for eid, _ in rest)
    assert said(head) + said(rest) == text
    # The whole stream again without the header; a new request's header is not its own.
    whole = read(httpx.post(url, json=body, headers=keyed, timeout=30))
    assert said(whole) == text
    # From its last event or past it: only the end (a re-check probe's got a 500).
    end = [eid for eid, _ in whole if eid is not None][-1]
    for past in (end, str(int(end) + 10), "999999999999999999"):
        tail = read(httpx.post(url, json=body, headers={**keyed, "Last-Event-ID": past}, timeout=30))
        assert said(tail) == ""
        assert path != "/v1/chat/completions" or tail == [(None, "[DONE]")]
    fresh = {"Idempotency-Key": f"fresh-{path}", "Last-Event-ID": last_id}
    assert said(read(httpx.post(url, json=body, headers=fresh, timeout=30))) == text


def test_the_same_idempotency_key_attaches_to_a_session_turn_still_running(durable: Gateway) -> None:
    """Found by an outside probe: a client that lost its stream of a session's turn and sent it
    again with the same key got 409 `session_busy` (the turn held the session) until it ended."""
    url = f"{durable.url}/v1/chat/completions"
    body = chat(script(text="turn of a session", wait_ms=1500), session_id="idempotent-turn", background=True)
    headers = {"Idempotency-Key": "turn-7"}
    first = httpx.post(url, json=body, headers=headers, timeout=10)
    again = httpx.post(url, json=body, headers=headers, timeout=10)
    assert first.status_code == again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    # The session named by the header instead is the same request (found by the next probe).
    by_header = {k: v for k, v in body.items() if k != "session_id"}
    named = {**headers, "X-Session-Id": "idempotent-turn"}
    headed = httpx.post(url, json=by_header, headers=named, timeout=10)
    assert headed.status_code == 200, headed.text
    assert headed.json()["id"] == first.json()["id"]
    other = httpx.post(
        url, json={**body, "messages": [{"role": "user", "content": "other"}]}, headers=headers, timeout=10
    )
    assert other.status_code == 400
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    job_id = first.json()["id"]
    wait_for(lambda: retrieve(durable, job_id)["status"] == "completed", 10, "the turn completes")
    assert retrieve(durable, job_id)["choices"][0]["message"]["content"] == "turn of a session"
    session = httpx.get(f"{durable.url}/v1/sessions/idempotent-turn", timeout=10).json()
    assert session["message_count"] == 2  # one turn, not two


def test_job_over_its_time_or_stall_limit_fails_clearly(start_gateway: Any) -> None:
    """Within the limit + 2 s: 504 with `timeout` or `stalled`."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", JOB_TIMEOUT_S="1.5", STALL_TIMEOUT_S="1")
    url = f"{gateway.url}/v1/chat/completions"
    began = time.monotonic()
    slow = httpx.post(url, json=chat(script(text=words(100), delay_ms=100)), timeout=10)
    assert slow.status_code == 504
    assert slow.json()["error"]["code"] == "timeout"
    assert time.monotonic() - began < 3.5
    began = time.monotonic()
    silent = httpx.post(url, json=chat(script(text="late", wait_ms=5000)), timeout=10)
    assert silent.status_code == 504
    assert silent.json()["error"]["code"] == "stalled"
    assert time.monotonic() - began < 3


def test_a_job_whose_output_passes_its_limit_is_stopped_there(start_gateway: Any) -> None:
    """Found by an outside probe: a job's tools can make its CLI report any output (they reach its
    pipes), and one job put 180 MB in Redis. Past `JOB_MAX_OUTPUT_CHARS` the job fails, its stored
    events within the limit, and the worker is free for the next job."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", JOB_MAX_OUTPUT_CHARS="2000")
    url = f"{gateway.url}/v1/chat/completions"
    flood = httpx.post(url, json=chat(script(text="tok ", tokens=100_000)), timeout=30)
    assert flood.status_code == 502, flood.text
    error = flood.json()["error"]
    assert error["code"] == "output_too_large"
    assert "JOB_MAX_OUTPUT_CHARS (2,000 characters)" in error["message"]
    assert flood.headers["x-should-retry"] == "false"
    redis = gateway.redis()
    stored = sum(  # the gateway's only job so far
        sum(len(fields[b"e"]) for _, fields in redis.xrange(key))
        for key in redis.scan_iter("gateway:job:*:events")
    )
    assert stored < 10_000  # 2,000 characters of text and its framing, not 400,000
    fits = httpx.post(url, json=chat(script(text="fits")), timeout=30)
    assert fits.json()["choices"][0]["message"]["content"] == "fits"
    # Counted as stored and sent: a control character as its JSON escape's 6 (an outside probe's
    # 8,000,000 `\x01` took 48 MB), and a request's choices share its bound (`n: 8` answered 379 MB).
    for content, n in (("\x01" * 400, 1), ("x" * 1200, 2)):
        over = httpx.post(url, json=chat(script(text=content), n=n), timeout=30)
        assert over.status_code == 502, over.text
        assert over.json()["error"]["code"] == "output_too_large"
        within = httpx.post(url, json=chat(script(text="x" * len(content))), timeout=30)
        assert within.json()["choices"][0]["message"]["content"] == "x" * len(content)
    # A reply's calls to the caller's functions are output too (a probe forged 36 MB of them).
    function = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    calls = [{"name": "f", "arguments": {"a": "x" * 5000}}]
    called = httpx.post(url, json=chat(script(text="", calls=calls), tools=[function]), timeout=30)
    assert called.status_code == 502, called.text
    assert called.json()["error"]["code"] == "output_too_large"


def test_cancel_of_a_queued_job_needs_no_worker(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(workers=0, BACKEND="scripted")
    completion_id = start_background(gateway, "never runs")
    response = httpx.post(f"{gateway.url}/v1/chat/completions/{completion_id}/cancel", timeout=10)
    assert response.json()["status"] == "cancelled"
    client = gateway.redis()
    assert client.zcard("gateway:queue") == 0
    assert list(client.scan_iter("arq:job:*")) == []


def test_kill_9_before_output_retries_the_job_on_another_worker(start_gateway: Any) -> None:
    """The job completes on the surviving worker within lease (2 s) + its own run (~1 s) + 5 s."""
    gateway: Gateway = start_gateway(workers=2, BACKEND="scripted", **FAST_LEASES)
    completion_id = start_background(gateway, script(text="survived the crash", wait_ms=1000))
    victim = worker_running(gateway, job_id_of(completion_id))
    victim.send_signal(signal.SIGKILL)
    final = wait_for(
        lambda: (b := retrieve(gateway, completion_id))["status"] in ("completed", "failed") and b, 8, "retry"
    )
    assert final["status"] == "completed"
    assert final["choices"][0]["message"]["content"] == "survived the crash"
    assert gateway.redis().hget(f"gateway:job:{job_id_of(completion_id)}", "attempt") == b"2"


@pytest.mark.claude
def test_a_claude_job_retried_on_the_same_machine_starts_in_a_clean_workspace(
    start_gateway: Any, fake_anthropic: FakeAnthropic, upstream: FakeAnthropic
) -> None:
    """Both workers share the machine's WORKSPACE_ROOT: the killed attempt's workspace is still
    there when the retry starts (it failed at once with internal_error, FileExistsError)."""
    gateway: Gateway = start_gateway(workers=2, **claude_env(fake_anthropic, **FAST_LEASES))
    upstream.by_prompt["survive me"] = deque([Reply(tokens=["late"], delay_s=60), Reply(tokens=["made it"])])
    completion_id = start_background(gateway, "survive me")
    victim = worker_running(gateway, job_id_of(completion_id))
    # Bounds for a loaded machine (CI's, with the other test process's CLIs): twice missed at 30 and 40 s.
    wait_for(lambda: any("survive me" in json.dumps(r["messages"]) for r in upstream.requests), 60, "asked")
    victim.send_signal(signal.SIGKILL)
    ended = ("completed", "failed")
    record = f"gateway:job:{job_id_of(completion_id)}"

    def the_retry() -> str:
        return f"retry; the job's record: {gateway.redis().hgetall(record)}"

    final = wait_for(lambda: (b := retrieve(gateway, completion_id))["status"] in ended and b, 60, the_retry)
    assert final["status"] == "completed", final
    assert final["choices"][0]["message"]["content"] == "made it"
    assert gateway.redis().hget(f"gateway:job:{job_id_of(completion_id)}", "attempt") == b"2"


def test_kill_9_after_output_ends_the_stream_with_an_error_within_seconds(start_gateway: Any) -> None:
    """The open stream gets a worker_lost error event within lease (2 s) + 3 s of the kill."""
    gateway: Gateway = start_gateway(workers=2, BACKEND="scripted", **FAST_LEASES)
    body = chat(script(text=words(1000), delay_ms=20), stream=True)
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        completion_id = id_at_first_content(lines)
        worker_running(gateway, job_id_of(completion_id)).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        rest = [data for _, data in sse_events(lines)]
    assert time.monotonic() - killed < 5
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["error"]["code"] == "worker_lost"
    # What an operator sees: the failure in the totals and among the recent ones.
    assert scrape(gateway)["gateway_jobs_total{outcome=worker_lost}"] == 1
    latest = status_json(gateway)["recent_failures"][0]
    assert (latest["job_id"], latest["code"]) == (job_id_of(completion_id), "worker_lost")


# SIGHUP (its terminal closed) as SIGTERM: found by an outside probe, a hangup killed it undrained.
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_drains_the_running_job_and_hands_back_the_silent_one(
    start_gateway: Any, stop: signal.Signals
) -> None:
    """SIGTERM: the worker takes no new job, finishes one with output, hands back one without
    (which the other worker then completes), and exits within its drain time + 5 s."""
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", DRAIN_TIMEOUT_S="2", JOBS_PER_WORKER="2", **FAST_LEASES
    )
    talking = start_background(gateway, script(text=words(10), delay_ms=100))
    silent = start_background(gateway, script(text="handed back", wait_ms=10_000))
    worker = worker_running(gateway, job_id_of(silent))
    assert worker is worker_running(gateway, job_id_of(talking))
    time.sleep(0.3)
    worker.send_signal(stop)
    worker.wait(timeout=7)
    assert retrieve(gateway, talking)["status"] == "completed"
    assert retrieve(gateway, silent)["status"] == "queued"  # handed back, nobody to run it yet
    gateway.start_worker()
    final = wait_for(lambda: (b := retrieve(gateway, silent))["status"] == "completed" and b, 20, "rerun")
    assert final["choices"][0]["message"]["content"] == "handed back"


def test_a_stop_held_by_a_job_that_ignores_cancellation_is_bounded_and_says_why(start_gateway: Any) -> None:
    """Past its drain, a worker whose job will not stop logs what it waits on, then exits anyway
    (status 1) with every thread's stack: a stuck close never holds a restart up."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", DRAIN_TIMEOUT_S="1", **FAST_LEASES)
    stuck = start_background(gateway, script(text="never", stuck_ms=300_000))
    worker = worker_running(gateway, job_id_of(stuck))
    stopped = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=CLOSE_BOUND_S + 15) == 1
    assert time.monotonic() - stopped < 1 + CLOSE_BOUND_S + 10
    log = next(gateway.logs.glob("worker-*.log")).read_text()
    assert f"worker still stopping after {CLOSE_REPORT_S:g} s; its tasks:" in log
    assert "_run_attempt (main.py:" in log  # where the job waits, its chain of awaits
    assert "> run_completion (task.py:" in log
    assert "most recent call first" in log  # and every thread's stack as it exited


@pytest.fixture
def own_redis(tmp_path: Any) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own that keeps every write on disk, so it can be restarted."""
    server = EmbeddedRedis(tmp_path / "redis", persistent=True)
    server.start()
    yield server
    server.stop()


def id_at_first_content(lines: Iterator[str]) -> str:
    """Reads a chat completion's stream up to its first content; the completion's id."""
    for _, data in sse_events(lines):
        if content_of(data):
            return str(json.loads(data)["id"])
    raise AssertionError("the stream ended without content")


def _streams_through(gateway: Gateway, trouble: Callable[[], None]) -> None:
    """A stream of 300 tokens is under way when `trouble` happens to Redis; it ends, once Redis is
    well, with every token exactly once and no error, and the gateway serves the next job."""
    tokens = 300
    body = chat(script(text=words(tokens), delay_ms=10), stream=True)
    text = ""
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _, data in sse_events(lines):
            text += content_of(data) if data != "[DONE]" else ""
            if len(text) > 40:
                break
        trouble()
        for _, data in sse_events(lines):
            if data == "[DONE]":
                break
            assert "error" not in json.loads(data), data
            text += content_of(data)
    assert text == words(tokens)
    after = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(script(text="back")), timeout=10)
    assert after.json()["choices"][0]["message"]["content"] == "back"


def test_an_operators_scrape_shows_a_redis_outage(own_redis: EmbeddedRedis, start_gateway: Any) -> None:
    """Found by an outside probe: /metrics and /status answered 503 access_control_unavailable to
    a configured key through a Redis outage, which a scrape should show, not fail on."""
    key = "operator-key-0123456789"
    gateway: Gateway = start_gateway(workers=0, BACKEND="scripted", redis_url=own_redis.url, API_KEY=key)
    headers = {"authorization": f"Bearer {key}"}
    metrics = httpx.get(f"{gateway.url}/metrics", headers=headers, timeout=10)
    assert "gateway_redis_up 1.0" in metrics.text
    own_redis.stop()
    try:
        metrics = httpx.get(f"{gateway.url}/metrics", headers=headers, timeout=20)
        assert metrics.status_code == 200, metrics.text
        assert "gateway_redis_up 0.0" in metrics.text
        assert "gateway_api_requests" in metrics.text or "gateway_api_errors" in metrics.text
        status = httpx.get(f"{gateway.url}/status", headers=headers, timeout=20)
        assert status.status_code == 503
        assert status.json()["error"]["code"] != "access_control_unavailable"
        stranger = httpx.get(f"{gateway.url}/metrics", headers={"authorization": "Bearer wrong"}, timeout=20)
        assert stranger.status_code == 503  # anyone else: still closed while keys cannot be checked
    finally:
        own_redis.start()


def test_redis_restart_mid_job_loses_nothing(own_redis: EmbeddedRedis, start_gateway: Any) -> None:
    """While Redis is down the API answers 503; within 10 s of its return the stream completes
    with every token exactly once."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", redis_url=own_redis.url, **FAST_LEASES)

    def restart() -> None:
        own_redis.stop()
        down = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), timeout=10)
        assert down.status_code == 503
        # Access control needs Redis first (managed keys, rate limits) and fails closed.
        assert down.json()["error"]["code"] == "access_control_unavailable"
        assert down.headers["retry-after"] == "2"  # OpenAI's clients wait that long and retry
        time.sleep(1)
        own_redis.start()

    _streams_through(gateway, restart)


def test_a_frozen_redis_gets_requests_a_503_not_a_hang(own_redis: EmbeddedRedis, start_gateway: Any) -> None:
    """Found by an outside probe: with Redis stopped (SIGSTOP), every API request hung until the
    client gave up. A reply overdue by REDIS_REPLY_TIMEOUT_S is a 503; the open stream waits the
    freeze out and ends with every token once."""
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", redis_url=own_redis.url, REDIS_REPLY_TIMEOUT_S="1", **FAST_LEASES
    )
    server = own_redis.process
    assert server is not None

    def freeze() -> None:
        server.send_signal(signal.SIGSTOP)
        try:
            frozen = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), timeout=20)
        finally:
            server.send_signal(signal.SIGCONT)
        assert frozen.status_code == 503, frozen.text
        assert frozen.json()["error"]["code"] == "access_control_unavailable"

    _streams_through(gateway, freeze)


def test_requests_that_find_redis_frozen_get_their_503s_together(
    own_redis: EmbeddedRedis, start_gateway: Any
) -> None:
    """Found by an outside probe: with Redis frozen, the requests of one API process got their
    503s one reply timeout after another (5, 10, ... 35 s): each new connection's handshake waited
    out the timeout holding the connection pool's lock."""
    gateway: Gateway = start_gateway(
        workers=0, BACKEND="scripted", redis_url=own_redis.url, REDIS_REPLY_TIMEOUT_S="1"
    )
    assert httpx.get(f"{gateway.url}/v1/models", timeout=10).status_code == 200
    server = own_redis.process
    assert server is not None
    server.send_signal(signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            started = time.monotonic()
            answers = list(pool.map(lambda _: httpx.get(f"{gateway.url}/v1/models", timeout=60), range(8)))
            took = time.monotonic() - started
    finally:
        server.send_signal(signal.SIGCONT)
    assert {answer.status_code for answer in answers} == {503}
    assert took < 5, took  # a few reply timeouts (1 s) at most, not one per request


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_loses_redis_before_its_answer_says_its_job_runs_on(
    own_redis: EmbeddedRedis, start_gateway: Any, stream: bool
) -> None:
    """Found by an outside probe: a non-streamed request whose Redis froze for longer than
    REDIS_OUTAGE_GRACE_S got a plain 503, which the OpenAI and Anthropic SDKs retry, while its job
    ran on and completed: the agent ran twice. The 503 now says not to retry, and names the job;
    so does a stream's, before its first token (a re-check probe found it still a plain 503)."""
    gateway: Gateway = start_gateway(
        workers=1,
        BACKEND="scripted",
        redis_url=own_redis.url,
        REDIS_REPLY_TIMEOUT_S="1",
        REDIS_OUTAGE_GRACE_S="1",
        **FAST_LEASES,
    )
    server = own_redis.process
    assert server is not None
    answers: list[httpx.Response] = []
    body = chat(script(text="finished after all", wait_ms=8000), stream=stream)
    asking = threading.Thread(
        target=lambda: answers.append(httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60))
    )
    asking.start()
    client = gateway.redis()
    job_id = wait_for(lambda: next(iter(client.zrange("gateway:running", 0, -1)), None), 10, "the job starts")
    server.send_signal(signal.SIGSTOP)
    try:
        asking.join(timeout=30)
    finally:
        server.send_signal(signal.SIGCONT)
    [answer] = answers
    assert answer.status_code == 503, answer.text
    assert answer.headers["x-should-retry"] == "false"
    assert job_id.decode() in answer.json()["error"]["message"]
    final = wait_for(
        lambda: (b := retrieve(gateway, f"chatcmpl-{job_id.decode()}"))["status"] == "completed" and b,
        30,
        "completion",
    )
    assert final["choices"][0]["message"]["content"] == "finished after all"


def test_a_job_whose_redis_stays_away_past_the_grace_ends_as_such(
    own_redis: EmbeddedRedis, start_gateway: Any
) -> None:
    """Found by an outside probe: a job whose worker lost Redis for longer than
    REDIS_OUTAGE_GRACE_S ended as `worker_lost` ("the worker stopped"), its worker alive all along:
    an operator was sent looking for crashed workers. The worker stops the job and writes its end,
    `queue_unavailable`, once Redis is back; a job that finished meanwhile (its last write in
    flight when Redis went: a re-check probe found it lost too) is recorded as finished. A session
    turn that finished meanwhile cannot be added to its session then: it ends `queue_unavailable`
    too, its session as it was (an outside probe saw it end as `worker_lost`, with a traceback)."""
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", redis_url=own_redis.url, REDIS_OUTAGE_GRACE_S="3", **FAST_LEASES
    )
    first_turn = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat("hello", session_id="s"), timeout=20
    )
    assert first_turn.status_code == 200, first_turn.text
    running = start_background(gateway, script(text=words(600), delay_ms=25))  # 15 s
    finishing = start_background(gateway, script(text=words(40), delay_ms=50))  # 2 s
    turn = start_background(gateway, script(text=words(40), delay_ms=50), session_id="s")  # 2 s
    wait_for(
        lambda: all(retrieve(gateway, job)["status"] == "in_progress" for job in (running, finishing, turn)),
        10,
        "the jobs starting",
    )
    time.sleep(0.5)  # both have output
    own_redis.stop()
    time.sleep(6)  # past the grace: the first is stopped; the second ended within it
    own_redis.start()
    stopped = wait_for(
        lambda: (body := retrieve(gateway, running))["status"] == "failed" and body, 30, "the first one's end"
    )
    assert stopped["error"]["code"] == "queue_unavailable", stopped["error"]
    finished = wait_for(
        lambda: (body := retrieve(gateway, finishing))["status"] != "in_progress" and body,
        30,
        "the second's end",
    )
    assert finished["status"] == "completed", finished.get("error")
    assert finished["choices"][0]["message"]["content"] == words(40)
    unsaved = wait_for(
        lambda: (body := retrieve(gateway, turn))["status"] != "in_progress" and body, 30, "the turn's end"
    )
    assert unsaved["status"] == "failed"
    assert unsaved["error"]["code"] == "queue_unavailable", unsaved["error"]
    assert "not added to the session" in unsaved["error"]["message"]
    session = httpx.get(f"{gateway.url}/v1/sessions/s", timeout=10).json()
    assert session["message_count"] == 2, session  # the first turn only
    [worker] = gateway.workers
    assert worker.poll() is None  # it was never lost
    assert "Traceback" not in (gateway.logs / "worker-0.log").read_text()


def test_a_full_redis_refuses_new_jobs_and_keeps_the_running_one(
    own_redis: EmbeddedRedis, start_gateway: Any
) -> None:
    """Found by an outside probe: with Redis full (`maxmemory`, `noeviction`), new jobs were
    queued and their requests hung, /ready said ready, and running jobs failed as worker_lost
    once there was room. Now a new job is a 503 storage_full at once, /ready says so, and the
    running stream waits with its lease kept, then ends with every token once."""
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", redis_url=own_redis.url, MAX_CONCURRENT_JOBS_PER_KEY="8", **FAST_LEASES
    )
    client = gateway.redis()

    def fill() -> None:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)  # below what it holds
        try:
            refused = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), timeout=20)
            ready = httpx.get(f"{gateway.url}/ready", timeout=10)
            time.sleep(3)  # past a lease (2 s)
        finally:
            client.config_set("maxmemory", 0)
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "storage_full"), refused.text
        assert (ready.status_code, ready.json()["error"]["code"]) == (503, "storage_full"), ready.text

    _streams_through(gateway, fill)


def test_a_job_that_ends_while_redis_is_full_keeps_its_lease_until_written(
    own_redis: EmbeddedRedis, start_gateway: Any
) -> None:
    """Found by an outside probe: a job whose backend finished while Redis was full stopped
    renewing its lease as its outcome was decided, before its last write found room; a lease
    later a sweep failed it as worker_lost and its finished output was lost."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", redis_url=own_redis.url, **FAST_LEASES)
    client = gateway.redis()

    def fill() -> None:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)  # below what it holds: the rest waits for room
        try:
            time.sleep(7)  # the backend ends within 3 s; then two leases (2 s) go by
        finally:
            client.config_set("maxmemory", 0)

    _streams_through(gateway, fill)


@pytest.mark.claude
def test_cancel_mid_run_leaves_no_cli_process(claude: Gateway, upstream: FakeAnthropic) -> None:
    """The Claude Code CLI and everything it started are gone within 5 s of the cancel."""
    upstream.default = Reply(tokens=[f"t{i} " for i in range(200)], delay_s=0.1)
    body = chat("count slowly", stream=True)
    with httpx.stream("POST", f"{claude.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        completion_id = id_at_first_content(lines)
        assert _cli_processes(claude), "the CLI runs while the job streams"
        httpx.post(f"{claude.url}/v1/chat/completions/{completion_id}/cancel", timeout=10)
        rest = [data for _, data in sse_events(lines)]
    assert json.loads(rest[-2])["error"]["code"] == "cancelled"
    wait_for(lambda: not _cli_processes(claude), 5, "every CLI process of the job exits")


def _cli_processes(gateway: Gateway) -> list[int]:
    marker = f"GATEWAY_WORKSPACE={gateway.env['WORKSPACE_ROOT']}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read()  # noqa: SIM115
        except OSError:
            continue
        if any(item.startswith(marker) for item in environ.split(b"\0")):
            found.append(int(pid))
    return found


def test_a_lost_worker_frees_its_sessions_lock(start_gateway: Any) -> None:
    """The session takes its next turn within the lease (2 s) + 3 s of its worker's SIGKILL,
    without the lost turn in its history."""
    gateway: Gateway = start_gateway(workers=2, BACKEND="scripted", **FAST_LEASES)
    url = f"{gateway.url}/v1/chat/completions"
    assert httpx.post(url, json=chat("first", session_id="s1"), timeout=10).status_code == 200
    body = chat(script(text=words(1000), delay_ms=20), stream=True, session_id="s1")
    with httpx.stream("POST", url, json=body, timeout=30) as response:
        completion_id = id_at_first_content(response.iter_lines())
        worker_running(gateway, job_id_of(completion_id)).send_signal(signal.SIGKILL)
        busy = httpx.post(url, json=chat("meanwhile", session_id="s1"), timeout=10)
        assert busy.status_code == 409
        assert busy.json()["error"]["code"] == "session_busy"
    echo = chat(script(text="", echo=True), session_id="s1")
    reply = wait_for(
        lambda: (r := httpx.post(url, json=echo, timeout=10)).status_code == 200 and r, 5, "turn"
    )
    assert reply.json()["choices"][0]["message"]["content"] == (
        "user: first\nassistant: Hello from the scripted backend."
    )


async def test_a_session_turn_a_full_redis_refuses_is_a_503_storage_full(own_redis: EmbeddedRedis) -> None:
    """Found by an outside probe: a session turn whose commit a full Redis refused (`maxmemory`,
    `noeviction`) ended as a 500 internal_error, where a full Redis is a 503 storage_full to retry."""
    job = CompletionJob(
        request_id="r",
        model="m",
        turns=[Turn(role="user", text="q")],
        session=SessionRef(owner="0" * 32, id="s", history_len=0, transcript_id="t"),
    )
    async with AsyncRedis.from_url(own_redis.url) as redis:
        writer = EventWriter(JobStore(redis, queue_name="q", ttl_s=60), job.id, 1)
        done = Done(finish_reason=FinishReason.STOP, usage=Usage())
        await redis.set(session_lock_key("0" * 32, "s"), job.id)  # the job holds its session
        transcript = JobTranscript(RedisSessionStore(redis, ttl_s=60), "0" * 32, "t", max_chars=10_000)
        await transcript.append({"project_key": "any", "session_id": "t"}, [{"type": "user", "uuid": "u1"}])
        transcript.seal()
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", 1)  # below what it holds: every write refused
        try:
            ended = await _commit_turn(
                redis, Settings(backend="scripted"), job, writer, done, None, [transcript.write]
            )
        finally:
            await redis.config_set("maxmemory", 0)
    assert isinstance(ended, Failed), ended
    error = OpenAIError.from_failure(ended)
    assert (error.status, error.info.code, error.headers) == (503, "storage_full", {"retry-after": "10"})


def test_a_stream_whose_job_redis_lost_ends_saying_so(durable: Gateway) -> None:
    """Found by an outside probe: after Redis restarted without its data, an open stream ended
    with internal_error "The job no longer exists.", which reads as the gateway's own bug."""
    body = chat(script(text="x ", tokens=400, delay_ms=20), stream=True)  # 8 s
    with httpx.stream("POST", f"{durable.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _, data in sse_events(lines):
            if content_of(data):
                job_id = json.loads(data)["id"].removeprefix("chatcmpl-")
                break
        durable.redis().delete(record_key(job_id))  # as a Redis restarted empty has it
        last = [data for _, data in sse_events(lines)][-2]
    error = json.loads(last)["error"]
    assert error["code"] == "queue_unavailable", error
    assert "lost the job" in error["message"]


def test_a_job_whose_output_finds_no_room_ends_storage_full(
    own_redis: EmbeddedRedis, start_gateway: Any
) -> None:
    """Found by an outside probe: a running job whose output found Redis full past the time it may
    run ended `worker_lost` (a 502 blaming a worker, with a traceback in its log) instead of
    `storage_full`; its end is written although Redis stays full."""
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", redis_url=own_redis.url, JOB_TIMEOUT_S="4", **FAST_LEASES
    )
    client = gateway.redis()
    body = chat(script(text=words(300), delay_ms=10), stream=True)
    errors = []
    # Read within 10 s, under the keep-alive ping's 15: a job that never ends fails the test.
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=10) as response:
        lines = response.iter_lines()
        text = ""
        for _, data in sse_events(lines):
            text += content_of(data)
            if len(text) > 40:
                break
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)  # below what it holds: every write needing room is refused
        try:
            for _, data in sse_events(lines):  # ends while Redis is full
                if data != "[DONE]" and "error" in (chunk := json.loads(data)):
                    errors.append(chunk["error"])
        finally:
            client.config_set("maxmemory", 0)
    assert [error["code"] for error in errors] == ["storage_full"], errors
    assert "Traceback" not in (gateway.logs / "worker-0.log").read_text()
    after = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(script(text="back")), timeout=10)
    assert after.json()["choices"][0]["message"]["content"] == "back"


def test_a_job_cancelled_while_redis_is_full_ends_cancelled_at_once(
    own_redis: EmbeddedRedis, start_gateway: Any
) -> None:
    """Found by a re-check probe: a cancel while the job's output waited for room in a full Redis
    answered "in_progress" after its 5 s wait; the job held its slot until JOB_TIMEOUT_S, then
    ended `storage_full`. A failure ending the attempt now waits for no room."""
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", redis_url=own_redis.url, JOB_TIMEOUT_S="60", **FAST_LEASES
    )
    client = gateway.redis()
    body = chat(script(text=words(300), delay_ms=20), stream=True)
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=10) as response:
        lines = response.iter_lines()
        completion_id = id_at_first_content(lines)
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)  # below what it holds: every write needing room is refused
        try:
            time.sleep(1)  # the job's output waits for room
            asked = time.monotonic()
            cancelled = httpx.post(f"{gateway.url}/v1/chat/completions/{completion_id}/cancel", timeout=10)
            took = time.monotonic() - asked
            rest = [json.loads(data) for _, data in sse_events(lines) if data != "[DONE]"]
            errors = [chunk["error"] for chunk in rest if "error" in chunk]
        finally:
            client.config_set("maxmemory", 0)
    assert cancelled.json()["status"] == "cancelled", cancelled.text
    assert took < 4, took  # not the cancel's whole wait (5 s)
    assert [error["code"] for error in errors] == ["cancelled"], errors


_PLAIN_FRONT_ENDS = {
    "chat": (
        "/v1/chat/completions",
        lambda text: chat(text),
        lambda body: body["choices"][0]["message"]["content"],
    ),
    "responses": (
        "/v1/responses",
        lambda text: {"model": "claude-sonnet-4-5", "input": text},
        lambda body: body["output"][0]["content"][0]["text"],
    ),
    "messages": (
        "/v1/messages",
        lambda text: {**chat(text), "max_tokens": 100},
        lambda body: body["content"][0]["text"],
    ),
}


@pytest.mark.parametrize("front_end", list(_PLAIN_FRONT_ENDS))
def test_a_plain_request_whose_client_leaves_first_is_cancelled_unless_it_can_come_back(
    start_gateway: Any, front_end: str
) -> None:
    """Found by an outside probe: an SDK that timed out waiting for a plain (not streamed) answer
    retried, and each attempt's job ran on to the end for no one (the client never saw its id):
    three agent runs for one call. Now the job of a client that left is cancelled, unless the
    request had an `Idempotency-Key` (sent again, it gets that job's answer)."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted")
    client = gateway.redis()
    path, body, answer = _PLAIN_FRONT_ENDS[front_end]
    slow = body(script(text=words(40), delay_ms=100))  # 4 s

    def ended_jobs() -> list[bytes | None]:
        records = [key for key in client.scan_iter("gateway:job:*") if b":" not in key[12:]]
        return sorted(client.hget(key, "ended") or b"" for key in records)

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}{path}", json=slow, timeout=1)
    wait_for(lambda: ended_jobs() == [b"cancelled"], 5, "the job cancelled")

    keyed = {"idempotency-key": "one-call"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}{path}", json=slow, headers=keyed, timeout=1)
    again = httpx.post(f"{gateway.url}{path}", json=slow, headers=keyed, timeout=30)
    assert again.status_code == 200, again.text
    assert answer(again.json()) == words(40)
    assert ended_jobs() == [b"cancelled", b"completed"]  # the same job, once


@pytest.mark.parametrize("front_end", list(_PLAIN_FRONT_ENDS))
def test_a_streams_client_that_leaves_before_its_headers_is_treated_as_a_plain_one(
    start_gateway: Any, front_end: str
) -> None:
    """Found by an outside probe: a stream's client that timed out before the headers (a job
    silent for STREAM_COMMIT_AFTER_S) had not seen its id, and its job ran on for no one."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted")
    client = gateway.redis()
    path, body, _ = _PLAIN_FRONT_ENDS[front_end]
    silent = {**body(script(text="late", wait_ms=4000)), "stream": True}

    def ended_jobs() -> list[bytes | None]:
        records = [key for key in client.scan_iter("gateway:job:*") if b":" not in key[12:]]
        return sorted(client.hget(key, "ended") or b"" for key in records)

    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.stream("POST", f"{gateway.url}{path}", json=silent, timeout=1),
    ):
        pass
    wait_for(lambda: ended_jobs() == [b"cancelled"], 5, "the job cancelled")
    keyed = {"idempotency-key": "one-stream"}
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.stream("POST", f"{gateway.url}{path}", json=silent, headers=keyed, timeout=1),
    ):
        pass
    wait_for(lambda: ended_jobs() == [b"cancelled", b"completed"], 10, "the keyed job completes")
