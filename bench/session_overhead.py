"""What a session costs per request: stateless vs `session_id` turns, through the whole gateway.

Starts a private Redis, one API and one worker process on the scripted backend, then sends
sequential non-streaming requests, alternating: `--requests` stateless ones and as many turns of
one session (whose history grows by two messages a turn). Prints the median and p95 latency of
each, and of the first and last ten of each (to show whether the history length weighs).

    .venv/bin/python bench/session_overhead.py [--requests 200]
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

BODY = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Say hello."}]}


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.95) - 1)]


def timed(client: httpx.Client, url: str, body: dict[str, object]) -> float:
    started = time.perf_counter()
    response = client.post(url, json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp), persistent=False)
        redis.start()
        port = free_port()
        env = {
            **os.environ,
            "REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
            "PORT": str(port),
            "BACKEND": "scripted",
            "LOG_LEVEL": "warning",
        }
        processes = [
            subprocess.Popen([sys.executable, "-m", "cli.main", role], cwd=ROOT, env=env)
            for role in ("worker", "api")
        ]
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            with httpx.Client(timeout=60) as client:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        timed(client, url, BODY)
                        break
                    except httpx.TransportError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
                for _ in range(20):  # warm-up
                    timed(client, url, BODY)
                stateless: list[float] = []
                session: list[float] = []
                for _ in range(args.requests):  # interleaved, so load changes hit both alike
                    stateless.append(timed(client, url, BODY))
                    session.append(timed(client, url, {**BODY, "session_id": "bench"}))
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=30)
            redis.stop()
    print(f"{args.requests} sequential non-streaming requests each, scripted backend, 1 API + 1 worker")
    for label, values in (
        ("stateless", stateless),
        ("session turns", session),
        ("stateless, first 10", stateless[:10]),
        ("session, first 10 turns", session[:10]),
        ("stateless, last 10", stateless[-10:]),
        ("session, last 10 turns", session[-10:]),
    ):
        print(
            f"{label:>24}: median {statistics.median(values) * 1000:.2f} ms, p95 {p95(values) * 1000:.2f} ms"
        )


if __name__ == "__main__":
    main()
