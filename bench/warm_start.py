"""Time to first token through the whole gateway on the real SDK and CLI: cold vs warm starts.

Starts a private Redis, the tests' fake Anthropic API (answering at once) and two gateways of one
API and one worker each, side by side: one starting a fresh CLI per job, one keeping
`CLAUDE_WARM_CLIENTS` connected and warmed-up CLIs ready. Sends the same streamed request to
each in turn, sequentially, with a pause after each request (a warm worker replaces a used client
in the background, ~0.5 s of CPU, which should not overlap the other gateway's request), and
prints median and p95 time to the first content chunk, and the load average before and after.

    .venv/bin/python bench/warm_start.py [--requests 30] [--warm-clients 2] [--pause 1]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from tests.fake_anthropic import FakeAnthropic  # noqa: E402

BODY = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Say hello."}], "stream": True}


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.95) - 1)]


def first_token(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    elapsed = None
    with client.stream("POST", url, json=BODY) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if elapsed is None and '"content":"' in line:
                elapsed = time.perf_counter() - started
    if elapsed is None:
        raise RuntimeError("no content chunk")
    return elapsed


def first_job(client: httpx.Client, url: str) -> None:
    """Waits for a gateway to serve, with its first job (which is not measured)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            first_token(client, url)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def stop(processes: list[subprocess.Popen[bytes]], redis: EmbeddedRedis, upstream: FakeAnthropic) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=60)
    redis.stop()
    upstream.stop()


def start_gateway(
    redis_url: str, workspaces: Path, upstream: str, warm_clients: int, **extra: str
) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """An API and a worker (first in the list) on the real Claude backend, pointed at `upstream`."""
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "PORT": str(port),
        "BACKEND": "claude",
        "ANTHROPIC_BASE_URL": upstream,
        "ANTHROPIC_API_KEY": "bench-key-not-real",
        "WORKSPACE_ROOT": str(workspaces),
        "CLAUDE_SKILLS_DIR": str(workspaces / "no-skills"),
        "CLAUDE_WARM_CLIENTS": str(warm_clients),
        "RATE_LIMIT_ENABLED": "false",
        "LOG_LEVEL": "warning",
        **extra,
    }
    processes = [
        subprocess.Popen([sys.executable, "-m", "cli.main", role], cwd=ROOT, env=env)
        for role in ("worker", "api")
    ]
    return f"http://127.0.0.1:{port}/v1/chat/completions", processes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--warm-clients", type=int, default=2)
    parser.add_argument("--pause", type=float, default=1.0)
    args = parser.parse_args()
    load_before = os.getloadavg()
    upstream = FakeAnthropic()
    upstream.start()
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp), persistent=False)
        redis.start()
        try:
            cold_url, started = start_gateway(
                f"redis://127.0.0.1:{redis.port}/1", Path(tmp) / "cold", upstream.url, 0
            )
            processes += started
            warm_url, started = start_gateway(
                f"redis://127.0.0.1:{redis.port}/2", Path(tmp) / "warm", upstream.url, args.warm_clients
            )
            processes += started
            results: dict[str, list[float]] = {"cold": [], "warm": []}
            with httpx.Client(timeout=120) as client:
                for url in (cold_url, warm_url):  # up, and a first job that teaches the pool its profile
                    first_job(client, url)
                time.sleep(3)
                for _ in range(args.requests):  # interleaved, so load changes hit both alike
                    results["cold"].append(first_token(client, cold_url))
                    time.sleep(args.pause)
                    results["warm"].append(first_token(client, warm_url))
                    time.sleep(args.pause)
        finally:
            stop(processes, redis, upstream)
    load_after = os.getloadavg()
    print(
        f"{args.requests} sequential streamed requests each, real SDK + CLI, instant fake upstream, "
        f"1 API + 1 worker per gateway, {os.cpu_count()} CPUs, pause {args.pause:g} s; load average "
        f"(1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
        f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
    )
    medians = {}
    for label, values in results.items():
        medians[label] = statistics.median(values)
        print(
            f"{label:>5} (CLAUDE_WARM_CLIENTS={0 if label == 'cold' else args.warm_clients}): time to first "
            f"token median {medians[label] * 1000:.0f} ms, p95 {p95(values) * 1000:.0f} ms, "
            f"min {min(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"
        )
    print(f"warm is {medians['cold'] / medians['warm']:.1f}x faster at the median")


if __name__ == "__main__":
    main()
