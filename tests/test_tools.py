"""`/v1/tools` and `/v1/tools/config` on the scripted backend: what a caller's jobs may use, the
operator's global defaults, a caller's per-session defaults, and who may see which. What a job
got is read from its queued payload (the Claude path is `tests/test_claude_tools.py`)."""

import re
import time
from typing import Any

import httpx
import pytest

from shared.jobs import CompletionJob
from shared.keys import record_key
from tests.conftest import Gateway, assert_documented, chat
from tests.test_access import assert_error, bearer, new_key

OPERATOR = "operator-key-of-the-tools-tests"


@pytest.fixture(scope="module")
def gateway(start_gateway: Any) -> Gateway:
    started: Gateway = start_gateway(
        workers=1,
        BACKEND="scripted",
        API_KEY=OPERATOR,
        CLAUDE_TOOLS='["Read", "Bash", "Glob"]',
        CLAUDE_DISALLOWED_TOOLS='["Glob"]',
        SCRIPTED_DELAY_MS="200",  # a background job lives a second: its payload can be read
    )
    return started


@pytest.fixture(scope="module")
def callers(gateway: Gateway) -> tuple[dict[str, str], dict[str, str]]:
    return bearer(new_key(gateway, "a")[1]), bearer(new_key(gateway, "b")[1])


def _agent(
    gateway: Gateway, headers: dict[str, str], body: dict[str, Any], path: str = "/v1/chat/completions"
) -> dict[str, Any]:
    """The agent of the job a request queued, read from its payload while the job is alive (a
    background job, whose slow scripted reply keeps it so; an ended job's payload is dropped)."""
    response = httpx.post(
        f"{gateway.url}{path}", json=body | {"background": True}, headers=headers, timeout=30
    )
    assert response.status_code == 200, response.text
    job_id = response.json()["id"].partition("-" if path.endswith("completions") else "_")[2]
    payload = gateway.redis().hget(record_key(job_id), "payload")
    assert payload is not None
    return CompletionJob.model_validate_json(payload).agent.model_dump()


_STREAMED_JOB = re.compile(r'"(?:chatcmpl-|msg_)([0-9a-f]{32})"')


def _streamed_agent(
    gateway: Gateway, headers: dict[str, str], body: dict[str, Any], path: str
) -> dict[str, Any]:
    """The agent of a streamed request's (first) job, read from its payload while its slow reply
    streams: the entry points that take no `background` (Messages, chat with `n > 1`)."""
    url = f"{gateway.url}{path}"
    with httpx.stream("POST", url, json=body | {"stream": True}, headers=headers, timeout=30) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if found := _STREAMED_JOB.search(line):
                payload = gateway.redis().hget(record_key(found[1]), "payload")
                assert payload is not None
                return CompletionJob.model_validate_json(payload).agent.model_dump()
    raise AssertionError("the stream named no job")


def _complete(gateway: Gateway, headers: dict[str, str], body: dict[str, Any]) -> None:
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text


def _config(gateway: Gateway, headers: dict[str, str], **body: Any) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/tools/config", json=body, headers=headers, timeout=10)


def test_the_tools_a_caller_may_use(gateway: Gateway, callers: tuple[dict[str, str], ...]) -> None:
    listed = httpx.get(f"{gateway.url}/v1/tools", headers=callers[0], timeout=10).json()
    assert_documented(gateway, "get", "/v1/tools", listed, **callers[0])
    assert [(t["name"], t["category"], t["default"]) for t in listed["tools"]] == [
        ("Read", "file", True),
        ("Bash", "shell", True),
        ("Glob", "file", False),  # the operator denies it to every job
    ]
    assert listed["total"] == 3


