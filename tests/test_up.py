"""`claude-gateway up` as an operator runs it: it supervises what it starts, loses no job when a
worker dies, keeps credentials where they are needed, and takes its children with it.

Each child is killed with SIGKILL under a real `up` (scripted backend, short leases); the test
states within how long it must be back and that the others kept serving meanwhile.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from cli.embedded_redis import EmbeddedRedis, free_port
from tests.conftest import ROOT, chat, unit_db

CLIENT_KEY = "client-key-for-the-up-tests-0123456789"
MODEL_KEY = "sk-ant-model-key-only-workers-hold"
DRAIN_S = 2


def script(**spec: Any) -> str:
    return "script:" + json.dumps(spec)


def wait_for(predicate: Any, within_s: float, what: str) -> Any:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {within_s} s: {what}")


def children_of(pid: int) -> dict[int, str]:
    """The live child processes of `pid`, by role: "api", "worker" or "redis"."""
    found = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            cmdline = [
                part.decode() for part in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0") if part
            ]
        except FileNotFoundError:
            continue
        if cmdline and alive(int(child)):  # not exiting, nor exited and not yet reaped
            found[int(child)] = "redis" if "server" in cmdline[0] else cmdline[cmdline.index("cli.main") + 1]
    return found


def alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return False


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    state: Path
    port: int
    log: Path
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self, role: str) -> list[int]:
        return sorted(pid for pid, r in children_of(self.process.pid).items() if r == role)

    def redis(self) -> "redis.Redis[bytes]":
        return redis.Redis.from_url((self.state / "redis" / "url").read_text())

    def post(self, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=timeout)

    def completes(self) -> bool:
        response = self.post(chat("hello"))
        return response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "stop"

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False


def launched(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`claude-gateway up` with `env`, writing to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", "up"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def start_up(folder: Path) -> Up:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "API_KEYS")}
    env |= {
        "STATE_DIR": str(folder / "state"),
        "PORT": str(port),
        "WORKERS": "2",
        "BACKEND": "scripted",
        "API_KEY": CLIENT_KEY,
        "ANTHROPIC_API_KEY": MODEL_KEY,
        "DRAIN_TIMEOUT_S": str(DRAIN_S),
        "LEASE_S": "2",
        "LEASE_RENEW_S": "0.5",
        "LOG_LEVEL": "info",
        "WORKSPACE_ROOT": str(folder / "workspaces"),
        "RATE_LIMIT_ENABLED": "false",
        "MAX_CONCURRENT_JOBS_PER_KEY": "0",
    }
    log = folder / "up.log"
    process = launched(env, log)
    up = Up(process=process, state=folder / "state", port=port, log=log, env=env)
    try:
        wait_for(up.ready, 30, "up serves")
    except AssertionError:
        process.kill()
        raise AssertionError(log.read_text()) from None
    return up


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    running = start_up(tmp_path_factory.mktemp("up"))
    yield running
    if running.process.poll() is None:
        running.process.terminate()  # not killed: its counters' folder in memory goes with it
        running.process.wait(timeout=60)


def test_each_child_holds_only_what_it_needs_and_redis_requires_a_password(up: Up) -> None:
    for name in ("password", "url", "redis.conf"):
        assert (up.state / "redis" / name).stat().st_mode & 0o077 == 0, name
    password = (up.state / "redis" / "password").read_text()
    assert password in (up.state / "redis" / "url").read_text()
    port = int((up.state / "redis" / "url").read_text().rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()
    assert password not in Path(f"/proc/{up.pids('redis')[0]}/cmdline").read_text()
    # Bounded, as compose's (an outside probe filled an unbounded one from one key): full, it
    # refuses writes rather than growing until the machine runs out of memory.
    config = redis.Redis(port=port, password=password).config_get("maxmemory*")
    assert (config["maxmemory"], config["maxmemory-policy"]) == (str(1024**3), "noeviction")

    def environ(pid: int) -> str:
        return Path(f"/proc/{pid}/environ").read_text()

    apis = up.pids("api")
    assert len(apis) == 2  # API_PROCESSES, by default
    for api in apis:
        assert MODEL_KEY not in environ(api)  # the API never uses the model credentials
    for worker in up.pids("worker"):
        assert CLIENT_KEY not in environ(worker)  # the workers never check client keys


def test_what_up_keeps_is_for_its_own_user_only(up: Up) -> None:
    """Redis's data (every prompt and answer), the sessions' files and the metrics' counters are
    under folders no other user of the machine may enter, as Redis's password is (an outside
    probe read a caller's uploads and prompts as `nobody`)."""
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    files = {"file": ("secret.txt", b"a caller's secret")}
    url = f"{up.url}/v1/sessions/private-files/files"
    uploaded = httpx.post(url, files=files, headers=headers, timeout=30)
    assert uploaded.status_code == 200, uploaded.text
    assert up.completes()
    stored = [path for path in (up.state / "workspace-store").rglob("*") if path.is_file()]
    assert any(b"a caller's secret" in path.read_bytes() for path in stored)
    for folder in ("redis", "workspace-store"):
        assert (up.state / folder).stat().st_mode & 0o077 == 0, folder
    counters = list(Path("/dev/shm").glob("claude-gateway-counters-*"))
    assert counters, "the API processes' counters are in memory"
    for folder in counters:
        assert folder.stat().st_mode & 0o077 == 0, folder


