"""Claude Code's tools behind the API, on the real SDK and CLI: the operator's tool policy, the
per-request fields and `X-Claude-*` headers, and a tool round trip through the fake upstream."""

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, chat, claude_env
from tests.fake_anthropic import FakeAnthropic, Reply, tool_results

pytestmark = pytest.mark.claude


@pytest.fixture(scope="module")
def tooled(start_gateway: Any, fake_anthropic: FakeAnthropic) -> Gateway:
    """Callers may have Bash and Read (all of them by default), at most 4 turns, and may choose
    bypass mode; the worker runs as root here, so bypass needs IS_SANDBOX."""
    gateway: Gateway = start_gateway(
        workers=1,
        **claude_env(
            fake_anthropic,
            CLAUDE_TOOLS='["Bash", "Read"]',
            CLAUDE_MAX_TURNS="4",
            CLAUDE_PERMISSION_MODES='["default", "dontAsk", "bypassPermissions"]',
        ),
    )
    return gateway


def post(gateway: Gateway, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=90)


def tool_names(body: dict[str, Any]) -> list[str]:
    return sorted(tool["name"] for tool in body.get("tools", []))


@pytest.mark.parametrize("mode", ["default", "dontAsk", "bypassPermissions"])
def test_a_tool_call_runs_in_the_workspace_and_its_result_goes_back(
    tooled: Gateway, upstream: FakeAnthropic, mode: str
) -> None:
    command = "echo made-by-the-tool > proof.txt && cat proof.txt && pwd"
    upstream.script.extend([Reply(tool_use=("Bash", {"command": command, "description": "prove"})), Reply()])
    response = post(tooled, chat("run it", permission_mode=mode))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    assert len(upstream.requests) == 2
    assert tool_names(upstream.requests[0]) == ["Bash", "Read"]  # all the policy's tools, by default
    output = "\n".join(tool_results(upstream.requests[1]))
    assert "made-by-the-tool" in output, output
    workspace = re.search(rf"^{tooled.logs}/workspaces/[0-9a-f]{{32}}/work$", output, re.MULTILINE)
    assert workspace is not None, output
    deadline = time.monotonic() + 10  # removed when the job ended (just after its last event)
    while Path(workspace.group()).parent.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(workspace.group()).parent.exists()


def test_enable_tools_false_is_plain_question_and_answer(tooled: Gateway, upstream: FakeAnthropic) -> None:
    assert post(tooled, chat("hi", enable_tools=False)).status_code == 200
    assert tool_names(upstream.requests[-1]) == []


def test_a_request_narrows_the_tools_by_field_or_header(tooled: Gateway, upstream: FakeAnthropic) -> None:
    assert post(tooled, chat("hi", allowed_tools=["Read"])).status_code == 200
    assert tool_names(upstream.requests[-1]) == ["Read"]
    assert post(tooled, chat("hi"), **{"X-Claude-Allowed-Tools": "Bash"}).status_code == 200
    assert tool_names(upstream.requests[-1]) == ["Bash"]
    assert post(tooled, chat("hi", disallowed_tools=["Bash"])).status_code == 200
    assert tool_names(upstream.requests[-1]) == ["Read"]
    assert post(tooled, chat("hi"), **{"X-Claude-Disallowed-Tools": "Read"}).status_code == 200
    assert tool_names(upstream.requests[-1]) == ["Bash"]


