"""What the job sandbox costs: time to first token and CPU per Claude job, with and without it.

Two gateways side by side (one API and one worker each, cold starts: a fresh CLI per job), one
with `SANDBOX=on`, one with `SANDBOX=off`, on the real SDK and CLI against the tests' fake
Anthropic API (answering at once). The same streamed request goes to each in turn, sequentially,
with a pause after each. CPU per job is the CPU time of each worker and everything it starts (the
CLI; with the sandbox prlimit, bwrap and its init too) over the measured requests, divided by their
number, counted by `bench/cpu.py` (a cgroup per worker).

    .venv/bin/python bench/sandbox_cost.py [--requests 20] [--pause 0.5]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cpu import cpu_meter  # noqa: E402
from bench.warm_start import first_job, first_token, p95, start_gateway, stop  # noqa: E402
from cli.embedded_redis import EmbeddedRedis  # noqa: E402
from tests.fake_anthropic import FakeAnthropic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--pause", type=float, default=0.5)
    args = parser.parse_args()
    load_before = os.getloadavg()
    upstream = FakeAnthropic()
    upstream.start()
    processes = []
    modes = ("on", "off")
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp), persistent=False)
        redis.start()
        try:
            urls: dict[str, str] = {}
            workers: dict[str, Callable[[], float]] = {}
            method = ""
            for db, mode in enumerate(modes, start=1):
                url, started = start_gateway(
                    f"redis://127.0.0.1:{redis.port}/{db}", Path(tmp) / mode, upstream.url, 0, SANDBOX=mode
                )
                urls[mode] = url
                workers[mode], method = cpu_meter(started[0].pid)
                processes += started
            ttft: dict[str, list[float]] = {mode: [] for mode in modes}
            cpu: dict[str, float] = {}
            with httpx.Client(timeout=120) as client:
                for url in urls.values():  # up, and one job each before measuring
                    first_job(client, url)
                time.sleep(args.pause)
                before = {mode: workers[mode]() for mode in modes}
                for _ in range(args.requests):  # interleaved, so load changes hit both alike
                    for mode in modes:
                        ttft[mode].append(first_token(client, urls[mode]))
                        time.sleep(args.pause)
                time.sleep(1)  # the last CLIs are reaped
                cpu = {mode: (workers[mode]() - before[mode]) / args.requests for mode in modes}
        finally:
            stop(processes, redis, upstream)
    load_after = os.getloadavg()
    print(
        f"{args.requests} sequential streamed requests each, cold starts, real SDK + CLI, instant fake "
        f"upstream, 1 API + 1 worker per gateway, {os.cpu_count()} CPUs, pause {args.pause:g} s; load "
        f"average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
        f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; CPU measured by {method}"
    )
    for mode in modes:
        values = ttft[mode]
        print(
            f"SANDBOX={mode:<3}: time to first token median {statistics.median(values) * 1000:.0f} ms, "
            f"p95 {p95(values) * 1000:.0f} ms; CPU per job (worker + CLI) {cpu[mode] * 1000:.0f} ms"
        )
    added = (statistics.median(ttft["on"]) - statistics.median(ttft["off"])) * 1000
    print(
        f"the sandbox adds {added:+.0f} ms to the median time to first token and "
        f"{(cpu['on'] / cpu['off'] - 1) * 100:+.1f}% CPU per job"
    )


if __name__ == "__main__":
    main()
