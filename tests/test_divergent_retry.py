"""The model API cuts a stream and the CLI's retry says something else: no client ever receives
the cut text and the retried text joined as one answer.

Real SDK and CLI against the fake upstream, which drops the connection after four tokens and
answers the retry with other words. A live stream ends with a retryable
`retry_diverged` error after the cut text; the job goes on, and every reply built from its
events (a non-streamed answer, a retrieval, the session's history) has only the retried text.
"""

import json
import time
from typing import Any

import httpx
import pytest

from shared.jobs import Delta, Reasoning, Retraction, settled
from tests.conftest import Gateway, chat, sse_data
from tests.fake_anthropic import FakeAnthropic, Reply
from worker.backends.claude import _unsent
from worker.stops import StopMatcher

CUT = [f"a{i} " for i in range(10)]
SENT = "a0 a1 a2 a3 "  # what the upstream streams before it drops the connection
RETRIED = ["b0 ", "b1 ", "done."]  # parts from the cut text at once, whatever of it arrived
CLEAN = "b0 b1 done."


def _cut_then_diverge(upstream: FakeAnthropic) -> None:
    upstream.script.extend([Reply(tokens=CUT, cut_after=4, delay_s=0.05), Reply(tokens=RETRIED)])


def _cut_text(text: str) -> bool:
    """Whether a client got some of the cut text and nothing else (the connection's reset can
    discard the last tokens before the CLI read them)."""
    return bool(text) and SENT.startswith(text)


def _chat_stream(response: httpx.Response) -> tuple[str, list[dict[str, Any]]]:
    """The content a chat stream delivered, and its error chunks."""
    payloads = [json.loads(data) for data in sse_data(response) if data != "[DONE]"]
    errors = [payload["error"] for payload in payloads if "error" in payload]
    text = "".join(
        choice["delta"].get("content") or "" for payload in payloads for choice in payload.get("choices", [])
    )
    return text, errors


def _finished(gateway: Gateway, path: str) -> dict[str, Any]:
    """The retrieval at `path` once its job has ended."""
    for _ in range(300):
        body: dict[str, Any] = httpx.get(f"{gateway.url}{path}", timeout=10).json()
        if body.get("status") not in ("queued", "in_progress"):
            return body
        time.sleep(0.1)
    raise AssertionError(f"{path} did not end")


@pytest.mark.claude
def test_a_chat_stream_ends_with_a_retryable_error_and_the_job_keeps_the_clean_answer(
    claude: Gateway, upstream: FakeAnthropic
) -> None:
    _cut_then_diverge(upstream)
    response = httpx.post(f"{claude.url}/v1/chat/completions", json=chat("count", stream=True), timeout=60)
    assert response.status_code == 200, response.text
    text, errors = _chat_stream(response)
    assert _cut_text(text), text  # nothing of the retry joined to it
    assert [error["code"] for error in errors] == ["retry_diverged"]
    assert errors[0]["type"] == "server_error"
    assert len(upstream.requests) == 2  # it really was cut and retried

    completion_id = json.loads(sse_data(response)[0])["id"]
    retrieved = _finished(claude, f"/v1/chat/completions/{completion_id}")
    assert retrieved["choices"][0]["message"]["content"] == CLEAN

    # A client resuming after the last content it got is not handed the retried text either.
    last_id = [line for line in response.text.splitlines() if line.startswith("id: ")][-1][4:]
    resumed = httpx.get(
        f"{claude.url}/v1/chat/completions/{completion_id}",
        params={"stream": "true"},
        headers={"Last-Event-ID": last_id},
        timeout=30,
    )
    resumed_text, resumed_errors = _chat_stream(resumed)
    assert resumed_text == ""
    assert [error["code"] for error in resumed_errors] == ["retry_diverged"]