def test_the_global_configuration_is_the_operators(
    gateway: Gateway, callers: tuple[dict[str, str], ...]
) -> None:
    caller, operator = callers[0], bearer(OPERATOR)
    assert_error(httpx.get(f"{gateway.url}/v1/tools/config", headers=caller), 403, "operator_key_required")
    assert_error(_config(gateway, caller, allowed_tools=["Read"]), 403, "operator_key_required")
    assert_error(_config(gateway, operator, allowed_tools=["Write"]), 400, "tool_not_permitted")
    try:
        changed = _config(gateway, operator, allowed_tools=["Read"], disallowed_tools=["Bash(rm:*)"])
        assert changed.status_code == 200, changed.text
        assert_documented(gateway, "post", "/v1/tools/config", changed.json(), **operator)
        assert changed.json()["effective_tools"] == ["Read"]
        read = httpx.get(f"{gateway.url}/v1/tools/config", headers=operator, timeout=10).json()
        assert read == changed.json()
        agent = _agent(gateway, caller, chat("hi"))
        assert agent["tools"] == ["Read"]
        # A configured key's admission reads the defaults, a managed key's access check the same.
        assert _agent(gateway, operator, chat("hi"))["tools"] == ["Read"]
        responses = {"model": "claude-sonnet-4-5", "input": "hi"}
        assert _agent(gateway, caller, responses, "/v1/responses")["tools"] == ["Read"]
        messages = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}],
        }
        assert _streamed_agent(gateway, caller, messages, "/v1/messages")["tools"] == ["Read"]
        assert _streamed_agent(gateway, caller, chat("hi", n=2), "/v1/chat/completions")["tools"] == ["Read"]
        assert agent["disallowed_tools"] == ["Glob", "Bash(rm:*)"]
        assert _agent(gateway, caller, chat("hi", allowed_tools=["Bash"]))["tools"] == [
            "Bash"
        ]  # the request's own
        listed = httpx.get(f"{gateway.url}/v1/tools", headers=caller, timeout=10).json()
        assert [t["name"] for t in listed["tools"] if t["default"]] == ["Read"]
    finally:
        cleared = _config(gateway, operator, allowed_tools=None, disallowed_tools=None)
        assert cleared.json()["effective_tools"] == ["Read", "Bash"]


def test_a_session_configuration_belongs_to_its_key(
    gateway: Gateway, callers: tuple[dict[str, str], ...]
) -> None:
    a, b = callers
    sid = "tooled-session"
    assert_error(_config(gateway, a, session_id=sid, allowed_tools=["Bash"]), 404, "session_not_found")
    _complete(gateway, a, chat("first", session_id=sid))
    configured = _config(
        gateway, a, session_id=sid, allowed_tools=["Bash"], disallowed_tools=["Bash(curl:*)"]
    )
    assert configured.status_code == 200, configured.text
    assert configured.json()["session_id"] == sid
    assert configured.json()["effective_tools"] == ["Bash"]
    url = f"{gateway.url}/v1/tools/config?session_id={sid}"
    assert httpx.get(url, headers=a, timeout=10).json() == configured.json()
    assert_documented(gateway, "get", "/v1/tools/config", configured.json(), **a)
    # Another key: the session does not exist, whether it reads or writes.
    assert_error(httpx.get(url, headers=b, timeout=10), 404, "session_not_found")
    assert_error(_config(gateway, b, session_id=sid, allowed_tools=["Read"]), 404, "session_not_found")
    _complete(gateway, b, chat("first", session_id=sid))  # b's own session of that name has no config
    assert httpx.get(url, headers=b, timeout=10).json()["allowed_tools"] is None
    agent = _agent(gateway, a, chat("second", session_id=sid))
    assert agent["tools"] == ["Bash"]
    assert agent["disallowed_tools"] == ["Glob", "Bash(curl:*)"]
    assert _agent(gateway, b, chat("second", session_id=sid))["tools"] == ["Read", "Bash", "Glob"]
    stats = [httpx.get(f"{gateway.url}/v1/tools/stats", headers=key, timeout=10).json() for key in (a, b)]
    assert [s["session_configs"] for s in stats] == [1, 0]
    assert stats[0]["tool_categories"] == {"file": 2, "shell": 1}
    assert_documented(gateway, "get", "/v1/tools/stats", stats[0], **a)
    # Deleting the session deletes its configuration.
    deadline = time.monotonic() + 20  # once its background job has ended
    while (
        deleted := httpx.delete(f"{gateway.url}/v1/sessions/{sid}", headers=a, timeout=10)
    ).status_code == 409:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert deleted.status_code == 200
    assert_error(httpx.get(url, headers=a, timeout=10), 404, "session_not_found")


