"""Starting safe by default, key scoping as routes see it, and access checks when Redis is gone."""

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from arq.connections import ArqRedis
from fastapi import FastAPI

from api.app import create_app
from api.deps import CallerDep, Gateway
from cli.embedded_redis import EmbeddedRedis, free_port
from shared import queue
from shared.events import EventReader
from shared.jobstore import JobStore
from shared.settings import Settings
from tests.conftest import ROOT


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path, persistent=False)
    server.start()
    yield server
    server.stop()


def api_env(redis: EmbeddedRedis, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "API_KEYS")}
    return {**env, "REDIS_URL": redis.url, "BACKEND": "scripted", "LOG_LEVEL": "warning", **extra}


def run_to_its_end(role: str, env: dict[str, str]) -> "subprocess.CompletedProcess[str]":
    """`claude-gateway <role>` with no terminal, run until it exits (a refusal to start)."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", role],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_non_loopback_api_without_any_key_refuses_to_start(private_redis: EmbeddedRedis) -> None:
    started = run_to_its_end("api", api_env(private_redis, HOST="0.0.0.0", PORT=str(free_port())))
    assert started.returncode != 0
    assert "refusing to serve HOST=0.0.0.0 without an API key" in started.stderr
    assert "ALLOW_UNAUTHENTICATED" in started.stderr


def on_a_terminal(redis: EmbeddedRedis, port: int) -> tuple["subprocess.Popen[bytes]", int]:
    """An API process started on a terminal (a pty): it, and the terminal's other end."""
    primary, secondary = os.openpty()
    api = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "api"],
        cwd=ROOT,
        env=api_env(redis, PORT=str(port)),
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    return api, primary


def test_up_refusing_a_non_loopback_host_leaves_nothing_running(tmp_path: Path) -> None:
    """Its private Redis was left, and the file that names it, where `status` then found a Redis
    that was gone."""
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "API_KEYS", "REDIS_URL")}
    env |= {"STATE_DIR": str(tmp_path), "HOST": "0.0.0.0", "PORT": str(free_port()), "BACKEND": "scripted"}
    refused = run_to_its_end("up", env)
    assert refused.returncode != 0
    assert "refusing to serve HOST=0.0.0.0" in refused.stderr
    assert not (tmp_path / "redis" / "url").exists()
    servers = [p for p in Path("/proc").glob("[0-9]*") if str(tmp_path).encode() in _cmdline(p)]
    assert servers == [], "the private Redis outlived the refusal"


def _cmdline(process: Path) -> bytes:
    try:
        return (process / "cmdline").read_bytes()
    except OSError:
        return b""


def test_an_interactive_start_offers_to_generate_a_key(private_redis: EmbeddedRedis) -> None:
    port = free_port()
    api, primary = on_a_terminal(private_redis, port)
    try:
        seen = b""
        deadline = time.monotonic() + 30
        while b"[Y/n]" not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([primary], [], [], 1)[0]:
                seen += os.read(primary, 4096)
        os.write(primary, b"y\n")
        while (printed := re.search(rb"(cgw-\S+)\s*\n", seen)) is None:
            assert time.monotonic() < deadline, seen
            if select.select([primary], [], [], 1)[0]:
                seen += os.read(primary, 4096)
        secret = printed.group(1).decode()
        models = f"http://127.0.0.1:{port}/v1/models"
        while True:
            try:
                response = httpx.get(models, headers={"authorization": f"Bearer {secret}"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the API did not start"
                time.sleep(0.1)
        assert response.status_code == 200
        assert httpx.get(models).status_code == 401
        # The one who started it runs it: the key reads the service-wide views too.
        status = httpx.get(f"http://127.0.0.1:{port}/status", headers={"authorization": f"Bearer {secret}"})
        assert status.status_code == 200, status.text
    finally:
        api.terminate()
        api.wait(timeout=15)
        os.close(primary)


@pytest.mark.parametrize("answer", ["end of input", "ctrl-c"])
def test_no_answer_at_the_key_prompt_is_no_stack_trace(private_redis: EmbeddedRedis, answer: str) -> None:
    """Ctrl-D serves on loopback without a key, as "n" does; Ctrl-C stops (both printed a traceback)."""
    port = free_port()
    api, primary = on_a_terminal(private_redis, port)
    seen = b""

    def read_until(done: Callable[[], bool]) -> None:
        nonlocal seen
        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline, seen
            if select.select([primary], [], [], 0.2)[0]:
                try:
                    seen += os.read(primary, 4096)
                except OSError:  # the process is gone and its end of the terminal closed
                    return

    try:
        read_until(lambda: b"[Y/n]" in seen)
        if answer == "ctrl-c":
            # The prompt is printed before its read begins: a signal between the two is handled only
            # once the read returns (CI, loaded, hung there), so the read is given time to begin, and
            # the key pressed again if it had not.
            for _ in range(5):
                time.sleep(0.5)
                api.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    api.wait(timeout=3)
                    break
            assert api.wait(timeout=15) == 130
        else:
            os.write(primary, b"\x04")
            read_until(lambda: _serves(port))
            assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200
        read_until(lambda: api.poll() is not None or b"\n" in seen.split(b"[Y/n]")[-1])
        assert b"Traceback" not in seen, seen
    finally:
        api.terminate()
        api.wait(timeout=15)
        os.close(primary)


def _serves(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    except httpx.TransportError:
        return False


def _with_probe(app: FastAPI) -> FastAPI:
    """A route that reports who the caller is, as every scoped route reads it (`CallerDep`)."""

    @app.get("/v1/probe")
    async def probe(caller: CallerDep) -> dict[str, str]:
        return {"key_id": caller.key_id}

    return app


async def test_each_key_is_a_distinct_stable_caller(private_redis: EmbeddedRedis) -> None:
    settings = Settings(api_keys="first-caller-key,other-caller-key", rate_limit_enabled=False)
    app = _with_probe(create_app(settings, private_redis.url))
    redis = await queue.connect(private_redis.url, settings.queue_name)
    app.state.gateway = Gateway(
        settings=settings,
        redis=redis,
        store=JobStore(redis, queue_name=settings.queue_name, ttl_s=60),
        reader=EventReader(redis),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:

        async def caller(key: str) -> str:
            response = await client.get("/v1/probe", headers={"authorization": f"Bearer {key}"})
            assert response.status_code == 200
            key_id: str = response.json()["key_id"]
            return key_id

        a, b = await caller("first-caller-key"), await caller("other-caller-key")
        assert a != b
        assert a == await caller("first-caller-key")
        assert a.startswith("cfg-")
        assert "first-caller-key" not in a
        assert (await client.get("/v1/probe")).status_code == 401
    await redis.aclose()


async def test_redis_unreachable_means_503_not_an_open_door() -> None:
    settings = Settings(api_keys="first-caller-key")
    app = _with_probe(create_app(settings, "redis://unused"))
    redis = ArqRedis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    app.state.gateway = Gateway(
        settings=settings,
        redis=redis,
        store=JobStore(redis, queue_name=settings.queue_name, ttl_s=60),
        reader=EventReader(redis),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        for headers in (
            {"authorization": "Bearer first-caller-key"},
            {"authorization": "Bearer unknown"},
            {},
        ):
            response = await client.get("/v1/probe", headers=headers)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "access_control_unavailable"
        assert (await client.get("/health")).status_code == 200
    await redis.aclose()
