"""The operator's MCP servers on the real SDK and CLI: a stdio server the tests ship
(`tests/mcp_server.py`) runs as the CLI's child, the fake upstream calls its tool and the result
reaches the model; requests choose servers within the policy, and what it forbids is a 400."""

import json
import sys
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Gateway, assert_documented, chat, claude_env
from tests.fake_anthropic import FakeAnthropic, Reply, tool_results

pytestmark = pytest.mark.claude

SECRET = "env-value-only-the-server-sees"


def _stdio(**extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(ROOT / "tests" / "mcp_server.py")], **extra}


@pytest.fixture(scope="module")
def served(start_gateway: Any, fake_anthropic: FakeAnthropic) -> Gateway:
    servers = {
        "notes": _stdio(env={"STAMP_SUFFIX": f"+{SECRET}"}, description="Stamps text."),
        "extra": _stdio(default=False),
        "denied": _stdio(),
    }
    gateway: Gateway = start_gateway(
        workers=1,
        **claude_env(
            fake_anthropic,
            CLAUDE_TOOLS='["Read"]',
            CLAUDE_DISALLOWED_TOOLS='["mcp__denied"]',
            MCP_SERVERS=json.dumps(servers),
            # The server's program and interpreter, for the job's sandbox to run it.
            SANDBOX_READ_ONLY_PATHS=json.dumps([sys.prefix, sys.base_prefix, str(ROOT / "tests")]),
        ),
    )
    return gateway


def post(gateway: Gateway, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=90)


def tool_names(body: dict[str, Any]) -> list[str]:
    return sorted(tool["name"] for tool in body.get("tools", []))


def test_a_tool_of_an_mcp_server_is_called_and_its_result_reaches_the_model(
    served: Gateway, upstream: FakeAnthropic
) -> None:
    upstream.script.extend([Reply(tool_use=("mcp__notes__stamp", {"text": "hello"})), Reply()])
    response = post(served, chat("stamp it"))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    assert tool_names(upstream.requests[0]) == ["Read", "mcp__notes__stamp"]  # the default server only
    assert f"stamped-by-mcp[hello]+{SECRET}" in "\n".join(tool_results(upstream.requests[1]))


def test_a_request_chooses_its_servers_and_tools(served: Gateway, upstream: FakeAnthropic) -> None:
    assert post(served, chat("hi", mcp_servers=["extra"])).status_code == 200
    assert tool_names(upstream.requests[-1]) == ["Read", "mcp__extra__stamp"]
    assert post(served, chat("hi", mcp_servers=[])).status_code == 200
    assert tool_names(upstream.requests[-1]) == ["Read"]
    assert post(served, chat("hi", allowed_tools=["mcp__extra__stamp"])).status_code == 200
    assert tool_names(upstream.requests[-1]) == ["mcp__extra__stamp"]
    assert post(served, chat("hi", enable_tools=False)).status_code == 200
    assert tool_names(upstream.requests[-1]) == []


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"mcp_servers": ["denied"]}, "mcp_servers", "mcp_server_not_permitted"),
        ({"mcp_servers": ["notes", "unknown"]}, "mcp_servers", "mcp_server_not_permitted"),
        ({"allowed_tools": ["mcp__denied__stamp"]}, "allowed_tools", "tool_not_permitted"),
        ({"allowed_tools": ["mcp__unknown"]}, "allowed_tools", "tool_not_permitted"),
    ],
)
def test_what_the_policy_forbids_is_a_400(
    served: Gateway, upstream: FakeAnthropic, extra: dict[str, Any], param: str, code: str
) -> None:
    response = post(served, chat("hi", **extra))
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code)
    assert upstream.requests == []


ENDPOINTS = {
    "responses": ("/v1/responses", {"model": "claude-sonnet-4-5", "input": "hi"}),
    "messages": (
        "/v1/messages",
        {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]},
    ),
    "chat n=2": ("/v1/chat/completions", chat("hi", n=2)),
}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_front_end_offers_the_servers_under_the_same_policy(
    served: Gateway, upstream: FakeAnthropic, endpoint: str
) -> None:
    path, body = ENDPOINTS[endpoint]
    response = httpx.post(f"{served.url}{path}", json=body | {"mcp_servers": ["extra"]}, timeout=90)
    assert response.status_code == 200, response.text
    assert upstream.requests
    assert all(tool_names(sent) == ["Read", "mcp__extra__stamp"] for sent in upstream.requests)
    upstream.requests.clear()
    refused = httpx.post(f"{served.url}{path}", json=body | {"mcp_servers": ["denied"]}, timeout=30)
    assert refused.status_code == 400, refused.text
    assert "MCP server 'denied' is not offered" in refused.text
    assert upstream.requests == []


def test_the_servers_are_listed_without_their_configuration(served: Gateway) -> None:
    listed = httpx.get(f"{served.url}/v1/mcp/servers", timeout=10)
    assert_documented(served, "get", "/v1/mcp/servers", listed.json())
    assert [(s["name"], s["default"], s["enabled"]) for s in listed.json()["servers"]] == [
        ("notes", True, True),
        ("extra", False, True),
        ("denied", False, False),
    ]
    assert SECRET not in listed.text
    assert "mcp_server.py" not in listed.text
    # Nothing is registered or connected over HTTP (docs/claude-backend.md).
    registered = httpx.post(f"{served.url}/v1/mcp/servers", json={"name": "x", "command": "sh"}, timeout=10)
    assert registered.status_code == 405
    assert (
        httpx.post(f"{served.url}/v1/mcp/connect", json={"server_name": "notes"}, timeout=10).status_code
        == 404
    )
    stats = httpx.get(f"{served.url}/v1/mcp/stats", timeout=10).json()
    assert_documented(served, "get", "/v1/mcp/stats", stats)
    assert (stats["registered_servers"], stats["enabled_servers"], stats["default_servers"]) == (3, 2, 1)
    tools = httpx.get(f"{served.url}/v1/tools", timeout=10).json()["tools"]
    assert [(t["name"], t["default"]) for t in tools] == [
        ("Read", True),
        ("mcp__notes", True),
        ("mcp__extra", False),
    ]
