"""Codex CLI, pointed at the gateway (`wire_api = "responses"`), finishes its turns.

The real `codex exec` (installed by `.ci/run` with npm) talks to the gateway's Responses API; the
gateway runs the real SDK and CLI against the fake upstream. Codex sends what the Responses API
allows and the gateway must accept: a `namespace` tool group, a hosted `web_search` tool,
`store: false`, `include`, `reasoning.summary`, `prompt_cache_key` and `client_metadata`.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Gateway
from tests.fake_anthropic import FakeAnthropic, Reply

CODEX = shutil.which("codex")
pytestmark = [
    pytest.mark.claude,
    pytest.mark.skipif(CODEX is None, reason="Codex CLI is not installed (.ci/run installs it with npm)"),
]


def _codex(
    gateway: Gateway, prompt: str, home: Path, work: Path, headers: str = ""
) -> subprocess.CompletedProcess[str]:
    """`codex exec` with the configuration docs/openai-compatibility.md gives."""
    assert CODEX is not None
    home.mkdir()
    (home / "config.toml").write_text(
        'model = "claude-sonnet-4-5"\nmodel_provider = "gateway"\n\n[model_providers.gateway]\n'
        f'name = "Claude Code Gateway"\nbase_url = "{gateway.url}/v1"\nwire_api = "responses"\n'
        f'env_key = "GATEWAY_API_KEY"\n{headers}'
    )
    # Codex's own sandbox is not what is tested: the command it runs is the test's own.
    command = [CODEX, "exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", prompt]
    env = {**os.environ, "CODEX_HOME": str(home), "GATEWAY_API_KEY": "unused-key-for-codex"}
    return subprocess.run(
        command, cwd=work, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def test_codex_exec_gets_a_plain_answer(claude: Gateway, upstream: FakeAnthropic, tmp_path: Path) -> None:
    upstream.default = Reply(tokens=["Hello", " from", " Claude."])
    done = _codex(claude, "say hello", tmp_path / "home", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("Hello from Claude."), done.stdout


def test_codex_runs_a_command_the_model_asked_for_and_finishes_the_turn(
    claude: Gateway, upstream: FakeAnthropic, tmp_path: Path
) -> None:
    """The model calls Codex's `exec_command`; Codex runs it on its own machine, sends the output
    back, and the model's answer ends the turn."""
    command = {"cmd": "echo codex-was-here > proof.txt && cat proof.txt"}
    upstream.script.extend(
        [
            Reply(tool_use=("mcp__caller__exec_command", command)),
            Reply(tokens=["The", " file", " is", " written."]),
        ]
    )
    own_tools_off = 'http_headers = { "X-Claude-Disallowed-Tools" = "Read,Glob,Grep,Bash,Write,Edit" }\n'
    done = _codex(claude, "write the proof file", tmp_path / "home", tmp_path, own_tools_off)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "proof.txt").read_text() == "codex-was-here\n"  # run by Codex, not the gateway
    assert done.stdout.strip().endswith("The file is written."), done.stdout
    offered = {tool["name"] for tool in upstream.requests[-2]["tools"]}
    assert {"mcp__caller__exec_command", "mcp__caller__multi_agent_v1__spawn_agent"} <= offered
    assert not offered & {"Bash", "Read", "Write"}  # only Codex's tools: the header took Claude Code's
    result = json.dumps(upstream.requests[-1]["messages"])
    assert "codex-was-here" in result  # the command's output reached the model
