"""What a tool the agent runs can see: the real SDK and CLI run a `Bash` call scripted by the fake
upstream, and the tool's own view of its environment goes back upstream as the tool result."""

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import claude_agent_sdk
import httpx
import pytest

from cli.embedded_redis import free_port
from tests.conftest import ROOT, Gateway, chat
from tests.fake_anthropic import FakeAnthropic, Reply, tool_results

pytestmark = pytest.mark.claude

REAL_KEY = "sk-ant-real-credential-must-not-leak"
GATEWAY_KEY = "gateway-client-key-must-not-leak"
# The tool's environment three ways: as its shell sees it, as the kernel has it, and its parent's.
SHOW_ENVIRONMENT = (
    "env; echo ---; cat /proc/self/environ | tr '\\0' '\\n'; "
    "echo ---; cat /proc/$PPID/environ | tr '\\0' '\\n'"
)


@pytest.fixture(scope="module")
def tooled(start_gateway: Any, fake_anthropic: FakeAnthropic) -> Gateway:
    """A Claude gateway whose agent may run Bash, holding a real-looking key and a client key;
    without the sandbox: what it checks must hold where an operator turned it off."""
    gateway: Gateway = start_gateway(
        workers=1,
        SANDBOX="off",
        BACKEND="claude",
        ANTHROPIC_BASE_URL=fake_anthropic.url,
        ANTHROPIC_API_KEY=REAL_KEY,
        API_KEY=GATEWAY_KEY,
        CLAUDE_TOOLS='["Bash"]',
        CLAUDE_MAX_RETRIES="1",
    )
    return gateway


def test_a_bash_tool_sees_no_credential_no_client_key_and_no_redis_url(
    tooled: Gateway, upstream: FakeAnthropic
) -> None:
    upstream.script.extend(
        [Reply(tool_use=("Bash", {"command": SHOW_ENVIRONMENT, "description": "show env"})), Reply()]
    )
    response = httpx.post(
        f"{tooled.url}/v1/chat/completions",
        json=chat("show me your environment"),
        headers={"authorization": f"Bearer {GATEWAY_KEY}"},
        timeout=90,
    )
    assert response.status_code == 200, response.text
    assert len(upstream.requests) == 2
    output = "\n".join(tool_results(upstream.requests[-1]))
    # The tool really ran and printed both views of its environment.
    assert "HOME=" in output, output
    assert output.count("ANTHROPIC_API_KEY=") == 3, output
    for secret in (REAL_KEY, GATEWAY_KEY, tooled.redis_url, "redis://", "REDIS_URL", "API_KEY="):
        assert secret not in output.replace("ANTHROPIC_API_KEY=", ""), secret
    # Upstream saw the real key on every request: the proxy put it there, the CLI never had it.
    assert upstream.credentials == [REAL_KEY, REAL_KEY]
    token = re.search(r"ANTHROPIC_API_KEY=(\S+)", output)
    proxy = re.search(r"ANTHROPIC_UNIX_SOCKET=(\S+)", output)
    assert token is not None
    assert proxy is not None
    assert token.group(1).startswith("job-")
    # The job is over: its token no longer opens the proxy.
    with httpx.Client(transport=httpx.HTTPTransport(uds=proxy.group(1))) as client:
        late = client.post(
            "http://localhost/v1/messages", headers={"x-api-key": token.group(1)}, json={}, timeout=10
        )
    assert late.status_code == 401
    assert len(upstream.requests) == 2


def _reachable_by_nobody(path: Path) -> bool:
    """Whether `nobody` can read and enter `path` (a checkout in a private folder, as `mktemp -d`
    makes them, is not: then the CLI or the checkout's modules cannot run as that user)."""
    probe = subprocess.run(["test", "-r", str(path), "-a", "-x", str(path)], user="nobody", check=False)
    return probe.returncode == 0


