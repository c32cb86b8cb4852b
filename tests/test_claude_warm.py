"""Warm CLI processes (`CLAUDE_WARM_CLIENTS`) on the real SDK and CLI: a job of a profile seen
before starts on a client connected (and warmed up) ahead of it, in a workspace of its own, and
sends upstream exactly what a fresh CLI would; the client is used once if its job ran a tool, else
again for the same API key's next jobs, rewound."""

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, chat, claude_env, cli_login_env
from tests.fake_anthropic import FakeAnthropic, Reply, system_text, tool_results
from worker.warm import WARM_UP_PROMPT

pytestmark = pytest.mark.claude

KEY_A, KEY_B = "warm-test-key-of-caller-a", "warm-test-key-of-caller-b"


@pytest.fixture(scope="module")
def warm(start_gateway: Any, fake_anthropic: FakeAnthropic) -> Gateway:
    gateway: Gateway = start_gateway(
        workers=1,
        **claude_env(
            fake_anthropic,
            CLAUDE_TOOLS='["Bash"]',
            CLAUDE_WARM_CLIENTS="1",
        ),
    )
    return gateway


def prepared_clients(gateway: Gateway) -> list[Path]:
    return sorted((gateway.logs / "workspaces").glob("warm-*"))


def wait_for_a_prepared_client(gateway: Gateway) -> Path:
    deadline = time.monotonic() + 30
    while not prepared_clients(gateway) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert prepared_clients(gateway), "no warm client was prepared"  # connecting or connected
    return prepared_clients(gateway)[0]


def where(gateway: Gateway, upstream: FakeAnthropic, **extra: Any) -> str:
    """Runs a job whose Bash tool prints its working directory; returns that directory."""
    upstream.script.extend([Reply(tool_use=("Bash", {"command": "pwd", "description": "where"})), Reply()])
    body = chat("where are you?", **extra)
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=90)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    match = re.search(r"^(/\S+)$", tool_results(upstream.requests[-1])[0], re.MULTILINE)
    assert match is not None
    return match.group(1)


def test_a_repeated_kind_of_job_starts_on_a_warm_client_used_once(
    warm: Gateway, upstream: FakeAnthropic
) -> None:
    system = {"role": "system", "content": "Answer briefly."}
    messages = [system, {"role": "user", "content": "where are you?"}]
    first = where(warm, upstream, messages=messages)
    assert "/warm-" not in first  # nothing of this kind seen before: a cold start
    prepared = wait_for_a_prepared_client(warm)
    upstream.requests.clear()
    second = where(warm, upstream, messages=messages)
    assert second == f"{prepared}/work"  # the client connected ahead of the job ran it
    assert "Answer briefly." in system_text(upstream.requests[0])  # with its profile's prompt
    deadline = time.monotonic() + 10
    while prepared.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not prepared.exists()  # its job ran a tool: used once, its workspace went with it
    assert wait_for_a_prepared_client(warm) != prepared  # and another one takes its place


def test_a_job_of_another_kind_starts_cold(warm: Gateway, upstream: FakeAnthropic) -> None:
    wait_for_a_prepared_client(warm)
    other = where(
        warm, upstream, messages=[{"role": "system", "content": "Other."}, {"role": "user", "content": "?"}]
    )
    assert "/warm-" not in other
    assert "Other." in system_text(upstream.requests[0])
    history = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "?"},
    ]
    assert "/warm-" not in where(warm, upstream, messages=history)  # earlier turns: resumed cold


def test_a_message_that_looks_like_a_slash_command_is_text_on_a_warm_client(
    warm: Gateway, upstream: FakeAnthropic
) -> None:
    """Found by an outside probe: a job on a warm client ran "/model <name>" as Claude Code's own
    command (a request upstream for a model not in MODELS, answered with nothing): the cold path
    made it text, the warm path did not."""
    system = {"role": "system", "content": "Slash."}
    cold = httpx.post(
        f"{warm.url}/v1/chat/completions",
        json=chat("", messages=[system, {"role": "user", "content": "hi"}]),
        timeout=60,
    )
    assert cold.status_code == 200, cold.text
    wait_for_a_prepared_client(warm)
    upstream.requests.clear()
    upstream.script.append(Reply(tokens=["As text."]))
    command = {"role": "user", "content": "/model claude-opus-4-bypass"}
    response = httpx.post(
        f"{warm.url}/v1/chat/completions", json=chat("", messages=[system, command]), timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "As text."
    assert "/warm-" in workspace_of(upstream.requests[-1])  # it ran on the warm client
    assert {body["model"] for body in upstream.requests} == {"claude-sonnet-4-5"}


def workspace_of(request: dict[str, Any]) -> str:
    """The job's workspace, as the CLI tells the model its working directory."""
    match = re.search(r"Primary working directory: (\S+)/work\b", json.dumps(request["messages"]))
    assert match is not None
    return match.group(1)


def without_workspace(request: dict[str, Any]) -> dict[str, Any]:
    """The request as any job of its kind sends it: its workspace's path (and the config folder
    named after it) put by a placeholder, `metadata` (the process's session id) left out."""
    text = json.dumps({key: value for key, value in request.items() if key != "metadata"})
    workspace = workspace_of(request)
    text = text.replace(workspace, "<workspace>").replace(re.sub(r"[^A-Za-z0-9]", "-", workspace), "<slug>")
    result: dict[str, Any] = json.loads(text)
    return result


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Same question?"}],
        # One prompt once merged: the warm client was sent the last message only (an outside probe:
        # a document, then a question about it, lost the document).
        [
            {"role": "system", "content": "Be exact, twice."},
            {"role": "user", "content": "Document: the code is 4417."},
            {"role": "user", "content": "What is the code?"},
        ],
    ],
    ids=["one message", "two user messages in a row"],
)
def test_a_warm_job_sends_upstream_exactly_what_a_cold_one_does(
    warm: Gateway, upstream: FakeAnthropic, messages: list[dict[str, str]]
) -> None:

    def complete() -> dict[str, Any]:
        response = httpx.post(f"{warm.url}/v1/chat/completions", json=chat("", messages=messages), timeout=90)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    cold = complete()  # the first of its kind starts cold, and orders a warm client for the next
    hot = complete()  # which takes it, waiting for it if it is still connecting or warming up
    assert len(upstream.requests) == 2  # one each: the warm-up turn never reached the upstream
    assert upstream.received == ["POST /v1/messages"] * 2
    cold_request, warm_request = upstream.requests
    assert "/warm-" not in workspace_of(cold_request)
    assert "/warm-" in workspace_of(warm_request)  # ran on a warmed-up client
    assert without_workspace(warm_request) == without_workspace(cold_request)
    assert len(warm_request["messages"]) == 1
    assert WARM_UP_PROMPT not in json.dumps(warm_request)
    assert upstream.credentials == ["test-key-not-real"] * 2  # the proxy's key, as for a cold job
    assert hot["choices"][0]["message"] == cold["choices"][0]["message"]
    assert cold["usage"]["cost_usd"] > 0
    assert hot["usage"] == cold["usage"]  # no tokens, no cost from the warm-up


