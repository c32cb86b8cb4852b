"""Every front end runs the same agent, on the real SDK and CLI: Claude Code's tools, the operator's
policy (`CLAUDE_TOOLS`, `CLAUDE_DISALLOWED_TOOLS`, `CLAUDE_MAX_TURNS`) and the per-request controls
hold for Responses, Messages and `n = 2` exactly as for a chat completion."""

from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, claude_env
from tests.fake_anthropic import FakeAnthropic, Reply

pytestmark = pytest.mark.claude

FRONT_ENDS = ["chat", "chat n=2", "responses", "messages"]


@pytest.fixture(scope="module")
def policed(start_gateway: Any, fake_anthropic: FakeAnthropic) -> Gateway:
    gateway: Gateway = start_gateway(
        workers=1,
        **claude_env(
            fake_anthropic,
            CLAUDE_TOOLS='["Bash", "Read", "Grep"]',
            CLAUDE_DISALLOWED_TOOLS='["Grep"]',
            CLAUDE_MAX_TURNS="2",
        ),
    )
    return gateway


def send(gateway: Gateway, front_end: str, prompt: str, **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", {})
    if front_end == "responses":
        body = {"model": "claude-sonnet-4-5", "input": prompt, **extra}
        path = "/v1/responses"
    elif front_end == "messages":
        body = {"model": "claude-sonnet-4-5", "max_tokens": 1000, **extra}
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/messages"
    else:
        body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": prompt}], **extra}
        if front_end == "chat n=2":
            body["n"] = 2
        path = "/v1/chat/completions"
    return httpx.post(f"{gateway.url}{path}", json=body, headers=headers, timeout=90)


def choices(front_end: str) -> int:
    return 2 if front_end == "chat n=2" else 1


def tool_names(body: dict[str, Any]) -> list[str]:
    return sorted(tool["name"] for tool in body.get("tools", []))


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_every_front_end_gives_the_job_the_policys_tools(
    policed: Gateway, upstream: FakeAnthropic, front_end: str
) -> None:
    response = send(policed, front_end, "hi")
    assert response.status_code == 200, response.text
    assert len(upstream.requests) == choices(front_end)
    assert [tool_names(sent) for sent in upstream.requests] == [["Bash", "Read"]] * choices(front_end)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_every_front_end_takes_the_agent_controls(
    policed: Gateway, upstream: FakeAnthropic, front_end: str
) -> None:
    assert send(policed, front_end, "hi", allowed_tools=["Read"]).status_code == 200
    assert tool_names(upstream.requests[-1]) == ["Read"]
    assert send(policed, front_end, "hi", headers={"X-Claude-Allowed-Tools": "Bash"}).status_code == 200
    assert tool_names(upstream.requests[-1]) == ["Bash"]
    assert send(policed, front_end, "hi", enable_tools=False).status_code == 200
    assert tool_names(upstream.requests[-1]) == []
    before = len(upstream.requests)
    refused = send(policed, front_end, "hi", max_turns=3)
    assert refused.status_code == 400, refused.text
    assert "max_turns may be at most 2" in refused.json()["error"]["message"]
    refused = send(policed, front_end, "hi", allowed_tools=["WebFetch"])
    assert refused.status_code == 400, refused.text
    assert "'WebFetch' is not permitted" in refused.json()["error"]["message"]
    assert len(upstream.requests) == before  # refused before the queue


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_claude_max_turns_ends_the_agent_loop_on_every_front_end(
    policed: Gateway, upstream: FakeAnthropic, front_end: str
) -> None:
    upstream.default = Reply(tool_use=("Bash", {"command": "true", "description": "again"}))
    response = send(policed, front_end, "loop forever")
    assert response.status_code == 200, response.text
    assert len(upstream.requests) == 2 * choices(front_end)  # CLAUDE_MAX_TURNS=2 per job


def test_thinking_and_effort_map_onto_claude_code_within_the_operators_cap(
    policed: Gateway, upstream: FakeAnthropic
) -> None:
    thinking = {"type": "enabled", "budget_tokens": 2048}
    assert send(policed, "messages", "think", thinking=thinking, max_tokens=8000).status_code == 200
    sent = upstream.requests[-1]["thinking"]
    assert (sent["type"], sent["budget_tokens"]) == ("enabled", 2048)
    too_much = {"type": "enabled", "budget_tokens": 64000}  # above CLAUDE_MAX_THINKING_TOKENS (32000)
    refused = send(policed, "messages", "think", thinking=too_much, max_tokens=100_000)
    assert (refused.status_code, refused.json()["error"]["type"]) == (400, "invalid_request_error")
    assert "32000" in refused.json()["error"]["message"], refused.text  # the cap's refusal
    assert send(policed, "chat", "think", reasoning_effort="low").status_code == 200
    assert send(policed, "responses", "think", reasoning={"effort": "medium"}).status_code == 200
    for front_end, extra in [
        ("chat", {"reasoning_effort": "xhigh"}),
        ("responses", {"reasoning": {"effort": "xhigh"}}),
    ]:
        refused = send(policed, front_end, "think", **extra)  # above CLAUDE_MAX_EFFORT (high)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "reasoning_effort_too_high"
    # Messages' own effort (`output_config`, as Claude Code sends it) was dropped (an outside probe).
    assert send(policed, "messages", "think", output_config={"effort": "medium"}).status_code == 200
    refused = send(policed, "messages", "think", output_config={"effort": "xhigh"})
    assert refused.status_code == 400, refused.text
    assert "effort" in refused.json()["error"]["message"]
