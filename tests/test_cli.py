"""`claude-gateway up` on a machine with no Redis configured, and where its server comes from."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis as SyncRedis

from cli import embedded_redis
from cli.embedded_redis import EmbeddedRedis, free_port
from shared import heartbeats
from tests.conftest import ROOT, Gateway, chat, unit_db


def test_up_runs_everything_with_a_private_redis_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(PORT=str(port), WORKERS="1", BACKEND="scripted", STATE_DIR=str(tmp_path), LOG_LEVEL="warning")
    up = subprocess.Popen([sys.executable, "-m", "cli.main", "up"], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json=chat("hi"), timeout=10
                )
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the gateway did not come up"
                time.sleep(0.1)
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == "Hello from the scripted backend."
        assert (tmp_path / "redis" / "appendonlydir").is_dir()  # its data lives under the state folder
        status = subprocess.run(
            [sys.executable, "-m", "cli.main", "status", "--json"], cwd=ROOT, env=env, capture_output=True
        )
        assert status.returncode == 0, status.stderr  # finds the private Redis without REDIS_URL
        assert json.loads(status.stdout)["stats"]["jobs"] == {"completed": 1}
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0
        assert up.stderr is not None
        assert "stopping: running jobs get up to" in up.stderr.read().decode()  # not a silent wait
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        log = (tmp_path / "redis" / "server.log").read_text()
        assert "ready to exit" in log.lower() or "bye" in log.lower()
    finally:
        if up.poll() is None:
            up.kill()


def test_without_a_server_on_the_path_the_bundled_valkey_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded_redis.shutil, "which", lambda name: None)
    binary = embedded_redis.server_binary()
    assert binary.name == "valkey-server"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("Valkey server")


def test_the_private_redis_keeps_to_the_binary_that_wrote_its_data(tmp_path: Path) -> None:
    """Found by an outside probe: `up` ran on the bundled Valkey, a Redis found on the PATH later
    could not read its files, and `up` ended with a traceback. The data folder names the binary
    that wrote it, and later starts keep to it; one that fails says why, from the server's log."""
    data = tmp_path / "redis"
    server = embedded_redis.EmbeddedRedis(data)
    server.start()
    server.stop()
    assert Path((data / "server-binary").read_text().strip()) == embedded_redis.server_binary()
    # The binary that wrote it (a wrapper here, to see it run), not the first on the PATH.
    marker = tmp_path / "ran"
    wrapper = tmp_path / "the-one-that-wrote-it"
    wrapper.write_text(f'#!/bin/sh\ntouch {marker}\nexec {embedded_redis.server_binary()} "$@"\n')
    wrapper.chmod(0o755)
    (data / "server-binary").write_text(f"{wrapper}\n")
    server = embedded_redis.EmbeddedRedis(data)
    server.start()
    server.stop()
    assert marker.exists()
    # Data it cannot read: the reason, and what to do.
    (data / "server-binary").unlink()
    for manifest in data.glob("appendonlydir/*.manifest"):
        manifest.write_text("not a manifest\n")
    with pytest.raises(embedded_redis.RedisStartError) as failed:
        embedded_redis.EmbeddedRedis(data).start()
    assert "did not start" in str(failed.value)
    assert "start the one that wrote it first on the PATH" in str(failed.value)