def test_a_full_state_disk_leaves_the_api_processes_answering(
    tmp_path: Path, small_disk: Path, redis_server: EmbeddedRedis
) -> None:
    """Found by an outside probe: with STATE_DIR's disk full, every request answered with an error
    (a 404) killed its API process with SIGBUS, and `up` restarted it into the same death: the
    processes' shared metric counters were files there, written through `mmap`."""
    disk = small_disk
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEYS", "API_PROCESSES")}
    port = free_port()
    env |= {
        "REDIS_URL": unit_db(redis_server),  # not on the full disk: this is about STATE_DIR alone
        "STATE_DIR": str(disk / "state"),
        "PORT": str(port),
        "WORKERS": "1",
        "BACKEND": "scripted",
        "API_KEY": CLIENT_KEY,
        "WORKSPACE_ROOT": str(tmp_path / "workspaces"),
    }
    process = launched(env, tmp_path / "up.log")
    try:
        up = Up(process=process, state=disk / "state", port=port, log=tmp_path / "up.log", env=env)
        wait_for(up.ready, 30, "up serves")
        apis = up.pids("api")
        _fill(disk)
        keyed = {"Authorization": f"Bearer {CLIENT_KEY}"}
        for _ in range(6):  # new connections: each API process gets some
            assert httpx.get(f"{up.url}/nope", headers=keyed, timeout=10).status_code == 404
            assert httpx.get(f"{up.url}/v1/models", timeout=10).status_code == 401
        assert up.pids("api") == apis, (tmp_path / "up.log").read_text()[-2000:]
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB filesystem of the test's own (a tmpfs: mounting one needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]).returncode
    ):
        pytest.skip("needs root, to mount a small disk")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def _fill(disk: Path) -> None:
    with contextlib.suppress(OSError), (disk / "filler").open("wb", buffering=0) as filler:
        while True:  # until the disk is full
            filler.write(bytes(1 << 16))


def status_json(up: Up) -> dict[str, Any]:
    status = subprocess.run(
        [sys.executable, "-m", "cli.main", "status", "--json"],
        cwd=ROOT,
        env=up.env,
        capture_output=True,
        timeout=30,
        check=True,
    )
    snapshot: dict[str, Any] = json.loads(status.stdout)
    return snapshot


