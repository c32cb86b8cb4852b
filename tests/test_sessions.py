"""Sessions on the scripted backend: real Redis, real API and worker processes.

The scripted backend's `{"echo": true}` script replies with the conversation it was given before
the last message, so these tests see exactly which history reached the worker.
"""

import json
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

from shared import sessions
from shared.keys import session_lock_key
from tests.conftest import Gateway, assert_documented, assert_schema, chat, sse_data

ECHO = 'script:{"text": "", "echo": true}'
DEFAULT_REPLY = "Hello from the scripted backend."


def _sid() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def _post(gateway: Gateway, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def _reply(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def _assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert_schema(response.json(), "ErrorResponse")
    assert response.json()["error"]["code"] == code


def _session(gateway: Gateway, session_id: str) -> dict[str, Any]:
    response = httpx.get(f"{gateway.url}/v1/sessions/{session_id}", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _messages(gateway: Gateway, session_id: str) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in _session(gateway, session_id)["messages"]]


def test_later_turns_see_earlier_ones_streamed_or_not_by_body_or_header(scripted: Gateway) -> None:
    sid = _sid()
    assert _reply(_post(scripted, chat("first question", session_id=sid))) == DEFAULT_REPLY
    streamed = _post(scripted, chat(ECHO, stream=True), **{"X-Session-Id": sid})
    assert streamed.status_code == 200, streamed.text
    chunks = [json.loads(d) for d in sse_data(streamed)[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == f"user: first question\nassistant: {DEFAULT_REPLY}"
    third = _reply(_post(scripted, chat(ECHO, session_id=sid)))
    assert third == f"user: first question\nassistant: {DEFAULT_REPLY}\nuser: {ECHO}\nassistant: {text}"
    info = _session(scripted, sid)
    assert info["message_count"] == 6
    assert info["expires_at"] - info["last_used_at"] == 3600


def test_a_session_continues_on_every_front_end_by_body_or_header(scripted: Gateway) -> None:
    # The body's `session_id` was chat's only: Responses and Messages ran such a turn stateless.
    sid = _sid()
    assert _reply(_post(scripted, chat("first question", session_id=sid))) == DEFAULT_REPLY
    history = f"user: first question\nassistant: {DEFAULT_REPLY}"
    responses = f"{scripted.url}/v1/responses"
    for in_body, headers in (({"session_id": sid}, {}), ({}, {"X-Session-Id": sid})):
        body = {"model": "claude-sonnet-4-5", "input": ECHO, **in_body}
        response = httpx.post(responses, json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["output"][0]["content"][0]["text"].startswith(history)
    messages = f"{scripted.url}/v1/messages"
    body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": ECHO}]}
    response = httpx.post(messages, json={**body, "session_id": sid}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["content"][0]["text"].startswith(history)
    assert _session(scripted, sid)["message_count"] == 8
    # The body and the header must agree, on every front end.
    mismatched = httpx.post(messages, json={**body, "session_id": sid}, headers={"X-Session-Id": "other"})
    assert mismatched.status_code == 400
    assert mismatched.json()["error"]["message"].startswith("The session_id field and the X-Session-Id")


def test_a_response_made_in_a_session_is_continued_in_it(scripted: Gateway) -> None:
    # Found by an outside probe: its previous_response_id alone continued it without the session's
    # earlier turns (the response keeps only its request's messages; the session holds the rest).
    sid, responses = _sid(), f"{scripted.url}/v1/responses"
    assert _reply(_post(scripted, chat("first question", session_id=sid))) == DEFAULT_REPLY
    body = {"model": "claude-sonnet-4-5", "input": "second question", "session_id": sid}
    second = httpx.post(responses, json=body, timeout=60)
    assert second.status_code == 200, second.text
    history = (
        f"user: first question\nassistant: {DEFAULT_REPLY}\nuser: second question\nassistant: {DEFAULT_REPLY}"
    )
    again = {**body, "input": ECHO, "previous_response_id": second.json()["id"]}
    third = httpx.post(responses, json=again, timeout=60)
    assert third.status_code == 200, third.text
    assert third.json()["output"][0]["content"][0]["text"] == history  # each turn once
    del again["session_id"]
    _assert_error(httpx.post(responses, json=again, timeout=60), 400, "previous_response_in_session")
    assert _session(scripted, sid)["message_count"] == 6
    # Its session deleted, or started anew under the same id: its conversation is gone (a probe
    # got a 200 built on no history, or on the new session's).
    assert httpx.delete(f"{scripted.url}/v1/sessions/{sid}", timeout=10).status_code == 200
    assert _reply(_post(scripted, chat("another conversation", session_id=sid))) == DEFAULT_REPLY
    gone = httpx.post(responses, json={**again, "session_id": sid}, timeout=60)
    _assert_error(gone, 400, "previous_response_session_gone")
    assert _session(scripted, sid)["message_count"] == 2


def test_a_client_resending_the_whole_history_gets_no_duplicates(scripted: Gateway) -> None:
    sid = _sid()
    history = [{"role": "user", "content": "one"}]
    history.append({"role": "assistant", "content": _reply(_post(scripted, chat("one", session_id=sid)))})
    body = {
        "model": "claude-sonnet-4-5",
        "session_id": sid,
        "messages": [*history, {"role": "user", "content": ECHO}],
    }
    assert _reply(_post(scripted, body)) == f"user: one\nassistant: {DEFAULT_REPLY}"
    assert [role for role, _ in _messages(scripted, sid)] == ["user", "assistant", "user", "assistant"]
    # System messages are per request and never part of the history: resending them changes nothing.
    resent = [{"role": role, "content": text} for role, text in _messages(scripted, sid)]
    body["messages"] = [
        {"role": "system", "content": "be brief"},
        *resent,
        {"role": "user", "content": "three"},
    ]
    assert _reply(_post(scripted, body)) == DEFAULT_REPLY
    assert len(_messages(scripted, sid)) == 6


def test_a_resent_history_that_differs_from_the_session_is_refused(scripted: Gateway) -> None:
    sid = _sid()
    _reply(_post(scripted, chat("one", session_id=sid)))
    body = {
        "model": "claude-sonnet-4-5",
        "session_id": sid,
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "not what the session holds"},
            {"role": "user", "content": "two"},
        ],
    }
    _assert_error(_post(scripted, body), 400, "session_history_mismatch")
    assert len(_messages(scripted, sid)) == 2
    assert _reply(_post(scripted, chat("two", session_id=sid))) == DEFAULT_REPLY  # not left locked


def test_a_second_request_on_a_busy_session_gets_409_and_the_history_stays_whole(scripted: Gateway) -> None:
    sid = _sid()
    slow = 'script:{"text": "slow reply", "tokens": 100, "delay_ms": 50}'  # 5 s: outlasts a loaded moment
    results: dict[str, httpx.Response] = {}
    first = threading.Thread(target=lambda: results.update(first=_post(scripted, chat(slow, session_id=sid))))
    first.start()
    redis = scripted.redis()
    deadline = time.monotonic() + 20
    while not redis.exists(session_lock_key(sessions.owner_of("anonymous"), sid)):
        assert time.monotonic() < deadline, "the first request never took the session"
        time.sleep(0.01)
    _assert_error(_post(scripted, chat("meanwhile", session_id=sid)), 409, "session_busy")
    _assert_error(_post(scripted, chat("meanwhile", session_id=sid, stream=True)), 409, "session_busy")
    # Its first turn: deleting it now is "busy", not "not found" (it exists once the turn ends).
    _assert_error(httpx.delete(f"{scripted.url}/v1/sessions/{sid}", timeout=10), 409, "session_busy")
    first.join(timeout=60)
    assert _reply(results["first"]).startswith("slow reply")
    assert [text for _, text in _messages(scripted, sid)] == [
        slow,
        results["first"].json()["choices"][0]["message"]["content"],
    ]
    assert _reply(_post(scripted, chat(ECHO, session_id=sid))).startswith(f"user: {slow}")


def test_a_failed_request_leaves_the_session_as_it_was(scripted: Gateway) -> None:
    sid = _sid()
    _reply(_post(scripted, chat("one", session_id=sid)))
    failing = 'script:{"text": "half a reply", "fail_after": 2}'
    _assert_error(_post(scripted, chat(failing, session_id=sid)), 502, "upstream_error")
    streamed = _post(scripted, chat(failing, session_id=sid, stream=True))  # fails after two tokens
    assert streamed.status_code == 200
    assert json.loads(sse_data(streamed)[-2])["error"]["code"] == "upstream_error"
    assert _messages(scripted, sid) == [("user", "one"), ("assistant", DEFAULT_REPLY)]
    assert _reply(_post(scripted, chat(ECHO, session_id=sid))) == f"user: one\nassistant: {DEFAULT_REPLY}"


def test_a_failed_first_request_creates_no_session(scripted: Gateway) -> None:
    sid = _sid()
    _assert_error(
        _post(scripted, chat('script:{"text": "x", "fail_after": 0}', session_id=sid)), 502, "upstream_error"
    )
    assert httpx.get(f"{scripted.url}/v1/sessions/{sid}", timeout=10).status_code == 404
    assert not scripted.redis().keys(f"*{sid}*")


def test_list_get_stats_delete(scripted: Gateway) -> None:
    sid = _sid()
    _reply(_post(scripted, chat("one", session_id=sid)))
    listed = httpx.get(f"{scripted.url}/v1/sessions", timeout=10).json()
    assert listed["object"] == "list"
    assert sid in [s["id"] for s in listed["data"]]
    # The original wrapper's names, beside today's.
    assert listed["sessions"] == listed["data"]
    assert listed["total"] == len(listed["data"])
    assert all(s["session_id"] == s["id"] and s["last_accessed"] == s["last_used_at"] for s in listed["data"])
    assert_documented(scripted, "get", "/v1/sessions", listed)
    stats = httpx.get(f"{scripted.url}/v1/sessions/stats", timeout=10).json()
    assert stats["active_sessions"] == len(listed["data"])
    assert stats["total_messages"] == sum(s["message_count"] for s in listed["data"])
    assert stats["ttl_seconds"] == 3600
    assert stats["default_ttl_hours"] == 1
    assert stats["session_stats"] == {k: stats[k] for k in ("active_sessions", "total_messages")}
    assert_documented(scripted, "get", "/v1/sessions/stats", stats)
    deleted = httpx.delete(f"{scripted.url}/v1/sessions/{sid}", timeout=10)
    message = f"Session {sid} deleted successfully"
    assert deleted.json() == {"id": sid, "object": "session.deleted", "deleted": True, "message": message}
    assert_documented(scripted, "delete", "/v1/sessions/{session_id}", deleted.json())
    assert not scripted.redis().keys(f"*{sid}*")
    _assert_error(httpx.get(f"{scripted.url}/v1/sessions/{sid}", timeout=10), 404, "session_not_found")
    _assert_error(httpx.delete(f"{scripted.url}/v1/sessions/{sid}", timeout=10), 404, "session_not_found")
    assert sid not in [s["id"] for s in httpx.get(f"{scripted.url}/v1/sessions", timeout=10).json()["data"]]
    # The same id afterwards is a new, empty session.
    assert _reply(_post(scripted, chat(ECHO, session_id=sid))) == "(no earlier turns)"


@pytest.mark.parametrize(
    "bad",
    ["../x", "..", "a/b", "x" * 10_240, "a\x00b", "a\nb", "a\x1fb", "", " a", "a:b", "ü"],
)
def test_bad_session_ids_are_refused_before_reaching_redis(scripted: Gateway, bad: str) -> None:
    before = set(scripted.redis().keys("*session*"))
    _assert_error(_post(scripted, chat("hi", session_id=bad)), 400, "invalid_session_id")
    assert set(scripted.redis().keys("*session*")) == before


def test_bad_ids_in_headers_and_paths(scripted: Gateway) -> None:
    _assert_error(_post(scripted, chat("hi"), **{"X-Session-Id": "../x"}), 400, "invalid_session_id")
    _assert_error(
        _post(scripted, chat("hi", session_id="a"), **{"X-Session-Id": "b"}), 400, "invalid_session_id"
    )
    for path in ("..%2Fx", "x" * 10_240, "a%00b", "a%0Ab", "%2E%2E"):
        response = httpx.get(f"{scripted.url}/v1/sessions/{path}", timeout=10)
        assert response.status_code in (400, 404), (path, response.status_code)
        assert_schema(response.json(), "ErrorResponse")
        assert httpx.delete(f"{scripted.url}/v1/sessions/{path}", timeout=10).status_code in (400, 404)
    _assert_error(
        httpx.get(f"{scripted.url}/v1/sessions/{'x' * 10_240}", timeout=10), 400, "invalid_session_id"
    )


def test_another_keys_session_is_not_found(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", API_KEYS="first-caller-key,other-caller-key"
    )
    a, b = {"authorization": "Bearer first-caller-key"}, {"authorization": "Bearer other-caller-key"}
    sid = _sid()
    _reply(_post(gateway, chat("mine", session_id=sid), **a))
    for method in ("GET", "DELETE"):
        response = httpx.request(method, f"{gateway.url}/v1/sessions/{sid}", headers=b, timeout=10)
        _assert_error(response, 404, "session_not_found")
    assert httpx.get(f"{gateway.url}/v1/sessions", headers=b, timeout=10).json()["data"] == []
    stats = httpx.get(f"{gateway.url}/v1/sessions/stats", headers=b, timeout=10).json()
    assert stats["active_sessions"] == 0
    # The same id under key B is another conversation: it does not see key A's turns.
    assert _reply(_post(gateway, chat(ECHO, session_id=sid), **b)) == "(no earlier turns)"
    mine = httpx.get(f"{gateway.url}/v1/sessions/{sid}", headers=a, timeout=10).json()
    assert [(m["role"], m["content"]) for m in mine["messages"]] == [
        ("user", "mine"),
        ("assistant", DEFAULT_REPLY),
    ]