@pytest.mark.parametrize(
    ("extra", "headers", "param", "code"),
    [
        ({"allowed_tools": ["Bash", "WebFetch"]}, {}, "allowed_tools", "tool_not_permitted"),
        ({}, {"X-Claude-Allowed-Tools": "Write"}, "allowed_tools", "tool_not_permitted"),
        ({"max_turns": 5}, {}, "max_turns", "max_turns_too_high"),
        ({}, {"X-Claude-Max-Turns": "50"}, "max_turns", "max_turns_too_high"),
        ({}, {"X-Claude-Max-Turns": "many"}, "x-claude-max-turns", None),
        ({"permission_mode": "acceptEdits"}, {}, "permission_mode", "permission_mode_not_permitted"),
        ({}, {"X-Claude-Permission-Mode": "yolo"}, "permission_mode", None),
    ],
)
def test_what_the_policy_forbids_is_refused_before_the_queue(
    tooled: Gateway,
    upstream: FakeAnthropic,
    extra: dict[str, Any],
    headers: dict[str, str],
    param: str,
    code: str | None,
) -> None:
    response = post(tooled, chat("hi", **extra), **headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert upstream.requests == []


def test_a_sessions_tool_configuration_reaches_the_upstream(tooled: Gateway, upstream: FakeAnthropic) -> None:
    sid = "configured-tools"
    assert post(tooled, chat("hi", session_id=sid)).status_code == 200
    assert tool_names(upstream.requests[-1]) == ["Bash", "Read"]
    body = {"session_id": sid, "allowed_tools": ["Read"]}
    configured = httpx.post(f"{tooled.url}/v1/tools/config", json=body, timeout=10)
    assert configured.status_code == 200, configured.text
    assert post(tooled, chat("again", session_id=sid)).status_code == 200
    assert tool_names(upstream.requests[-1]) == ["Read"]
    assert post(tooled, chat("once more", session_id=sid, allowed_tools=["Bash"])).status_code == 200
    assert tool_names(upstream.requests[-1]) == ["Bash"]  # the request's own choice wins


def test_by_default_jobs_get_the_original_wrappers_tools(claude: Gateway, upstream: FakeAnthropic) -> None:
    assert post(claude, chat("hi")).status_code == 200
    assert tool_names(upstream.requests[-1]) == ["Bash", "Edit", "Glob", "Grep", "Read", "Write"]
    refused = post(claude, chat("hi", allowed_tools=["WebFetch"]))
    assert refused.json()["error"]["code"] == "tool_not_permitted"
    bypass = post(claude, chat("hi", permission_mode="bypassPermissions"))
    assert bypass.json()["error"]["code"] == "permission_mode_not_permitted"


def test_an_empty_tool_policy_sends_no_tools(start_gateway: Any, upstream: FakeAnthropic) -> None:
    plain: Gateway = start_gateway(workers=1, **claude_env(upstream, CLAUDE_TOOLS="[]"))
    assert post(plain, chat("hi")).status_code == 200
    assert tool_names(upstream.requests[-1]) == []
    refused = post(plain, chat("hi", allowed_tools=["Bash"]))
    assert refused.json()["error"]["code"] == "tool_not_permitted"


def test_max_turns_ends_an_agent_loop(tooled: Gateway, upstream: FakeAnthropic) -> None:
    loop = Reply(tool_use=("Bash", {"command": "true", "description": "again"}))
    upstream.default = loop
    response = post(tooled, chat("loop forever", max_turns=2))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert len(upstream.requests) == 2


SKILL = """---
name: pirate-speak
description: Talk like a pirate when asked for nautical flair.
---
Say arr.
"""


@pytest.fixture(scope="module")
def skilled(
    start_gateway: Any, fake_anthropic: FakeAnthropic, tmp_path_factory: pytest.TempPathFactory
) -> Gateway:
    """Skills from a configured directory, and every job run in one shared directory (CLAUDE_CWD)."""
    skills = tmp_path_factory.mktemp("skills")
    (skills / "pirate-speak").mkdir()
    (skills / "pirate-speak" / "SKILL.md").write_text(SKILL)
    gateway: Gateway = start_gateway(
        workers=1,
        **claude_env(
            fake_anthropic,
            CLAUDE_TOOLS='["Bash"]',
            CLAUDE_SKILLS_DIR=str(skills),
            CLAUDE_CWD=str(tmp_path_factory.mktemp("project")),
        ),
    )
    return gateway


def test_skills_from_the_configured_directory_are_offered(skilled: Gateway, upstream: FakeAnthropic) -> None:
    assert post(skilled, chat("hi")).status_code == 200
    sent = upstream.requests[-1]
    assert tool_names(sent) == ["Bash", "Skill"]
    assert "pirate-speak" in json.dumps(sent)
    assert post(skilled, chat("hi", enable_tools=False)).status_code == 200
    assert tool_names(upstream.requests[-1]) == []
    assert "pirate-speak" not in json.dumps(upstream.requests[-1])


def test_claude_cwd_is_the_working_directory_of_every_job(skilled: Gateway, upstream: FakeAnthropic) -> None:
    upstream.script.extend(
        [Reply(tool_use=("Bash", {"command": "pwd; echo $HOME", "description": "where"})), Reply()]
    )
    assert post(skilled, chat("where are you")).status_code == 200
    cwd, home = tool_results(upstream.requests[-1])[0].split("\n")[:2]
    assert cwd == skilled.env["CLAUDE_CWD"]
    assert home.startswith(f"{skilled.logs}/workspaces/")  # its own home, config and temp all the same


def test_max_thinking_tokens_header_reaches_the_upstream(claude: Gateway, upstream: FakeAnthropic) -> None:
    assert post(claude, chat("think"), **{"X-Claude-Max-Thinking-Tokens": "2048"}).status_code == 200
    thinking = upstream.requests[-1]["thinking"]
    assert (thinking["type"], thinking["budget_tokens"]) == ("enabled", 2048)


def test_a_tool_the_job_was_not_given_does_not_run(tooled: Gateway, upstream: FakeAnthropic) -> None:
    secret = tooled.logs / "not-for-the-agent.txt"
    secret.write_text("the secret contents")
    read = Reply(tool_use=("Read", {"file_path": str(secret)}))
    upstream.script.extend([read, Reply()])
    assert post(tooled, chat("read it", allowed_tools=["Bash"])).status_code == 200
    output = "\n".join(tool_results(upstream.requests[-1]))
    assert output  # the model was told the call failed
    assert "the secret contents" not in output
