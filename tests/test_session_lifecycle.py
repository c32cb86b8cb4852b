"""Sessions over time, on gateways of their own: sliding expiry, and a job cancelled mid-turn."""

import threading
import time
import uuid
from typing import Any

import httpx
import pytest

from api.deps import ANONYMOUS
from shared import sessions
from shared.keys import response_key, session_lock_key
from tests.conftest import Gateway, chat

ECHO = 'script:{"text": "", "echo": true}'
DEFAULT_REPLY = "Hello from the scripted backend."
_TTL_S = 3


def _post(gateway: Gateway, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60)


def _reply(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


@pytest.fixture(scope="module")
def short_lived(start_gateway: Any) -> Gateway:
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", SESSION_TTL_S=str(_TTL_S))
    return gateway


def test_an_idle_session_expires_from_redis_and_the_listing_then_starts_fresh(short_lived: Gateway) -> None:
    sid = f"exp-{uuid.uuid4().hex[:8]}"
    redis = short_lived.redis()
    _reply(_post(short_lived, chat("one", session_id=sid)))
    keys = redis.keys(f"*{sid}*")
    assert len(keys) == 2  # record and history (the lock is gone with the turn)
    assert all(0 < redis.ttl(key) <= _TTL_S for key in keys)
    # Sliding: each use restarts the clock, so two turns 2 s apart outlive a 3 s TTL.
    time.sleep(2)
    assert _reply(_post(short_lived, chat(ECHO, session_id=sid))) == f"user: one\nassistant: {DEFAULT_REPLY}"
    time.sleep(2)
    assert redis.exists(*keys) == 2
    # Idle past the TTL: gone from Redis, from the listing and the stats (bound: 10 s).
    deadline = time.monotonic() + 10
    while redis.keys(f"*{sid}*"):
        assert time.monotonic() < deadline, "the session did not expire"
        time.sleep(0.2)
    listed = httpx.get(f"{short_lived.url}/v1/sessions", timeout=10).json()
    assert sid not in [s["id"] for s in listed["data"]]
    assert httpx.get(f"{short_lived.url}/v1/sessions/stats", timeout=10).json()["active_sessions"] == 0
    assert httpx.get(f"{short_lived.url}/v1/sessions/{sid}", timeout=10).status_code == 404
    # The same id now names a new, empty session.
    assert _reply(_post(short_lived, chat(ECHO, session_id=sid))) == "(no earlier turns)"


def test_a_turn_longer_than_the_ttl_keeps_its_session_and_files(short_lived: Gateway) -> None:
    """Found by an outside probe: a session's clock restarted when a turn began and ran out under
    it, so a turn longer than the TTL lost the history and the files uploaded before it (the turn
    then failed with a 500, or made a new session without the files)."""
    sid = f"long-{uuid.uuid4().hex[:8]}"
    files = {"file": ("input.csv", b"a,b\n1,2\n")}
    uploaded = httpx.post(f"{short_lived.url}/v1/sessions/{sid}/files", files=files, timeout=10)
    assert uploaded.status_code == 200, uploaded.text
    _reply(_post(short_lived, chat("one", session_id=sid)))
    slow = 'script:{"text": "slow ", "tokens": 100, "delay_ms": 50}'  # 5 s, past the 3 s TTL
    assert _reply(_post(short_lived, chat(slow, session_id=sid))).startswith("slow slow")
    session = httpx.get(f"{short_lived.url}/v1/sessions/{sid}", timeout=10)
    assert session.status_code == 200, session.text
    assert session.json()["message_count"] == 4
    listed = httpx.get(f"{short_lived.url}/v1/sessions/{sid}/files", timeout=10).json()
    assert [file["path"] for file in listed["data"]] == ["input.csv"]


def test_a_turn_that_ends_without_a_reply_restarts_the_sessions_clock(short_lived: Gateway) -> None:
    """Found by an outside probe: a failed, refused or cancelled turn left its session kept for
    the turn's longest (half an hour and more past SESSION_TTL_S), its `expires_at` long past."""
    sid = f"clock-{uuid.uuid4().hex[:8]}"
    redis = short_lived.redis()
    _reply(_post(short_lived, chat("one", session_id=sid)))

    def kept_for_the_ttl() -> None:
        keys = redis.keys(f"*{sid}*")
        assert len(keys) == 2  # record and history: alive, and no lock
        assert all(0 < redis.ttl(key) <= _TTL_S for key in keys), [redis.ttl(key) for key in keys]
        expires_at = httpx.get(f"{short_lived.url}/v1/sessions/{sid}", timeout=10).json()["expires_at"]
        assert time.time() - 1 <= expires_at <= time.time() + _TTL_S + 1

    failed = _post(short_lived, chat('script:{"text": "x", "fail_after": 0}', session_id=sid))
    assert failed.status_code == 502, failed.text
    kept_for_the_ttl()
    body = chat("y", session_id=sid)
    body["messages"] = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "no"},
        *body["messages"],
    ]
    refused = _post(short_lived, body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "session_history_mismatch"
    kept_for_the_ttl()
    slow = 'script:{"text": "never finished", "tokens": 400, "delay_ms": 50}'
    queued = _post(short_lived, chat(slow, session_id=sid, background=True)).json()
    url = f"{short_lived.url}/v1/chat/completions/{queued['id']}"
    assert httpx.post(f"{url}/cancel", timeout=10).status_code == 200
    deadline = time.monotonic() + 2
    while redis.keys(f"*{sid}*:lock"):
        assert time.monotonic() < deadline, "the cancelled turn kept the session"
        time.sleep(0.05)
    kept_for_the_ttl()


@pytest.fixture
def impatient(start_gateway: Any) -> Gateway:
    """One worker that cancels running jobs at once on SIGTERM."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", DRAIN_TIMEOUT_S="0")
    return gateway


def test_a_job_cancelled_mid_turn_leaves_the_session_as_it_was(impatient: Gateway) -> None:
    sid = f"cancel-{uuid.uuid4().hex[:8]}"
    redis = impatient.redis()
    _reply(_post(impatient, chat("one", session_id=sid)))
    slow = 'script:{"text": "never finished", "tokens": 400, "delay_ms": 50}'
    results: dict[str, httpx.Response] = {}
    request = threading.Thread(target=lambda: results.update(r=_post(impatient, chat(slow, session_id=sid))))
    request.start()
    lock = session_lock_key(sessions.owner_of("anonymous"), sid)
    deadline = time.monotonic() + 20
    while not (redis.exists(lock) and len(redis.keys("gateway:job:*:events")) == 2):  # it is streaming
        assert time.monotonic() < deadline, "the slow job never started"
        time.sleep(0.02)
    impatient.workers[0].terminate()
    impatient.workers[0].wait(timeout=20)
    request.join(timeout=60)
    assert results["r"].status_code == 503
    assert results["r"].json()["error"]["code"] == "worker_shutdown"
    assert not redis.exists(lock)
    history = httpx.get(f"{impatient.url}/v1/sessions/{sid}", timeout=10).json()["messages"]
    assert [m["content"] for m in history] == ["one", DEFAULT_REPLY]
    impatient.start_worker()
    assert _reply(_post(impatient, chat(ECHO, session_id=sid))) == f"user: one\nassistant: {DEFAULT_REPLY}"


def test_a_job_no_worker_starts_releases_its_session(start_gateway: Any) -> None:
    workerless: Gateway = start_gateway(workers=0, BACKEND="scripted", QUEUE_TIMEOUT_S="1")
    sid = f"queued-{uuid.uuid4().hex[:8]}"
    response = _post(workerless, chat("hi", session_id=sid))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "queue_timeout"
    assert not workerless.redis().keys(f"*{sid}*")  # no lock left behind, no session created


def test_a_turn_holds_its_session_as_long_as_its_attempts_may_wait_and_run(start_gateway: Any) -> None:
    """Found by an outside probe: a background turn's lock was held for a plain turn's queue
    timeout; the turn waited longer, a second turn was let in, and the first one's reply was
    thrown away once it ran."""
    workerless: Gateway = start_gateway(
        workers=0,
        BACKEND="scripted",
        QUEUE_TIMEOUT_S="5",
        BACKGROUND_QUEUE_TIMEOUT_S="500",
        JOB_TIMEOUT_S="10",
    )
    sid = f"background-{uuid.uuid4().hex[:8]}"
    queued = _post(workerless, chat("hi", session_id=sid, background=True))
    assert queued.status_code == 200, queued.text
    held_ms = workerless.redis().pttl(session_lock_key(sessions.owner_of(ANONYMOUS), sid))
    # Its queue timeout and its time limit for each attempt (MAX_ATTEMPTS, 3), not 5 + 10 s; a
    # re-check probe's third attempt outlived one of them.
    assert held_ms > 3 * 510_000, held_ms
    assert _post(workerless, chat("again", session_id=sid)).status_code == 409


def test_a_background_job_waiting_longer_than_the_event_ttl_is_still_there(start_gateway: Any) -> None:
    """Found by a re-check probe: with EVENT_TTL_S under BACKGROUND_QUEUE_TIMEOUT_S, a queued
    background job's record expired before any worker started it: the job was gone (404), never
    failed, and its session stayed locked."""
    workerless: Gateway = start_gateway(workers=0, BACKEND="scripted", EVENT_TTL_S="60")
    queued = _post(workerless, chat("hi", session_id=f"wait-{uuid.uuid4().hex[:8]}", background=True))
    assert queued.status_code == 200, queued.text
    job_id = queued.json()["id"].removeprefix("chatcmpl-")
    record_ttl_s = workerless.redis().ttl(f"gateway:job:{job_id}")
    assert record_ttl_s > 600, record_ttl_s  # its wait (BACKGROUND_QUEUE_TIMEOUT_S, 600 s), then the TTL
    # A stored background response outlives every attempt of its job (a re-check probe: one only).
    body = {"model": "claude-sonnet-4-5", "input": "hi", "background": True}
    response = httpx.post(f"{workerless.url}/v1/responses", json=body, timeout=10)
    assert response.status_code == 200, response.text
    stored_ttl_s = workerless.redis().ttl(response_key(response.json()["id"].removeprefix("resp_")))
    assert stored_ttl_s >= 60 + 3 * (600 + 600) - 1, stored_ttl_s