def test_a_warm_client_on_the_cli_login_warms_up_without_the_upstream(
    start_gateway: Any, upstream: FakeAnthropic, tmp_path: Path
) -> None:
    """The CLI holding a job token as its OAuth token speaks as an OAuth client; its warm-up must
    still be answered by the proxy alone."""
    login_token = "sk-ant-oat01-stored-login"
    env = cli_login_env(upstream, tmp_path, login_token, CLAUDE_WARM_CLIENTS="1")
    gateway: Gateway = start_gateway(workers=1, **env)
    for _ in range(2):  # a cold job, then a warm one on the client it ordered
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("Hi?"), timeout=90)
        assert response.status_code == 200, response.text
    assert upstream.received == ["POST /v1/messages"] * 2
    assert upstream.credentials == [login_token] * 2
    assert "/warm-" in workspace_of(upstream.requests[1])
    assert without_workspace(upstream.requests[1]) == without_workspace(upstream.requests[0])


def test_a_client_whose_job_ran_no_tool_serves_the_next_jobs_of_its_key_only(
    start_gateway: Any, upstream: FakeAnthropic
) -> None:
    gateway: Gateway = start_gateway(
        workers=1, **claude_env(upstream, CLAUDE_WARM_CLIENTS="1", API_KEYS=f"{KEY_A},{KEY_B}")
    )

    def complete(key: str) -> tuple[str, dict[str, Any]]:
        """The job's workspace and its usage."""
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json=chat("Hello?"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=90,
        )
        assert response.status_code == 200, response.text
        assert len(upstream.requests[-1]["messages"]) == 1  # nothing of an earlier job in it
        usage: dict[str, Any] = response.json()["usage"]
        return workspace_of(upstream.requests[-1]), usage

    complete(KEY_A)  # cold; orders a client for the next job like it
    prepared = str(wait_for_a_prepared_client(gateway))
    runs = [complete(KEY_A) for _ in range(3)]
    assert [workspace for workspace, _ in runs] == [prepared] * 3  # one client, rewound after each
    assert runs[1][1] == runs[0][1] == runs[2][1]  # each job's own cost, not the CLI's running total
    assert runs[0][1]["cost_usd"] > 0
    other, _ = complete(KEY_B)
    assert other != prepared  # never another key's
    deadline = time.monotonic() + 10
    while Path(prepared).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(prepared).exists()  # the pool of one made room for the other key's client


def test_a_refusal_on_a_warm_client_ends_its_job_and_the_client(
    start_gateway: Any, upstream: FakeAnthropic
) -> None:
    """At a refusal the job ends (Claude Code would ask the model again): a warm client is then
    still at work, so it is discarded, never given back to the pool."""
    gateway: Gateway = start_gateway(workers=1, **claude_env(upstream, CLAUDE_WARM_CLIENTS="1"))
    url = f"{gateway.url}/v1/chat/completions"
    assert httpx.post(url, json=chat("Hello?"), timeout=90).status_code == 200  # cold; orders a client
    prepared = str(wait_for_a_prepared_client(gateway))
    upstream.script.append(Reply(tokens=["I cannot"], stop_reason="refusal"))
    refused = httpx.post(url, json=chat("Hello?"), timeout=90)
    assert refused.status_code == 200, refused.text
    assert refused.json()["choices"][0]["finish_reason"] == "content_filter"
    assert workspace_of(upstream.requests[-1]) == prepared
    asked = len(upstream.requests)
    deadline = time.monotonic() + 10
    while Path(prepared).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(prepared).exists()  # discarded
    assert len(upstream.requests) == asked  # and it asked the model nothing more
    assert httpx.post(url, json=chat("Hello?"), timeout=90).status_code == 200
    assert workspace_of(upstream.requests[-1]) != prepared
