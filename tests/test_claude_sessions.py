"""A session on the real Claude path, carried across worker processes.

Real SDK and CLI, the fake Anthropic upstream, real Redis. Turns are forced onto different worker
processes by keeping exactly one worker alive per turn (the other stopped, or restarted): each
later turn must reach the upstream with the earlier turns as real user/assistant messages.
"""

import json
from typing import Any

import httpx
import pytest

from shared import sessions
from shared.keys import transcript_key
from tests.conftest import Gateway, chat, claude_env, sse_data
from tests.fake_anthropic import FakeAnthropic, Reply, tool_results

pytestmark = pytest.mark.claude


def _conversation(body: dict[str, Any]) -> list[tuple[str, str]]:
    """The upstream request's messages as (role, text), without the CLI's injected reminders."""
    turns = []
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            texts = [content]
        else:
            texts = [
                block["text"]
                for block in content
                if block.get("type") == "text" and not block["text"].startswith("<system-reminder>")
            ]
        turns.append((message["role"], "".join(texts)))
    return turns


def _only_worker(gateway: Gateway) -> None:
    """Stops every worker but the newest, so the next turn can only run there."""
    *older, _ = [w for w in gateway.workers if w.poll() is None]
    for worker in older:
        worker.terminate()
        worker.wait(timeout=70)  # its drain (DRAIN_TIMEOUT_S, 50 s) and CLOSE_BOUND_S bound its exit


@pytest.fixture(scope="module")
def claude_fleet(start_gateway: Any, fake_anthropic: FakeAnthropic) -> Gateway:
    gateway: Gateway = start_gateway(workers=1, **claude_env(fake_anthropic))
    return gateway