@pytest.mark.parametrize(
    "body",
    [
        {"allowed_tools": ["Read"], "unknown": 1},
        {"allowed_tools": ["Read"] * 101},
        {"disallowed_tools": [""]},
        {"session_id": "../x", "allowed_tools": ["Read"]},
    ],
)
def test_bad_configurations_are_400(gateway: Gateway, body: dict[str, Any]) -> None:
    response = _config(gateway, bearer(OPERATOR), **body)
    assert response.status_code == 400, response.text


def test_tool_names_a_request_gives_are_bounded_on_every_front_end(gateway: Gateway) -> None:
    """Found by an outside probe: a request's disallowed_tools went on Claude Code's command line
    unbounded; a 140,000-character name, one with a NUL, or 30,000 names failed the CLI's start
    (a 503; on Messages an overloaded_error its SDK retries)."""
    operator = bearer(OPERATOR)
    unfit = [
        {"disallowed_tools": ["X" * 201]},
        {"disallowed_tools": ["Bash\u0000"]},
        {"allowed_tools": ["Read"] * 101},
    ]
    bodies = {
        "/v1/chat/completions": chat("hi"),
        "/v1/responses": {"model": "claude-sonnet-4-5", "input": "hi"},
        "/v1/messages": {
            "model": "claude-sonnet-4-5",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}],
        },
    }
    # The same rule on the other entry points: a stream, n > 1, a background response, a stream of Messages.
    variants = [
        ("/v1/chat/completions", chat("hi", stream=True)),
        ("/v1/chat/completions", chat("hi", n=2)),
        ("/v1/responses", {**bodies["/v1/responses"], "background": True}),
        ("/v1/messages", {**bodies["/v1/messages"], "stream": True}),
    ]
    for path, body in [*bodies.items(), *variants]:
        for extra in unfit:
            response = httpx.post(
                f"{gateway.url}{path}", json={**body, **extra}, headers=operator, timeout=10
            )
            assert response.status_code == 400, (path, extra, response.text[:300])
    names = ",".join(f"Tool{i}" for i in range(101))
    headers = {**operator, "x-claude-disallowed-tools": names}
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), headers=headers, timeout=10)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "x-claude-disallowed-tools"


def test_tool_names_are_bounded_in_bytes_too(
    gateway: Gateway, callers: tuple[dict[str, str], dict[str, str]]
) -> None:
    """Found by the second re-check probe: 100 names of 200 four-byte characters were within the
    bounds (80 KB), and a session's stored defaults and the request's went on the command line as
    one argument of 160 KB: the CLI did not start. A list comes to at most 20 KiB, so the
    request's, the session's and the global defaults' stay within one argument together."""
    a, _ = callers
    names = [f"n{i:03d}" + "\U0001f600" * 190 for i in range(100)]  # 76 KB
    assert (
        httpx.post(
            f"{gateway.url}/v1/chat/completions", json=chat("hi", session_id="wide"), headers=a
        ).status_code
        == 200
    )
    stored = _config(gateway, a, session_id="wide", disallowed_tools=names)
    assert stored.status_code == 400, stored.text[:300]
    body = chat("hi", session_id="wide", disallowed_tools=names)
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=a, timeout=10)
    assert response.status_code == 400, response.text[:300]
    assert _config(gateway, a, session_id="wide", disallowed_tools=names[:26]).status_code == 200  # 19.9 KB
    body = chat("hi", session_id="wide", disallowed_tools=names[26:52])
    assert (
        httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=a, timeout=10).status_code == 200
    )
