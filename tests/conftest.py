"""Real parts for the suite: a Redis server, gateway processes on loopback, a fake Anthropic API.

Integration tests run the gateway exactly as an operator would (`python -m cli.main api|worker`)
against a `redis-server` this suite starts on a free port; each gateway gets its own database.
"""

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from cli.children import die_with_parent
from cli.embedded_redis import EmbeddedRedis, free_port
from shared.events import EventReader, JobEventValue
from tests.fake_anthropic import FakeAnthropic
from tests.s3_server import SeaweedS3

ROOT = Path(__file__).resolve().parent.parent
_SCHEMAS = json.loads((Path(__file__).parent / "schemas" / "openai.json").read_text())


def assert_schema(instance: Any, name: str) -> None:
    """Validates a response body or chunk against the official OpenAI schema `name`."""
    jsonschema.validate(instance, {**_SCHEMAS, "$ref": f"#/$defs/{name}"})


def assert_documented(
    gateway: "Gateway", method: str, path: str, instance: Any, status: int = 200, **headers: str
) -> None:
    """Validates a body against the schema the gateway's own OpenAPI document gives for
    `method path` (for the gateway's endpoints that OpenAI's spec does not have)."""
    document = httpx.get(f"{gateway.url}/openapi.json", headers=headers, timeout=10).json()
    response = document["paths"][path][method]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": document["components"]}).validate(instance)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persistent=False, databases=DATABASES)
    server.start()
    yield server
    server.stop()


DATABASES = 256
LOG_TAIL_LINES = 40
"""Each gateway gets a database of its own (counting up from 1); unit tests use `unit_db()`."""
_databases = itertools.count(1)
_unit_databases = itertools.count(DATABASES - 1, -1)


def unit_db(redis_server: EmbeddedRedis) -> str:
    """The URL of a database no gateway of this run uses."""
    return f"redis://127.0.0.1:{redis_server.port}/{next(_unit_databases)}"


@pytest.fixture(name="redis")
async def unit_redis(redis_server: EmbeddedRedis) -> AsyncIterator[AsyncRedis]:
    """An asyncio client of a database of the test's own."""
    client = AsyncRedis.from_url(unit_db(redis_server))
    yield client
    await client.aclose()


@dataclass
class Gateway:
    """An API process and its worker processes, sharing one Redis database."""

    redis_url: str
    env: dict[str, str]
    logs: Path
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    session_wide: bool = False
    """Shared by the whole run (`scripted`, `claude`); any other gateway stops with the test or
    module that started it, so a run never holds hundreds of idle processes."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, role: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{role}-{len(self.processes)}.log").open("wb")
        env = {**os.environ, **self.env, "REDIS_URL": self.redis_url, "PORT": str(self.port)}
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", role],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),  # a killed test run leaves no gateway behind
        )
        self.processes.append(process)
        return process

    def start_api(self) -> None:
        """Starts an API process and waits until it answers. `free_port`'s port is only free when
        asked: an outgoing connection may take it as its own before the API binds it (CI at
        6cd1d45), so a port found taken is replaced, twice at most."""
        for _ in range(3):
            log = self.logs / f"api-{len(self.processes)}.log"
            api = self._spawn("api")
            deadline = time.monotonic() + 45
            while True:
                try:
                    if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if api.poll() is not None and b"Address already in use" in log.read_bytes():
                    self.port = free_port()
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"API did not start; see {self.logs}")
                time.sleep(0.05)
        raise RuntimeError(f"API found its port taken three times; see {self.logs}")

    def start_worker(self) -> subprocess.Popen[bytes]:
        worker = self._spawn("worker")
        self.workers.append(worker)
        return worker

    def redis(self) -> "redis.Redis[bytes]":
        return redis.Redis.from_url(self.redis_url)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="session")
def started_gateways() -> Iterator[list[Gateway]]:
    """Every gateway of the run that is still up, in the order they started."""
    started: list[Gateway] = []
    yield started
    for gateway in started:
        gateway.stop()


def _stop_started_since(started: list[Gateway], mark: int) -> None:
    for gateway in [gateway for gateway in started[mark:] if not gateway.session_wide]:
        gateway.stop()
        started.remove(gateway)


@pytest.fixture(scope="module", autouse=True)
def _module_gateways(started_gateways: list[Gateway]) -> Iterator[None]:
    """Stops the gateways a module's fixtures and tests started when the module ends."""
    mark = len(started_gateways)
    yield
    _stop_started_since(started_gateways, mark)