@pytest.mark.parametrize(
    ("env", "argv", "said"),
    [
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, ["keys", "list"], "claude-gateway keys: cannot reach Redis"),
        # A URL that is not Redis's is said at start (found by an outside probe: `up` restarted its
        # processes forever, each saying it could not reach Redis), as are proxies and models
        # that are not (every request was a plain-text 500, or a 404, while /ready said ready).
        ({"REDIS_URL": "notaurl"}, ["keys", "list"], "invalid configuration: REDIS_URL: use redis://"),
        ({"REDIS_URL": "http://x"}, ["up"], "invalid configuration: REDIS_URL: use redis://"),
        ({"TRUSTED_PROXIES": '["10.0.0.0/8", "lb.internal"]'}, ["api"], "'lb.internal' is not an IP"),
        ({"MODELS": "[]"}, ["api"], "invalid configuration: MODELS: List should have at least 1 item"),
        ({"MODELS": '[""]'}, ["api"], "invalid configuration: MODELS.0: String should match"),
        ({"LOG_LEVEL": "loud"}, ["status"], "invalid configuration: LOG_LEVEL"),
        # Found by an outside probe: without its '/', a prefix let the agent have the model API
        # fetch https://images.example.com.evil.net/ through the credential proxy.
        (
            {"IMAGE_URL_ALLOWLIST": '["https://images.example.com"]'},
            ["api"],
            "IMAGE_URL_ALLOWLIST: 'https://images.example.com': an https:// URL prefix",
        ),
        ({"MODELS": "[oops"}, ["status"], "invalid configuration: MODELS: must be a JSON list"),
        ({"MODEL_ALIASES": "x"}, ["status"], "invalid configuration: MODEL_ALIASES: must be a JSON mapping"),
        ({"PORT": "99999"}, ["api"], "invalid configuration: PORT: Input should be less than or equal"),
        # An outside probe's WORKERS=100000 started workers until it was stopped.
        ({"WORKERS": "100000"}, ["up"], "invalid configuration: WORKERS: Input should be less than or equal"),
        ({}, ["status", "--watch", "0"], "not a positive number of seconds"),
        # Found by an outside probe: each of these was a traceback, or a worker losing its jobs.
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, ["worker"], "claude-gateway worker: cannot reach Redis"),
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, ["api"], "claude-gateway api: cannot reach Redis"),
        (
            {"REDIS_URL": "redis://127.0.0.1:1/0", "WORKSPACE_ROOT": "/proc/sys/gateway"},
            ["worker"],
            "claude-gateway worker: cannot use WORKSPACE_ROOT=/proc/sys/gateway",
        ),
        # Where it looked for a running `up` (an outside probe ran status from another folder).
        ({}, ["status"], "no `claude-gateway up` runs with its state in /"),
        ({}, ["keys", "list"], "(STATE_DIR, as up was given it)"),
        (
            {"LEASE_S": "1", "LEASE_RENEW_S": "5"},
            ["worker"],
            "invalid configuration: LEASE_RENEW_S (5) must be under half of LEASE_S (1)",
        ),
        # Found by an outside probe: each of these started, then failed at runtime (every request a
        # 500, a worker never alive, a traceback), or the CLI used another database than the rest.
        (
            {"EVENT_TTL_S": "10000000000000000"},
            ["api"],
            "invalid configuration: EVENT_TTL_S (1e+16 s) is over",
        ),
        (
            {"HEARTBEAT_INTERVAL_S": "inf"},
            ["worker"],
            "invalid configuration: HEARTBEAT_INTERVAL_S: Input should be a finite",
        ),
        (  # and the value is not echoed: a password with a '/' in it was (a re-check probe)
            {"REDIS_URL": "redis://:pw/secret@127.0.0.1:1/x"},
            ["keys", "list"],
            "REDIS_URL: the database (the URL's path) must be a number",
        ),
        ({"CLAUDE_PERMISSION_MODES": "[]"}, ["api"], "CLAUDE_PERMISSION_MODES: List should have at least 1"),
        ({"PORT": "0"}, ["up"], "claude-gateway up: PORT=0 picks no one port"),
        # Found by an outside probe: each started, then failed every job or upload.
        (
            {"CLAUDE_CWD": "/nonexistent/dir"},
            ["up"],
            "claude-gateway up: cannot use CLAUDE_CWD=/nonexistent/dir",
        ),
        (
            {"REDIS_URL": "redis://127.0.0.1:1/0", "CLAUDE_CWD": "/nonexistent/dir"},
            ["worker"],
            "claude-gateway worker: cannot use CLAUDE_CWD=/nonexistent/dir",
        ),
        (
            {"WORKSPACE_STORE": "s3://"},
            ["status"],
            "invalid configuration: WORKSPACE_STORE: use file:///path or s3://bucket/prefix",
        ),
        ({}, ["worker", "--id", "../w"], "a worker id is 1 to 128 of A-Z a-z 0-9 . _ -"),
        # An id names the worker's folders: `..` named its workspace root's parent (a re-check probe).
        ({}, ["worker", "--id", ".."], "a letter or digit first"),
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, ["up"], "claude-gateway up: cannot reach Redis"),
        (
            {"WORKSPACE_ROOT": "/proc/sys/gateway"},
            ["up"],
            "claude-gateway up: cannot use WORKSPACE_ROOT=/proc/sys/gateway",
        ),
        (
            {"WORKSPACE_STORE": "file:///proc/nope"},
            ["up"],
            "claude-gateway up: cannot use WORKSPACE_STORE=/proc/nope",
        ),
        (
            {"REDIS_URL": "redis://127.0.0.1:1/0", "WORKSPACE_STORE": "file:///proc/nope"},
            ["api"],
            "claude-gateway api: cannot use WORKSPACE_STORE=/proc/nope",
        ),
    ],
)
def test_an_operators_mistake_is_one_line_not_a_traceback(
    env: dict[str, str], argv: list[str], said: str, tmp_path: Path
) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LOG_LEVEL", "MODELS")}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *argv],
        cwd=ROOT,
        env={**base, "STATE_DIR": str(tmp_path), **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "secret" not in done.stderr, done.stderr


def test_the_gateways_processes_may_open_files_to_the_hard_limit() -> None:
    """A worker holds a file per folder of a session's files it saves; the soft limit's usual
    1,024 refused a session of 1,200 folders (an outside probe)."""
    script = (
        "import resource\n"
        "from cli.main import _open_files_to_the_hard_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "_open_files_to_the_hard_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(hard, 1 << 20) > 256)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.stdout.strip() == "True", done.stderr


def test_a_worker_refuses_the_id_of_a_live_worker(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    """Two workers of one id would share a heartbeat and each other's pushed jobs."""
    url = unit_db(redis_server)
    SyncRedis.from_url(url).set(heartbeats.worker_key("w-1"), "{}", ex=60)
    base = {k: v for k, v in os.environ.items() if k not in ("LOG_LEVEL", "MODELS")}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "worker", "--id", "w-1"],
        cwd=ROOT,
        # It waits out a heartbeat's TTL (1.5 s here): a killed worker's id is free by then.
        env={
            **base,
            "STATE_DIR": str(tmp_path),
            "REDIS_URL": url,
            "BACKEND": "scripted",
            "HEARTBEAT_INTERVAL_S": "0.5",
        },
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stderr.strip()) == (
        1,
        "claude-gateway worker: a live worker has the id w-1",
    )


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (["up"], "run Redis"),
        (["worker"], "run one worker"),
        (["keys"], "manage client API keys"),
        (["keys", "open"], "with no managed key left"),
    ],
)
def test_each_commands_help_says_what_it_does(command: list[str], says: str) -> None:
    """Found by an outside probe: `up --help` printed only its usage line."""
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0
    assert says in done.stdout