def test_a_killed_worker_is_restarted_while_the_rest_keeps_serving(up: Up) -> None:
    workers, api, redis_pid = up.pids("worker"), up.pids("api"), up.pids("redis")
    assert len(workers) == 2
    wait_for(lambda: len(status_json(up)["workers"]) == 2, 10, "both workers' heartbeats")
    killed_id = next(w["id"] for w in status_json(up)["workers"] if w["pid"] == workers[0])
    os.kill(workers[0], signal.SIGKILL)
    assert up.completes()  # the other worker serves meanwhile
    wait_for(lambda: len(up.pids("worker")) == 2, 10, "a new worker")
    assert workers[1] in up.pids("worker")
    assert (up.pids("api"), up.pids("redis")) == (api, redis_pid)
    log = up.log.read_text()
    assert f"worker 1 (pid {workers[0]}) was killed by SIGKILL" in log
    assert "restarting worker 1 in 1 s" in log
    snapshot = status_json(up)
    exits = snapshot["recent_worker_exits"]
    assert [(e["worker_id"], e["pid"], e["reason"]) for e in exits][:1] == [(killed_id, workers[0], "killed")]
    assert "SIGKILL" in exits[0]["detail"]
    # Gone from the live workers at once, not when its heartbeat expires (its slots counted free).
    assert killed_id not in [w["id"] for w in snapshot["workers"]]


def test_a_killed_api_process_is_restarted_while_the_other_serves(up: Up) -> None:
    killed, other = up.pids("api")
    workers = up.pids("worker")
    os.kill(killed, signal.SIGKILL)
    # The port's connections all go to the other process meanwhile (SO_REUSEPORT), each a new one.
    assert all(up.completes() for _ in range(8))
    wait_for(lambda: len(up.pids("api")) == 2, 10, "a new API process")
    assert other in up.pids("api")
    assert killed not in up.pids("api")
    assert all(up.completes() for _ in range(8))
    assert up.pids("worker") == workers
    assert f"(pid {killed}) was killed by SIGKILL" in up.log.read_text()


def test_the_api_processes_share_the_port(up: Up) -> None:
    """New connections spread over both processes: each answers some of 40 (its log says which)."""
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    for _ in range(40):
        assert httpx.get(f"{up.url}/v1/models", headers=headers, timeout=10).status_code == 200
    apis = up.pids("api")

    def answered() -> set[int]:
        lines = up.log.read_text().splitlines()
        return {pid for pid in apis for line in lines if f"[{pid}] GET /v1/models -> 200" in line}

    wait_for(lambda: answered() == set(apis), 5, "both API processes answered")