@pytest.fixture(autouse=True)
def _test_gateways(started_gateways: list[Gateway], request: pytest.FixtureRequest) -> Iterator[None]:
    """Stops the gateways a test (or its function-scoped fixtures) started when the test ends."""
    mark = len(started_gateways)
    request.node.gateways_up = started_gateways
    yield
    _stop_started_since(started_gateways, mark)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report ends with the last lines of the logs of every gateway up (its own,
    its module's, the run's shared ones): CI keeps nothing else of a run."""
    report = yield
    if report.when == "call" and report.failed:
        for gateway in getattr(item, "gateways_up", ()):
            for log in sorted(gateway.logs.glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
                report.sections.append((f"{log.name} ({gateway.logs})", "\n".join(tail)))
    return report


@pytest.fixture(scope="session")
def start_gateway(
    redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory, started_gateways: list[Gateway]
) -> Any:
    """A factory: `start_gateway(workers=2, **env)` starts an API and its workers on a fresh database
    of the suite's Redis (or on `redis_url`); it stops with the test or module that started it."""
    started = started_gateways

    def start(
        *, workers: int = 2, redis_url: str | None = None, session_wide: bool = False, **env: str
    ) -> Gateway:
        db = next(_databases)
        logs = tmp_path_factory.mktemp(f"gateway-{db}")
        base_env = {
            "LOG_LEVEL": "warning",
            "WORKSPACE_ROOT": str(logs / "workspaces"),
            "CLAUDE_SKILLS_DIR": str(logs / "skills"),  # not this machine's ~/.claude/skills
            # Quotas are off unless a test is about them: every test client shares 127.0.0.1.
            "RATE_LIMIT_ENABLED": "false",
            "MAX_CONCURRENT_JOBS_PER_KEY": "0",
        }
        redis_url = redis_url or f"redis://127.0.0.1:{redis_server.port}/{db}"
        gateway = Gateway(redis_url=redis_url, env={**base_env, **env}, logs=logs, session_wide=session_wide)
        started.append(gateway)
        for _ in range(workers):
            gateway.start_worker()
        gateway.start_api()
        return gateway

    return start


@pytest.fixture(scope="session")
def scripted(start_gateway: Any) -> Gateway:
    """The shared gateway on the scripted backend, with a small body limit to test against."""
    gateway: Gateway = start_gateway(
        workers=2, session_wide=True, BACKEND="scripted", MAX_REQUEST_BYTES="65536"
    )
    return gateway


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3-compatible server on loopback, started once for the run (`tests/s3_server.py`)."""
    server = SeaweedS3(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


def workspace_store_env(store: str, s3: "SeaweedS3 | None", folder: Path) -> dict[str, str]:
    """A gateway's environment for a workspace store: `local` (a folder) or `s3` (a new bucket)."""
    if store == "local":
        return {"WORKSPACE_STORE": f"file://{folder / 'store'}"}
    assert s3 is not None
    bucket = f"ws-{next(_buckets)}"
    s3.create_bucket(bucket)
    return {
        "WORKSPACE_STORE": f"s3://{bucket}/gateway",
        "WORKSPACE_S3_ENDPOINT": s3.endpoint,
        "WORKSPACE_S3_ACCESS_KEY_ID": "test",
        "WORKSPACE_S3_SECRET_ACCESS_KEY": "test-secret",
    }


