"""Counts and nesting are refused while the body is parsed, before models are built from it: a
body of thousands of tiny messages costs the API little more than the body itself."""

import json
import os
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Gateway


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_three_mib_of_tiny_messages_is_refused_without_building_them(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(workers=0, BACKEND="scripted")
    api = gateway.processes[-1]
    httpx.get(f"{gateway.url}/v1/models")  # the first request's imports and caches are not the body's
    before, cpu = _peak_rss_mib(api.pid), _cpu_s(api.pid)
    message = {"role": "user", "content": ""}
    count = (3 << 20) // len(json.dumps(message))
    bodies = {
        "/v1/chat/completions": {"model": "claude-sonnet-4-5", "messages": [message] * count},
        "/v1/messages": {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [message] * count},
        "/v1/responses": {"model": "claude-sonnet-4-5", "input": [message] * count},
    }
    for path, body in bodies.items():
        response = httpx.post(f"{gateway.url}{path}", json=body, timeout=60)
        # (the error's shape is each API's own: OpenAI's, Anthropic's on /v1/messages)
        assert response.status_code == 400, response.text
        assert "Too many messages" in response.text, path
    grown = _peak_rss_mib(api.pid) - before
    spent = (_cpu_s(api.pid) - cpu) / len(bodies)
    print(f"API peak RSS grew by {grown:.0f} MiB for {count} messages; {spent:.2f} s CPU per request")
    # One parse of the body holds ~30 MiB of small dicts; building the models held 160 MiB more.
    assert grown < 80


def test_a_body_of_empty_arrays_is_refused_before_it_is_parsed(start_gateway: Any) -> None:
    """Found by an outside probe: 3.5 million empty arrays in an unknown field (10 MiB) cost an API
    process 310 MB and 2.6 s of its event loop, stalling every other caller on it."""
    gateway: Gateway = start_gateway(workers=0, BACKEND="scripted")
    api = gateway.processes[-1]
    httpx.get(f"{gateway.url}/v1/models")
    before = _peak_rss_mib(api.pid)
    start = b'{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}],"x":['
    body = start + b"[]," * 600_000 + b"[]]}"
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "too_many_json_values"
    assert _peak_rss_mib(api.pid) - before < 20  # the body, not 600,000 lists