def test_every_scrape_counts_what_both_api_processes_counted(up: Up) -> None:
    """A scrape reaches either process; each reports the sum, a killed one's counts included."""

    def refused() -> float:
        text = httpx.get(
            f"{up.url}/metrics", headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=10
        ).text
        line = next(
            (
                line
                for line in text.splitlines()
                if line.startswith("gateway_api_errors_total{") and 'code="invalid_api_key"' in line
            ),
            "0 0",
        )
        return float(line.rsplit(" ", 1)[1])

    before = refused()
    for _ in range(20):  # new connections: both processes refuse some
        response = httpx.get(f"{up.url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert response.status_code == 401
    assert {refused() for _ in range(10)} == {before + 20}  # whichever process answers
    os.kill(up.pids("api")[0], signal.SIGKILL)
    wait_for(lambda: len(up.pids("api")) == 2, 10, "a new API process")
    assert {refused() for _ in range(10)} == {before + 20}


def test_a_killed_redis_is_restarted_from_its_own_data(up: Up) -> None:
    response = up.post(chat("remember me"))
    assert response.status_code == 200
    completion_id = response.json()["id"]
    time.sleep(1.5)  # the append-only file is synced every second
    [redis_pid] = up.pids("redis")
    os.kill(redis_pid, signal.SIGKILL)
    wait_for(lambda: up.pids("redis") and up.pids("redis") != [redis_pid], 10, "a new Redis")
    wait_for(up.ready, 20, "ready again")
    assert up.completes()
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    earlier = httpx.get(f"{up.url}/v1/chat/completions/{completion_id}", headers=headers, timeout=10)
    assert earlier.status_code == 200, earlier.text  # the job done before the crash is still there
    assert f"redis (pid {redis_pid}) was killed by SIGKILL" in up.log.read_text()


def test_a_killed_worker_loses_no_job(up: Up) -> None:
    """Its running jobs: retried if they had produced nothing, failed clearly if they had."""
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    prompts = [script(text="a ", tokens=400, delay_ms=20)] * 2 + [script(text="late", wait_ms=3000)] * 4
    ids = []
    for prompt in prompts:
        response = up.post(chat(prompt, background=True))
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    client = up.redis()

    def worker_of(completion_id: str) -> str:
        return (client.hget(f"gateway:job:{completion_id[9:]}", "worker") or b"").decode()

    wait_for(lambda: all(worker_of(i) for i in ids), 10, "all jobs run")
    worker_ids = {w["pid"]: w["id"] for w in status_json(up)["workers"]}

    def running_on(pid: int) -> list[str]:
        return [i for i in ids if worker_of(i) == worker_ids[pid]]

    # A job is placed on its worker before it starts: the talking ones must have talked already.
    wait_for(lambda: all(client.xlen(f"gateway:job:{i[9:]}:events") for i in ids[:2]), 10, "output")
    victim = max(up.pids("worker"), key=lambda pid: len(running_on(pid)))
    lost = running_on(victim)
    assert lost
    os.kill(victim, signal.SIGKILL)

    def final(completion_id: str) -> dict[str, Any] | None:
        url = f"{up.url}/v1/chat/completions/{completion_id}"
        body: dict[str, Any] = httpx.get(url, headers=headers, timeout=10).json()
        return body if body["status"] in ("completed", "failed") else None

    # Leases run out within LEASE_S (2 s); then the silent ones run again (3 s) elsewhere.
    results = {i: wait_for(lambda i=i: final(i), 20, f"job {i} ends") for i in ids}
    for completion_id, body in results.items():
        talking = ids.index(completion_id) < 2
        if completion_id in lost and talking:
            assert body["status"] == "failed"
            assert body["error"]["code"] == "worker_lost"
        else:
            assert body["status"] == "completed", body


def test_stopping_up_is_bounded_even_with_open_streams(up: Up) -> None:
    children = list(children_of(up.process.pid))
    body = chat(script(text="a ", tokens=100_000, delay_ms=50), stream=True)
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    url = f"{up.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as stream:
        next(stream.iter_lines())  # the stream is open and flowing
        began = time.monotonic()
        up.process.send_signal(signal.SIGTERM)
        up.process.wait(timeout=DRAIN_S + 15)
    took = time.monotonic() - began
    assert not [pid for pid in children if alive(pid)]
    assert took < DRAIN_S + 10, took


def test_a_hangup_stops_up_as_ctrl_c_does(tmp_path: Path) -> None:
    """Found by an outside probe: SIGHUP (a closed terminal, a dropped ssh session) ended `up` at
    once, and its Redis with it, under a worker still draining its job."""
    other = start_up(tmp_path)
    body = chat(script(text="a ", tokens=100_000, delay_ms=50), stream=True)
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    with httpx.stream(
        "POST", f"{other.url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as stream:
        lines = stream.iter_lines()
        next(lines)  # the stream is open and flowing
        other.process.send_signal(signal.SIGHUP)
        rest = "\n".join(lines)
    assert "server_shutting_down" in rest  # the API drained it, as on SIGTERM
    assert other.process.wait(timeout=DRAIN_S + 15) == 0


def test_the_workers_a_second_stop_kills_are_recorded(tmp_path: Path) -> None:
    """Found by an outside probe: a second Ctrl-C killed the workers, Redis with them, and their
    exits were never recorded."""
    first = start_up(tmp_path)
    response = first.post(chat(script(text="a ", tokens=1000, delay_ms=50), background=True))
    assert response.status_code == 200, response.text
    first.process.send_signal(signal.SIGTERM)  # the workers drain the job
    time.sleep(1)
    first.process.send_signal(signal.SIGINT)  # now
    first.process.wait(timeout=30)
    again = start_up(tmp_path)
    try:
        exits = status_json(again)["recent_worker_exits"]
    finally:
        again.process.terminate()
        again.process.wait(timeout=DRAIN_S + 15)
    # The idle worker had drained and stopped; the one running the job was killed.
    assert sorted((e["reason"], e["detail"]) for e in exits) == [
        ("killed", "was killed by up's stop"),
        ("shutdown", "SIGTERM"),
    ], exits


def test_a_worker_whose_start_fails_exits_and_says_why(tmp_path: Path) -> None:
    """Found by an outside probe: a worker whose backend could not start (a CLAUDE_JOB_USER that
    does not exist) went on beating, alive to /ready and `status`, its error unsaid until `up`
    was stopped: its heartbeat's loop had swallowed its cancellation."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "API_KEYS")}
    env |= {"STATE_DIR": str(tmp_path / "state"), "PORT": str(free_port()), "WORKERS": "1"}
    env |= {"BACKEND": "claude", "ANTHROPIC_API_KEY": MODEL_KEY, "CLAUDE_JOB_USER": "no-such-user-here"}
    log = tmp_path / "up.log"
    process = launched(env, log)
    try:
        wait_for(lambda: "exited with status 1" in log.read_text(), 30, "the worker's exit")
        assert "no-such-user-here" in log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=DRAIN_S + 15)


def test_up_refuses_a_port_already_in_use(tmp_path: Path) -> None:
    """Its API processes share their port: another gateway's on it would share it with them."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env |= {"STATE_DIR": str(tmp_path / "state"), "PORT": str(port), "BACKEND": "scripted"}
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "up"], cwd=ROOT, env=env, capture_output=True, timeout=30
        )
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr.decode()
    assert not (tmp_path / "state" / "redis").exists()  # nothing was started


