"""`GET /v1/auth/status` and `POST /v1/debug/request` through real gateways, and the non-API-key
methods end to end: the real SDK and CLI against the fake upstream, as Vertex and as the CLI's
own login."""

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, chat, cli_login_env
from tests.fake_anthropic import FakeAnthropic, Reply, tool_results
from tests.test_access import new_key
from tests.test_agent_isolation import SHOW_ENVIRONMENT

MODEL_KEY = "sk-ant-api03-model-key-must-not-leak"
GATEWAY_KEY = "gateway-key-must-not-leak"
AUTH = {"authorization": f"Bearer {GATEWAY_KEY}"}


def auth_status(gateway: Gateway, *, workers: int) -> httpx.Response:
    """The status once `workers` workers have published their first heartbeat."""
    deadline = time.monotonic() + 30
    while True:
        response = httpx.get(f"{gateway.url}/v1/auth/status", headers=AUTH, timeout=10)
        if response.status_code != 200 or response.json()["workers_alive"] >= workers:
            return response
        if time.monotonic() > deadline:
            raise AssertionError(f"{workers} workers never reported: {response.text}")
        time.sleep(0.1)


def test_auth_status_reports_the_workers_method_and_never_the_key(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(
        workers=2, BACKEND="scripted", ANTHROPIC_API_KEY=MODEL_KEY, API_KEY=GATEWAY_KEY
    )
    assert httpx.get(f"{gateway.url}/v1/auth/status", timeout=10).status_code == 401
    response = auth_status(gateway, workers=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert MODEL_KEY not in response.text
    assert GATEWAY_KEY not in response.text
    assert body["source"] == "workers"
    assert body["message"] is None
    auth = body["claude_code_auth"]
    assert (auth["method"], auth["status"]["valid"], auth["status"]["errors"]) == ("anthropic", True, [])
    assert auth["status"]["config"]["api_key_present"] is True
    assert [w["auth"]["method"] for w in body["workers"]] == ["anthropic", "anthropic"]
    assert body["server_info"]["api_key_required"] is True
    assert body["server_info"]["api_key_source"] == "environment"


def test_workers_that_differ_are_reported_together_and_one_by_one(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", ANTHROPIC_API_KEY=MODEL_KEY, API_KEY=GATEWAY_KEY
    )
    auth_status(gateway, workers=1)
    gateway.env.update(CLAUDE_AUTH_METHOD="bedrock", AWS_REGION="eu-west-1", AWS_ACCESS_KEY_ID="AKIAEXAMPLE")
    gateway.start_worker()
    response = auth_status(gateway, workers=2)
    assert MODEL_KEY not in response.text
    assert "AKIAEXAMPLE" not in response.text
    body = response.json()
    by_method = {w["auth"]["method"]: w for w in body["workers"]}
    assert sorted(by_method) == ["anthropic", "bedrock"]
    bedrock = by_method["bedrock"]
    assert bedrock["auth"]["errors"] == ["AWS_ACCESS_KEY_ID is set without AWS_SECRET_ACCESS_KEY"]
    combined = body["claude_code_auth"]
    assert (combined["method"], combined["status"]["valid"]) == ("mixed", False)
    assert combined["status"]["errors"] == [
        f"{bedrock['id']}: AWS_ACCESS_KEY_ID is set without AWS_SECRET_ACCESS_KEY"
    ]
    # A caller's key gets the method and whether it works: not which worker runs where, nor why.
    _, caller_key = new_key(gateway)
    seen = httpx.get(f"{gateway.url}/v1/auth/status", headers={"authorization": f"Bearer {caller_key}"})
    assert seen.status_code == 200
    assert (seen.json()["workers_alive"], seen.json()["workers"]) == (2, [])
    assert seen.json()["claude_code_auth"]["method"] == "mixed"
    assert seen.json()["claude_code_auth"]["status"]["valid"] is False
    assert "AWS_ACCESS_KEY_ID" not in seen.text
    assert bedrock["id"] not in seen.text
    assert bedrock["host"] not in seen.text


def test_with_no_worker_alive_the_api_says_so_and_reports_its_own_detection(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(
        workers=0, BACKEND="scripted", CLAUDE_AUTH_METHOD="bedrock", AWS_SECRET_ACCESS_KEY=MODEL_KEY
    )
    response = httpx.get(f"{gateway.url}/v1/auth/status", timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert MODEL_KEY not in response.text
    assert (body["source"], body["workers_alive"], body["workers"]) == ("api", 0, [])
    assert body["message"].startswith("No worker is alive")
    status = body["claude_code_auth"]["status"]
    assert (status["method"], status["valid"]) == ("bedrock", False)
    # The API process holds no model credential, whatever its environment had (an outside probe:
    # a compose file's one `.env` gave it the workers'): it sees the method, never the secret.
    assert status["errors"] == ["AWS_REGION or AWS_DEFAULT_REGION is not set"]
    assert body["server_info"]["api_key_source"] == "none"


def test_a_worker_whose_auth_cannot_work_refuses_jobs_at_once_and_says_why(
    start_gateway: Any, upstream: FakeAnthropic
) -> None:
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="claude", CLAUDE_AUTH_METHOD="vertex", ANTHROPIC_VERTEX_BASE_URL=upstream.url
    )
    body = auth_status(gateway, workers=1).json()
    assert body["claude_code_auth"]["status"]["errors"] == [
        "ANTHROPIC_VERTEX_PROJECT_ID is not set",
        "CLOUD_ML_REGION is not set",
    ]
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), timeout=60)
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "backend_unavailable"
    assert "backend auth (vertex) is not usable: ANTHROPIC_VERTEX_PROJECT_ID is not set" in error["message"]
    assert upstream.requests == []


def test_the_debug_endpoint_is_off_by_default(scripted: Gateway) -> None:
    response = httpx.post(f"{scripted.url}/v1/debug/request", json=chat("hi"), timeout=10)
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "Invalid URL (POST /v1/debug/request)",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


def test_the_debug_endpoint_when_on_needs_the_key_and_redacts_every_credential(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(
        workers=0,
        BACKEND="scripted",
        DEBUG_ENDPOINTS="true",
        API_KEY=GATEWAY_KEY,
        ANTHROPIC_API_KEY=MODEL_KEY,
    )
    url = f"{gateway.url}/v1/debug/request?api_key=query-secret-123&x=1"
    assert httpx.post(url, json=chat("hi"), timeout=10).status_code == 401
    body = chat(f"my key is {MODEL_KEY}", max_tokens=5, api_key="body-secret-123")
    headers = {
        **AUTH,
        "x-api-key": GATEWAY_KEY,  # the same key twice: a different one is refused (docs/security.md)
        "cookie": "session=cookie-secret-789",
        "x-amz-security-token": "amz-secret-000",
    }
    response = httpx.post(url, json=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    sent = ["query-secret-123", "body-secret-123", "cookie-secret", "amz-secret"]
    for secret in [GATEWAY_KEY, MODEL_KEY, *sent]:
        assert secret not in response.text, secret
    info = response.json()["debug_info"]
    for name in ("authorization", "x-api-key", "cookie", "x-amz-security-token"):
        assert info["headers"][name] == "[redacted]"
    assert info["headers"]["content-type"] == "application/json"
    assert info["url"].endswith("/v1/debug/request?api_key=%5Bredacted%5D&x=1")
    assert info["parsed_body"]["max_tokens"] == 5
    assert info["parsed_body"]["messages"][0]["content"] == "my key is [redacted]"
    assert info["validation_result"]["valid"] is True
    assert info["json_parse_error"] is None
    malformed = httpx.post(url, content=b'{"api_key": "body-secret-123", ', headers=AUTH, timeout=10)
    assert "body-secret-123" not in malformed.text
    assert malformed.json()["debug_info"]["json_parse_error"].startswith("JSONDecodeError")
    # Parsed whatever its type, it is checked as a JSON body is (a probe's text/plain ones: 500s).
    plain = {**AUTH, "content-type": "text/plain"}
    for unchecked in (b"[" * 100_000 + b"]" * 100_000, b'{"a": "\\ud800"}'):
        refused = httpx.post(url, content=unchecked, headers=plain, timeout=30)
        assert refused.status_code == 400, refused.text
    # A JSON body under another type is told which type to send (a probe's text/json was not).
    told = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=json.dumps(chat("hi")),
        headers={**AUTH, "content-type": "text/json"},
    )
    assert "'Content-Type: application/json'" in told.json()["error"]["message"]


@pytest.mark.claude
def test_vertex_end_to_end_through_the_real_cli(start_gateway: Any, upstream: FakeAnthropic) -> None:
    gateway: Gateway = start_gateway(
        workers=1,
        BACKEND="claude",
        SANDBOX="off",  # the CLI reaches Vertex itself: a sandbox has no network for it
        CLAUDE_CODE_USE_VERTEX="1",
        ANTHROPIC_VERTEX_PROJECT_ID="test-project",
        CLOUD_ML_REGION="us-east5",
        ANTHROPIC_VERTEX_BASE_URL=f"{upstream.url}/v1",
        CLAUDE_CODE_SKIP_VERTEX_AUTH="1",
        CLAUDE_MAX_RETRIES="0",
    )
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), timeout=90)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    path = "/v1/projects/test-project/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5"
    assert upstream.paths == [f"{path}:streamRawPredict"]