def test_a_session_continues_across_workers_and_restarts(
    claude_fleet: Gateway, upstream: FakeAnthropic
) -> None:
    url = f"{claude_fleet.url}/v1/chat/completions"
    sid = "acceptance-1"
    first_worker = claude_fleet.workers[0]

    upstream.default = Reply(tokens=["first", " answer"])
    first = httpx.post(url, json=chat("turn one", session_id=sid), timeout=120)
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["content"] == "first answer"
    assert _conversation(upstream.requests[-1]) == [("user", "turn one")]

    # Turn two on a second worker process; the first is stopped.
    claude_fleet.start_worker()
    _only_worker(claude_fleet)
    assert first_worker.poll() is not None
    upstream.default = Reply(tokens=["second", " answer"])
    second = httpx.post(url, json=chat("turn two", stream=True), headers={"X-Session-Id": sid}, timeout=120)
    assert second.status_code == 200, second.text
    chunks = [json.loads(d) for d in sse_data(second)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "second answer"
    assert _conversation(upstream.requests[-1]) == [
        ("user", "turn one"),
        ("assistant", "first answer"),
        ("user", "turn two"),
    ]

    # Turn three on a restarted worker (the second one stopped), the client resending everything.
    claude_fleet.start_worker()
    _only_worker(claude_fleet)
    upstream.default = Reply(tokens=["third", " answer"])
    requests_before = len(upstream.requests)
    resent = {
        "model": "claude-sonnet-4-5",
        "session_id": sid,
        "messages": [
            {"role": "user", "content": "turn one"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "turn two"},
            {"role": "assistant", "content": "second answer"},
            {"role": "user", "content": "turn three"},
        ],
    }
    third = httpx.post(url, json=resent, timeout=120)
    assert third.status_code == 200, third.text
    assert len(upstream.requests) == requests_before + 1
    assert _conversation(upstream.requests[-1]) == [
        ("user", "turn one"),
        ("assistant", "first answer"),
        ("user", "turn two"),
        ("assistant", "second answer"),
        ("user", "turn three"),
    ]

    info = httpx.get(f"{claude_fleet.url}/v1/sessions/{sid}", timeout=10).json()
    assert [m["content"] for m in info["messages"]] == [
        "turn one",
        "first answer",
        "turn two",
        "second answer",
        "turn three",
        "third answer",
    ]
    # The Claude Code transcript lives in Redis under the session's owner, with the session's TTL.
    redis = claude_fleet.redis()
    record = redis.hgetall(f"gateway:session:{sessions.owner_of('anonymous')}:{sid}")
    transcript = transcript_key(sessions.owner_of("anonymous"), record[b"transcript"].decode())
    assert redis.llen(f"{transcript}:main") > 0
    assert 0 < redis.ttl(f"{transcript}:main") <= 3600

    # Deleting the session deletes the transcript too.
    assert httpx.delete(f"{claude_fleet.url}/v1/sessions/{sid}", timeout=10).status_code == 200
    assert not redis.keys(f"{transcript}*")


@pytest.mark.parametrize("failing", ["upstream", "workspace"])
def test_a_failed_turn_adds_nothing_to_the_transcript(
    claude_fleet: Gateway, upstream: FakeAnthropic, failing: str
) -> None:
    """A turn that fails adds nothing: also one refused at its commit, whose files went over
    WORKSPACE_MAX_BYTES (found by an outside probe: it got 413, "nothing was saved", after its
    transcript had been stored at the CLI's result, and every later turn, on any worker, resumed
    a turn the session never had: a file the model believed made)."""
    url = f"{claude_fleet.url}/v1/chat/completions"
    sid = f"failed-turn-{failing}"
    upstream.default = Reply(tokens=["kept"])
    assert httpx.post(url, json=chat("first", session_id=sid), timeout=120).status_code == 200
    if failing == "upstream":
        upstream.default, status = Reply(status=500), 502
    else:
        too_big = Reply(tool_use=("Bash", {"command": "truncate -s 200M big.bin", "description": "fill"}))
        upstream.script.extend([too_big, Reply(tokens=["made it"])])
        status = 413
    failed = httpx.post(url, json=chat("lost", session_id=sid), timeout=120)
    assert failed.status_code == status, failed.text
    upstream.default = Reply(tokens=["again"])
    assert httpx.post(url, json=chat("second", session_id=sid), timeout=120).status_code == 200
    assert _conversation(upstream.requests[-1]) == [
        ("user", "first"),
        ("assistant", "kept"),
        ("user", "second"),
    ]


def test_a_sessions_files_keep_their_absolute_paths_on_every_worker(
    claude_fleet: Gateway, upstream: FakeAnthropic
) -> None:
    """Found by an outside probe: the session's directory was at a path naming its worker, so the
    absolute paths of earlier turns (Read, Write and Edit take no other) broke once a turn ran on
    another worker. In the sandbox it now has one path on every worker."""
    url = f"{claude_fleet.url}/v1/chat/completions"
    sid = "absolute-paths"

    def turn(command: str) -> list[str]:
        """The command's output lines (the CLI may add a reminder after them)."""
        upstream.script.extend([Reply(tool_use=("Bash", {"command": command, "description": "x"})), Reply()])
        assert httpx.post(url, json=chat("go", session_id=sid), timeout=120).status_code == 200
        return tool_results(upstream.requests[-1])[-1].splitlines()

    where = turn("echo kept > notes.txt && pwd")[0]
    assert where.startswith("/"), where
    claude_fleet.start_worker()
    _only_worker(claude_fleet)  # the next turn runs on another worker, with its own copy
    assert turn(f"cat {where}/notes.txt && pwd")[:2] == ["kept", where]


def test_a_turn_cut_by_max_tokens_is_continued(claude_fleet: Gateway, upstream: FakeAnthropic) -> None:
    url = f"{claude_fleet.url}/v1/chat/completions"
    sid = "acceptance-3"
    upstream.default = Reply(tokens=["cut", " off"], stop_reason="max_tokens")
    cut = httpx.post(url, json=chat("long story", session_id=sid, max_tokens=16), timeout=120)
    assert cut.status_code == 200, cut.text
    assert cut.json()["choices"][0]["finish_reason"] == "length"
    # The CLI was stopped mid-turn, before it stored that turn's transcript: the next turn starts
    # a transcript with the session's history as context in its prompt (docs/sessions.md) ...
    upstream.default = Reply(tokens=["fine"])
    assert httpx.post(url, json=chat("next", session_id=sid), timeout=120).status_code == 200
    [(role, prompt)] = _conversation(upstream.requests[-1])
    assert role == "user"
    assert prompt.index("long story") < prompt.index("cut off") < prompt.index("next")
    assert prompt.endswith("next")
    # ... and the turns after it resume that transcript as real turns again.
    upstream.default = Reply(tokens=["done"])
    assert httpx.post(url, json=chat("third", session_id=sid), timeout=120).status_code == 200
    assert _conversation(upstream.requests[-1]) == [
        ("user", prompt),
        ("assistant", "fine"),
        ("user", "third"),
    ]


@pytest.mark.parametrize("stop", ["max_tokens", "refusal"])
def test_a_later_turn_cut_short_is_in_what_the_model_sees_next(
    claude_fleet: Gateway, upstream: FakeAnthropic, stop: str
) -> None:
    """Found by an outside probe: a turn cut by a token limit or a refusal after the session's
    first turn was in the session's history but not in its stored transcript, which the next turn
    resumed: the model never saw it. The transcript is dropped then, and the next turn starts a
    new one with the whole history as context."""
    url = f"{claude_fleet.url}/v1/chat/completions"
    sid = f"cut-later-{stop}"
    upstream.default = Reply(tokens=["Hi Ada"])
    assert httpx.post(url, json=chat("I am Ada", session_id=sid), timeout=120).status_code == 200
    upstream.default = Reply(tokens=["I will", " not"], stop_reason=stop)
    cut = httpx.post(url, json=chat("bad ask", session_id=sid, max_tokens=16), timeout=120)
    assert cut.status_code == 200, cut.text
    upstream.default = Reply(tokens=["fine"])
    assert httpx.post(url, json=chat("third", session_id=sid), timeout=120).status_code == 200
    [(role, prompt)] = _conversation(upstream.requests[-1])
    assert role == "user"
    said = [prompt.index(text) for text in ("I am Ada", "Hi Ada", "bad ask", "I will not", "third")]
    assert said == sorted(said), prompt