def test_an_unusable_state_folder_is_said_in_a_line(tmp_path: Path) -> None:
    """Found by an outside probe: a STATE_DIR that is a file, or under one, or not writable,
    ended `up` with a Python traceback."""
    (tmp_path / "afile").write_text("")
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "redis").write_text("")  # the re-check probe: a folder of its own in the way
    # Its Redis's password unreadable (another user's file, for an outside probe; here a folder).
    (tmp_path / "s2" / "redis" / "password").mkdir(parents=True)
    unusable = {
        tmp_path / "afile": tmp_path / "afile",
        tmp_path / "afile" / "sub": tmp_path / "afile" / "sub",
        Path("/proc/gateway-state"): Path("/proc/gateway-state"),
        tmp_path / "s1": tmp_path / "s1" / "redis",
        tmp_path / "s2": tmp_path / "s2" / "redis" / "password",
    }
    for state, folder in unusable.items():
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "API_PROCESSES")}
        env |= {"STATE_DIR": str(state), "PORT": str(free_port()), "BACKEND": "scripted"}
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "up"], cwd=ROOT, env=env, capture_output=True, timeout=30
        )
        assert done.returncode != 0
        said = done.stderr.decode()
        assert said.startswith(f"claude-gateway up: cannot use STATE_DIR: {folder} ("), said
        assert "Traceback" not in said


def test_an_api_processs_counters_take_their_room_at_start(
    small_disk: Path, redis_server: EmbeddedRedis
) -> None:
    """Found by a re-check probe: with the counters' folder full (a small /dev/shm, as a
    container's), the first error answered killed the API process with SIGBUS, again and again.
    Its counters' room is taken at start: a full folder later kills nothing, and no room at
    start is said in a line."""
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEYS",)}
    env |= {
        "REDIS_URL": unit_db(redis_server),
        "BACKEND": "scripted",
        "API_KEY": CLIENT_KEY,
        "PROMETHEUS_MULTIPROC_DIR": str(small_disk),
        "API_SHARED_PORT": "true",
    }
    _serves_on_a_full_folder(env, small_disk)
    again = subprocess.run(
        [sys.executable, "-m", "cli.main", "api"],
        cwd=ROOT,
        env={**env, "PORT": str(free_port())},
        capture_output=True,
        timeout=60,
    )
    assert again.returncode != 0
    assert "no room for its metrics' counters" in again.stderr.decode(), again.stderr.decode()