_buckets = itertools.count(1)


@pytest.fixture(scope="session")
def fake_anthropic() -> Iterator[FakeAnthropic]:
    fake = FakeAnthropic()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def upstream(fake_anthropic: FakeAnthropic) -> FakeAnthropic:
    """The fake upstream, with its script and recorded requests reset for this test."""
    fake_anthropic.requests.clear()
    fake_anthropic.received.clear()
    fake_anthropic.credentials.clear()
    fake_anthropic.paths.clear()
    fake_anthropic.betas.clear()
    fake_anthropic.script.clear()
    fake_anthropic.by_prompt.clear()
    fake_anthropic.default = type(fake_anthropic.default)()
    return fake_anthropic


def cli_login_env(fake: FakeAnthropic, folder: Path, access_token: str, **env: str) -> dict[str, str]:
    """A gateway on the real Claude backend whose workers use the CLI's own login (stored under
    `folder` as `claude login` keeps it, valid an hour), pointed at the fake upstream."""
    config = folder / "worker-claude"
    config.mkdir()
    expires_ms = int(time.time() * 1000) + 3_600_000
    stored = {"claudeAiOauth": {"accessToken": access_token, "expiresAt": expires_ms}}
    (config / ".credentials.json").write_text(json.dumps(stored))
    return {
        "BACKEND": "claude",
        "CLAUDE_AUTH_METHOD": "cli",
        "CLAUDE_CONFIG_DIR": str(config),
        "ANTHROPIC_BASE_URL": fake.url,
        "CLAUDE_MAX_RETRIES": "0",
        **env,
    }


def claude_env(fake: FakeAnthropic, **env: str) -> dict[str, str]:
    """The environment of a gateway on the real Claude backend, pointed at the fake upstream."""
    return {
        "BACKEND": "claude",
        "ANTHROPIC_BASE_URL": fake.url,
        "ANTHROPIC_API_KEY": "test-key-not-real",
        "CLAUDE_MAX_RETRIES": "1",
        # Cold jobs, as the tests of each feature assume; tests/test_claude_warm.py turns the pool on.
        "CLAUDE_WARM_CLIENTS": "0",
        **env,
    }


@pytest.fixture(scope="session")
def claude(start_gateway: Any, fake_anthropic: FakeAnthropic) -> Gateway:
    """A gateway on the real Claude backend, pointed at the fake upstream."""
    gateway: Gateway = start_gateway(workers=1, session_wide=True, **claude_env(fake_anthropic))
    return gateway


def sse_data(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a complete SSE response, in order (comments and pings skipped)."""
    return [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]


def chat(content: str, **extra: Any) -> dict[str, Any]:
    """A chat completion request body with one user message."""
    return {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": content}], **extra}


async def followed(
    reader: EventReader, job_id: str, *, after: int = 0, idle_timeout_s: float
) -> AsyncIterator[tuple[int, JobEventValue]]:
    """The reader's `(seq, event)`s for the job one at a time, as `EventReader.batches` hands them
    over; closing this closes the reader's iteration (the follower leaves at once)."""
    async with aclosing(reader.batches(job_id, after=after, idle_timeout_s=idle_timeout_s)) as batches:
        async for batch in batches:
            for item in batch:
                yield item


def begun_requests(path: Path, count: int, begun: bytes) -> list[socket.socket]:
    """`count` connections to the Unix socket `path`, each having sent `begun`: a request it never
    finishes. One over the socket's limit may be closed before it sends."""
    held = []
    for _ in range(count):
        connection = socket.socket(socket.AF_UNIX)
        connection.connect(str(path))
        with contextlib.suppress(OSError):
            connection.sendall(begun)
        connection.settimeout(10)
        held.append(connection)
    return held


def closed_by_peer(connection: socket.socket) -> bool:
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