def test_a_hangup_stops_an_api_process_as_sigterm_does(start_gateway: Any) -> None:
    """Found by an outside probe: `claude-gateway api` in a terminal that closed was killed by the
    hangup, its open streams cut, instead of ending them as on SIGTERM (they resume by id)."""
    gateway: Gateway = start_gateway(workers=1, BACKEND="scripted", DRAIN_TIMEOUT_S="2")
    api = next(process for process in gateway.processes if process not in gateway.workers)
    body = chat("script:" + json.dumps({"text": "a ", "tokens": 1000, "delay_ms": 20}), stream=True)
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=30) as stream:
        lines = stream.iter_lines()
        next(lines)
        api.send_signal(signal.SIGHUP)
        rest = "\n".join(lines)
    assert "server_shutting_down" in rest
    assert api.wait(timeout=15) in (0, -signal.SIGTERM)


def test_keys_against_a_frozen_redis_fail_in_seconds(tmp_path: Path) -> None:
    """Found by an outside probe: `keys list|create|revoke|open` waited for good on a Redis that
    accepted the connection and never answered (SIGSTOP), where `status` failed in seconds."""
    frozen = embedded_redis.EmbeddedRedis(tmp_path / "redis", persistent=False)
    frozen.start()
    assert frozen.process is not None
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        env = {**os.environ, "REDIS_URL": frozen.url, "STATE_DIR": str(tmp_path)}
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "keys", "list"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        frozen.process.send_signal(signal.SIGCONT)
        frozen.stop()
    assert done.returncode != 0
    assert "claude-gateway keys: cannot reach Redis" in done.stderr, done.stderr