@pytest.mark.claude
def test_the_cli_login_reaches_upstream_through_the_proxy_and_never_the_agent(
    start_gateway: Any, upstream: FakeAnthropic, tmp_path: Path
) -> None:
    login_token = "sk-ant-oat01-stored-login-must-not-leak"
    env = cli_login_env(upstream, tmp_path, login_token, CLAUDE_TOOLS='["Bash"]')
    gateway: Gateway = start_gateway(workers=1, **env)
    body = auth_status(gateway, workers=1)
    assert body.json()["claude_code_auth"]["status"]["valid"] is True, body.text
    assert login_token not in body.text
    show = {"command": SHOW_ENVIRONMENT, "description": "show env"}
    upstream.script.extend([Reply(tool_use=("Bash", show)), Reply()])
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("show env"), timeout=90)
    assert response.status_code == 200, response.text
    # Upstream got the stored login on every request; the CLI (the tool's parent) held only a job
    # token, which the CLI keeps out of its tools' own environment.
    assert upstream.credentials == [login_token, login_token]
    # The CLI, holding a job token as its OAuth token, still speaks as an OAuth client.
    assert all("oauth-2025-04-20" in beta.split(",") for beta in upstream.betas), upstream.betas
    output = "\n".join(tool_results(upstream.requests[-1]))
    assert "ANTHROPIC_BASE_URL=" in output, output
    assert login_token not in output
    token = re.search(r"CLAUDE_CODE_OAUTH_TOKEN=(\S+)", output)
    assert token is not None, output
    assert token.group(1).startswith("job-")
    assert "ANTHROPIC_API_KEY" not in output
