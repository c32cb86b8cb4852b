"""A session's workspace on the real Claude path, following the session across worker processes.

Real SDK and CLI (the fake upstream scripts its Bash tool calls), real Redis, and each workspace
store: the local one and a real S3 server. Every turn after the first runs on a new worker
process, the previous one stopped, so the files it reads can only come from the store.
"""

import io
import tarfile
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, chat, claude_env, workspace_store_env
from tests.fake_anthropic import FakeAnthropic, Reply, tool_results
from tests.test_claude_sessions import _only_worker

pytestmark = pytest.mark.claude


@pytest.fixture(scope="module", params=["local", "s3"])
def claude_files(
    request: pytest.FixtureRequest, start_gateway: Any, fake_anthropic: FakeAnthropic, tmp_path_factory: Any
) -> Gateway:
    s3 = request.getfixturevalue("s3_server") if request.param == "s3" else None
    store = workspace_store_env(request.param, s3, tmp_path_factory.mktemp("store"))
    gateway: Gateway = start_gateway(workers=1, **claude_env(fake_anthropic, **store))
    return gateway


def _bash_turn(gateway: Gateway, upstream: FakeAnthropic, session: str, command: str) -> str:
    """One turn whose agent runs `command`; returns what the tool printed."""
    upstream.script.extend([Reply(tool_use=("Bash", {"command": command, "description": "step"})), Reply()])
    before = len(upstream.requests)
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat(command, session_id=session), timeout=120
    )
    assert response.status_code == 200, response.text
    assert len(upstream.requests) == before + 2
    return "\n".join(tool_results(upstream.requests[-1])[-1:])


def _worker_of(gateway: Gateway, completion_id: str) -> str:
    record = gateway.redis().hget(f"gateway:job:{completion_id.removeprefix('chatcmpl-')}", "worker")
    assert record is not None
    return record.decode()


def test_files_follow_the_session_across_worker_processes(
    claude_files: Gateway, upstream: FakeAnthropic
) -> None:
    sid = "files-across-workers"
    uploaded = httpx.post(  # the store's first write (S3: a volume grown) took over 5 s in a CI run
        f"{claude_files.url}/v1/sessions/{sid}/files",
        files={"file": ("input.txt", b"given by the caller\n")},
        timeout=60,
    )
    assert uploaded.status_code == 200, uploaded.text

    # Turn 1 reads the uploaded file, writes one of its own, and links inside and out of the workspace.
    command = (
        "cat input.txt && printf 'written in turn 1\\n' > notes.txt && ln -s notes.txt in && ln -s /etc out"
    )
    output = _bash_turn(claude_files, upstream, sid, command)
    assert "given by the caller" in output
    workers = {claude_files.workers[-1].pid}
    for number in range(2, 6):
        claude_files.start_worker()
        _only_worker(claude_files)  # the worker that holds the files is gone
        workers.add(claude_files.workers[-1].pid)
        output = _bash_turn(
            claude_files, upstream, sid, f"cat notes.txt && echo 'turn {number}' >> notes.txt"
        )
        assert "written in turn 1" in output, output
        if number > 2:
            assert f"turn {number - 1}" in output, output
    assert len(workers) == 5
    # A turn that stays on its worker: its save looks only where the sandboxed agent changed things.
    command = "echo 'turn 6' >> notes.txt && mkdir -p sub/deeper && echo deep > sub/deeper/f.txt && rm in"
    _bash_turn(claude_files, upstream, sid, command + " && ln -s notes.txt in && mkdir -p keep/empty")
    claude_files.start_worker()
    _only_worker(claude_files)
    output = _bash_turn(claude_files, upstream, sid, "cat sub/deeper/f.txt && ls -d keep/empty && ls -l")
    assert "deep" in output, output
    assert "keep/empty" in output, output  # an empty folder is kept too
    # The link inside the workspace came along; the one leading out of it did not.
    assert "in -> notes.txt" in output, output
    assert "out" not in output.split(), output

    expected = b"written in turn 1\n" + b"".join(f"turn {n}\n".encode() for n in range(2, 7))
    listing = httpx.get(f"{claude_files.url}/v1/sessions/{sid}/files", timeout=30).json()["data"]
    notes = next(item for item in listing if item["path"] == "notes.txt")
    assert notes["source"] == "assistant"
    content = httpx.get(f"{claude_files.url}/v1/sessions/{sid}/files/{notes['id']}/content", timeout=30)
    assert content.content == expected
    archive = httpx.get(f"{claude_files.url}/v1/sessions/{sid}/archive", timeout=30)
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        member = tar.extractfile("notes.txt")
        assert member is not None
        assert member.read() == expected
        assert sorted(tar.getnames()) == ["in", "input.txt", "keep/empty", "notes.txt", "sub/deeper/f.txt"]
        assert tar.getmember("in").linkname == "notes.txt"