def test_a_status_watch_goes_on_through_a_redis_outage(tmp_path: Path) -> None:
    """Found by an outside probe: `status --watch` exited at the first error, when the operator
    needed it most. Each refresh that cannot reach Redis is a frame saying so."""
    env = {**os.environ, "STATE_DIR": str(tmp_path), "REDIS_URL": "redis://127.0.0.1:1/0"}
    watch = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "status", "--watch", "0.2"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)
    assert watch.poll() is None, watch.communicate()
    watch.send_signal(signal.SIGINT)
    out, _ = watch.communicate(timeout=10)
    assert out.count("cannot reach Redis") >= 2, out


def test_the_redis_of_an_up_that_was_killed_is_not_looked_for(tmp_path: Path) -> None:
    """Found by an outside probe: after `up` was killed (kill -9), its private Redis's URL file
    stayed, and `status` said it could not reach that Redis, not that no `up` runs."""
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "url").write_text("redis://127.0.0.1:1/0")
    (tmp_path / "up.lock").touch()  # no `up` holds it
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "status"],
        cwd=ROOT,
        env={**env, "STATE_DIR": str(tmp_path)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "no `claude-gateway up` runs with its state in" in done.stderr, done.stderr


def test_of_two_workers_started_together_with_one_id_one_is_refused(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """Found by a re-check probe: both had checked the id free, then shared a heartbeat, pushed
    jobs and a sessions folder."""
    base = {k: v for k, v in os.environ.items() if k not in ("LOG_LEVEL", "MODELS")}
    env = {**base, "STATE_DIR": str(tmp_path), "REDIS_URL": unit_db(redis_server), "BACKEND": "scripted"}
    env |= {"HEARTBEAT_INTERVAL_S": "0.5", "WORKSPACE_ROOT": str(tmp_path / "workspaces")}
    command = [sys.executable, "-m", "cli.main", "worker", "--id", "twin"]
    twins = [
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 30
        while all(twin.poll() is None for twin in twins):
            assert time.monotonic() < deadline, "both run"
            time.sleep(0.1)
        time.sleep(1)
        [refused] = [twin for twin in twins if twin.poll() is not None]
        assert [twin.poll() for twin in twins].count(None) == 1  # the other runs on
        assert refused.returncode == 1
        assert "a live worker has the id twin" in (refused.stderr.read() if refused.stderr else "")
    finally:
        for twin in twins:
            twin.kill()
            twin.wait()


def test_a_worker_stopped_while_its_redis_is_gone_exits_cleanly(tmp_path: Path) -> None:
    """Found by an outside probe: a SIGTERM during a Redis outage (a rollout's restart) exited the
    worker with status 1, an ERROR and a traceback, its backend's shutdown skipped."""
    server = EmbeddedRedis(tmp_path / "redis", persistent=False)
    server.start()
    base = {k: v for k, v in os.environ.items() if k not in ("LOG_LEVEL", "MODELS")}
    env = {**base, "STATE_DIR": str(tmp_path), "REDIS_URL": server.url, "BACKEND": "scripted"}
    env["WORKSPACE_ROOT"] = str(tmp_path / "workspaces")
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not SyncRedis.from_url(server.url).keys("gateway:worker:*"):  # its first heartbeat
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.1)
        server.stop()
        worker.send_signal(signal.SIGTERM)
        _, errors = worker.communicate(timeout=30)
    finally:
        worker.kill()
    assert worker.returncode == 0, errors
    assert "Traceback" not in errors, errors
    assert "stopped by an error" not in errors, errors