@pytest.fixture(scope="module", params=["on", "off"])
def unprivileged(
    request: pytest.FixtureRequest, start_gateway: Any, fake_anthropic: FakeAnthropic
) -> Iterator[Gateway]:
    """As `tooled`, but each CLI runs as `nobody` (`CLAUDE_JOB_USER`) under a root worker, in its
    sandbox or, with `SANDBOX=off`, without one."""
    if os.geteuid() != 0:
        pytest.skip("switching the CLI's user needs a root worker")
    cli = Path(claude_agent_sdk.__file__).parent / "_bundled" / "claude"
    if not _reachable_by_nobody(cli):
        pytest.skip(f"the bundled CLI ({cli}) is in a folder user nobody cannot enter")
    workspaces = Path(tempfile.mkdtemp(prefix="gateway-jobs-"))
    workspaces.chmod(0o755)  # pytest's own temp folders are private to root
    gateway: Gateway = start_gateway(
        workers=1,
        BACKEND="claude",
        ANTHROPIC_BASE_URL=fake_anthropic.url,
        ANTHROPIC_API_KEY=REAL_KEY,
        CLAUDE_TOOLS='["Bash"]',
        CLAUDE_JOB_USER="nobody",
        WORKSPACE_ROOT=str(workspaces),
        CLAUDE_MAX_RETRIES="1",
        SANDBOX=request.param,
    )
    yield gateway
    gateway.stop()  # then its folder, outside pytest's own: left behind by every run (a probe)
    shutil.rmtree(workspaces, ignore_errors=True)


def test_a_tool_run_as_another_user_cannot_read_the_workers_environment(
    unprivileged: Gateway, upstream: FakeAnthropic
) -> None:
    worker = unprivileged.workers[0].pid
    command = f"id -un; cat /proc/{worker}/environ; echo status=$?"
    upstream.script.extend([Reply(tool_use=("Bash", {"command": command, "description": "peek"})), Reply()])
    response = httpx.post(f"{unprivileged.url}/v1/chat/completions", json=chat("peek"), timeout=90)
    assert response.status_code == 200, response.text
    output = "\n".join(tool_results(upstream.requests[-1]))
    assert output.splitlines()[0] == "nobody", output
    assert "status=1" in output, output
    assert REAL_KEY not in output
    assert "REDIS_URL" not in output


def test_a_session_runs_as_another_user_and_keeps_its_files(
    unprivileged: Gateway, upstream: FakeAnthropic
) -> None:
    """Found by an outside probe: under `CLAUDE_JOB_USER` every session's turn failed with 503 (the
    worker's folder of session copies was closed to the job's user); with `SANDBOX=off`, every
    later turn did (the SDK switched the CLI's uid alone, and its copy of the transcript was root's)."""
    session = {"session_id": "as-nobody"}
    write = "id -un > made-by.txt; id -G >> made-by.txt; cat made-by.txt"
    upstream.script.extend([Reply(tool_use=("Bash", {"command": write, "description": "write"})), Reply()])
    first = httpx.post(f"{unprivileged.url}/v1/chat/completions", json=chat("write", **session), timeout=90)
    assert first.status_code == 200, first.text
    user, groups = tool_results(upstream.requests[-1])[0].splitlines()[:2]
    assert user == "nobody"
    assert "0" not in groups.split()  # not in root's group either
    upstream.script.extend(
        [Reply(tool_use=("Bash", {"command": "cat made-by.txt", "description": "read"})), Reply()]
    )
    second = httpx.post(f"{unprivileged.url}/v1/chat/completions", json=chat("read", **session), timeout=90)
    assert second.status_code == 200, second.text
    assert tool_results(upstream.requests[-1])[0].splitlines()[0] == "nobody"


@pytest.mark.parametrize("forbidden", [False, True])
def test_a_non_dumpable_worker_is_unreadable_to_its_own_users_tools(forbidden: bool) -> None:
    """What protects the worker when the CLI runs as the worker's own (non-root) user."""
    system_python = Path("/usr/bin/python3")  # the venv's interpreter may live under /root
    if os.geteuid() != 0 or not system_python.exists():
        pytest.skip("needs root and /usr/bin/python3 to run the probe as an unprivileged user")
    if not _reachable_by_nobody(ROOT / "worker"):
        pytest.skip(f"the checkout ({ROOT}) is in a folder user nobody cannot enter")
    probe = (
        "import os, subprocess\n"
        "from worker.environment import forbid_inspection\n"
        f"if {forbidden}: forbid_inspection()\n"
        "path = f'/proc/{os.getpid()}/environ'\n"
        "print(subprocess.run(['cat', path], capture_output=True, text=True).returncode)\n"
    )
    probed = subprocess.run(
        [system_python, "-c", probe],
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "SECRET": REAL_KEY},
        user="nobody",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probed.returncode == 0, probed.stderr
    assert probed.stdout.strip() == ("1" if forbidden else "0")


def test_an_unreachable_model_api_behind_the_proxy_fails_the_job_with_502(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(
        workers=1,
        BACKEND="claude",
        ANTHROPIC_BASE_URL=f"http://127.0.0.1:{free_port()}",
        ANTHROPIC_API_KEY=REAL_KEY,
        CLAUDE_MAX_RETRIES="0",
    )
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat("hi"), timeout=90)
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_error"
    assert REAL_KEY not in response.text