def _serves_on_a_full_folder(env: dict[str, str], disk: Path) -> None:
    """An API process whose counters' folder fills up while it serves answers its errors."""
    port = free_port()
    api = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "api"], cwd=ROOT, env={**env, "PORT": str(port)}
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(f"{url}/health"), 30, "the API serves")
        _fill(disk)
        keyed = {"Authorization": f"Bearer {CLIENT_KEY}"}
        for _ in range(3):
            assert httpx.get(f"{url}/nope", headers=keyed, timeout=10).status_code == 404
            assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        assert api.poll() is None
    finally:
        api.terminate()
        api.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_a_private_redis_that_cannot_write_its_log_is_not_blamed_on_its_data(tmp_path: Path) -> None:
    """Found by an outside probe: a private Redis that could not open its log (another user's) was
    said not to start with an earlier run's last log lines, and the operator told to move its data
    away (every key, session and job)."""
    state = tmp_path / "state"
    (state / "redis" / "server.log").mkdir(parents=True)  # unwritable even by root
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "API_PROCESSES")}
    env |= {"STATE_DIR": str(state), "PORT": str(free_port()), "BACKEND": "scripted", "API_KEY": CLIENT_KEY}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "up"], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    said = done.stderr.decode()
    assert done.returncode != 0
    assert "wrote nothing to" in said, said
    assert "every file in it" in said, said
    assert "move" not in said, said
    assert "Traceback" not in said, said


def test_a_second_up_on_the_same_state_folder_is_refused(tmp_path: Path) -> None:
    """Found by an outside probe: a second `up` on another port but the same STATE_DIR ran a
    second Redis on the first one's data, emptied its metric counters and removed its Redis URL."""
    up = start_up(tmp_path)  # its own: the module's is stopped by an earlier test
    try:
        url_file = up.state / "redis" / "url"
        before = url_file.read_text()
        env = {**up.env, "PORT": str(free_port())}
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "up"], cwd=ROOT, env=env, capture_output=True, timeout=30
        )
        assert done.returncode != 0
        assert f"another `up` runs on STATE_DIR={up.state}" in done.stderr.decode()
        assert url_file.read_text() == before
        assert up.completes()
        # A copy of its STATE_DIR names its counters' folder: another `up` there leaves it (a
        # re-check probe's first `up` lost its counters, and its /metrics answered 500).
        counters = Path((up.state / "api-counters").read_text())
        copy = tmp_path / "copy"
        (copy / "state").mkdir(parents=True)
        (copy / "state" / "api-counters").write_text(str(counters))
        other = start_up(copy)
        other.process.terminate()
        other.process.wait(timeout=60)
        assert counters.is_dir()
        scraped = httpx.get(
            f"{up.url}/metrics", headers={"Authorization": f"Bearer {CLIENT_KEY}"}, timeout=10
        )
        assert scraped.status_code == 200
    finally:
        up.process.terminate()
        up.process.wait(timeout=60)


def test_children_die_with_a_killed_up(tmp_path: Path) -> None:
    other = start_up(tmp_path)
    children = list(children_of(other.process.pid))
    assert len(children) == 5  # Redis, two API processes, two workers
    other.process.kill()
    other.process.wait()
    wait_for(lambda: not [pid for pid in children if alive(pid)], DRAIN_S + 10, "every child gone")
    # Its API processes' counters, in memory, go with the next `up` of its state folder.
    counters = Path((tmp_path / "state" / "api-counters").read_text())
    assert counters.is_dir()
    again = start_up(tmp_path)
    assert not counters.exists()
    counters = Path((tmp_path / "state" / "api-counters").read_text())
    again.process.terminate()
    again.process.wait(timeout=60)
    assert not counters.exists()  # and an `up` that stops removes its own