@pytest.mark.claude
def test_a_non_streamed_answer_and_the_session_keep_only_the_retried_text(
    claude: Gateway, upstream: FakeAnthropic
) -> None:
    _cut_then_diverge(upstream)
    answer = httpx.post(f"{claude.url}/v1/chat/completions", json=chat("count"), timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == CLEAN

    sid = "diverged-session-1"
    _cut_then_diverge(upstream)
    streamed = httpx.post(
        f"{claude.url}/v1/chat/completions", json=chat("count", stream=True, session_id=sid), timeout=60
    )
    text, errors = _chat_stream(streamed)
    assert _cut_text(text), text
    assert [error["code"] for error in errors] == ["retry_diverged"]
    messages: list[dict[str, Any]] = []
    for _ in range(300):  # the job goes on after the stream ended; its session exists once it commits
        session = httpx.get(f"{claude.url}/v1/sessions/{sid}", timeout=10)
        if session.status_code == 200 and len(messages := session.json()["messages"]) == 2:
            break
        time.sleep(0.1)
    assert [(m["role"], m["content"]) for m in messages] == [("user", "count"), ("assistant", CLEAN)]

    upstream.default = Reply(tokens=["next"])
    following = httpx.post(
        f"{claude.url}/v1/chat/completions", json=chat("again", session_id=sid), timeout=60
    )
    assert following.status_code == 200, following.text
    earlier = [
        block["text"]
        for message in upstream.requests[-1]["messages"]
        if message["role"] == "assistant"
        for block in (message["content"] if isinstance(message["content"], list) else [])
        if block.get("type") == "text"
    ]
    assert earlier == [CLEAN]  # the model's own transcript has the retried answer only


@pytest.mark.claude
def test_responses_and_messages_streams_end_with_their_own_error_event(
    claude: Gateway, upstream: FakeAnthropic
) -> None:
    _cut_then_diverge(upstream)
    body = {"model": "claude-sonnet-4-5", "input": "count", "stream": True}
    response = httpx.post(f"{claude.url}/v1/responses", json=body, timeout=60)
    events = [json.loads(data) for data in sse_data(response)]
    deltas = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    assert _cut_text(deltas), deltas
    assert events[-1]["type"] == "error"
    assert events[-1]["code"] == "retry_diverged"
    assert events[-1]["sequence_number"] == events[-2]["sequence_number"]  # the next is a real event's
    retrieved = _finished(claude, f"/v1/responses/{events[0]['response']['id']}")
    assert retrieved["output"][-1]["content"][0]["text"] == CLEAN

    _cut_then_diverge(upstream)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": True}
    body["messages"] = [{"role": "user", "content": "count"}]
    response = httpx.post(f"{claude.url}/v1/messages", json=body, timeout=60)
    events = [json.loads(data) for data in sse_data(response)]
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    assert _cut_text(text), text
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["type"] == "api_error"
    # Found by an outside probe: it said to retrieve the job by this stream's id, which Messages has not.
    said = events[-1]["error"]["message"]
    assert said.endswith("a Messages stream cannot be resumed or retrieved: send the request again."), said
    assert "retrieval" not in said


def test_a_retry_that_parts_from_the_cut_text_withdraws_from_where_they_part() -> None:
    assert _unsent("a0 a1 ", "a0 a1 a2 ") == (0, "", "a2 ")  # repeating: swallowed
    assert _unsent("a2 a3", "a2 ") == (0, "a3", "")  # repeated, then new
    assert _unsent("a2 b3", "a2 a3 ") == (3, "b3", "")  # parts after "a2 ": "a3 " withdrawn
    assert _unsent("b2", "a2 a3 ") == (6, "b2", "")


def test_settled_events_apply_a_retraction_across_deltas_and_activity() -> None:
    events = [Delta(text="ab"), Delta(text="cd"), Reasoning(text="hm"), Retraction(chars=3), Delta(text="XY")]
    assert settled(events) == [Delta(text="a"), Reasoning(text="hm"), Delta(text="XY")]


def test_a_stop_sequence_matcher_drops_held_text_before_withdrawing_sent_text() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abcST") == ("abc", None)  # "ST" held: it could begin the stop sequence
    assert matcher.withdraw(4) == 2  # the held "ST" goes; "bc" were emitted
    assert matcher.flush() == ""
