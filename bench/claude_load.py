"""Claude Code under load, as a new user runs it: time to first token, CPU per job, pool memory.

Starts the tests' fake Anthropic API (answering at once) in this process and `claude-gateway up`
with its defaults (a private Redis, `API_PROCESSES` (2) API processes, `WORKERS=2` workers, the
real SDK and CLI), then:

1. one stream with a pause between requests (`--gap`, 1.5 s);
2. one stream, back to back;
3. idle (`--idle`, 10 s), then a burst of `--burst` (8) concurrent streams;
4. `--burst` concurrent clients, back to back, `--jobs` (24) jobs in all: CPU per job;
5. idle again (`--shrink-wait`, by default 15 s longer than the gateway's `CLAUDE_WARM_IDLE_S`):
   the pool's memory after it shrank.

CPU is counted from before a phase until the machine is quiet again after it, so the CLIs a warm
pool starts to replace the used ones are counted, and split by process kind: each worker runs in
a cgroup of its own (`bench/cpu.py`), which counts its CLIs however deep in their sandboxes; the
CLIs' share is that cgroup's CPU less the worker's own (`/proc`); the API, Redis and `up` are
read from `/proc`. Memory is the resident set of the CLI processes alive under the workers.

    .venv/bin/python bench/claude_load.py [--root CHECKOUT] [--set NAME=VALUE ...] [--keys N]
                                          [--json out.json]

`--root` runs the gateway of another checkout (e.g. an export of `main`) with this script, for a
before/after pair on the same machine. `--set` adds environment variables to the gateway's.
`--keys N` configures N API keys and sends the requests with each in turn (by default none: every
request is the one anonymous caller); a warm client serves one key only (`worker/warm.py`).
Only the rate limit is turned off (`RATE_LIMIT_ENABLED=false`): the phases send more than the
default 60 chat requests a minute from one address.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cpu import cpu_meter, own_and_reaped  # noqa: E402
from cli.embedded_redis import free_port  # noqa: E402
from shared.settings import Settings  # noqa: E402
from tests.fake_anthropic import FakeAnthropic  # noqa: E402

BODY = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Say hello."}], "stream": True}
ROLES = ("cli", "worker", "api", "redis", "up")


def _rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Snapshot:
    cpu: dict[str, float] = field(default_factory=dict)
    pool_rss_kib: int = 0
    clis: int = 0
    at: float = 0.0


class Gateway:
    """`claude-gateway up` and the processes it started, told apart by their command lines."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "up"], cwd=root, env=env, start_new_session=True
        )
        self.meters: dict[int, Callable[[], float]] = {}
        self.method = ""

    async def meter_workers(self, count: int, limit_s: float = 60.0) -> None:
        """Puts each worker in a cgroup of its own once `count` are running (before their first CLI)."""
        deadline = time.monotonic() + limit_s
        while len(workers := self._workers()) < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"{len(workers)} of {count} workers started")
            await asyncio.sleep(0.1)
        for pid in workers:
            self.meters[pid], self.method = cpu_meter(pid)

    def _workers(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with contextlib.suppress(OSError):
            return [int(pid) for pid in children.read_text().split() if self._role(int(pid)) == "worker"]
        return []

    def snapshot(self) -> Snapshot:
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        snap = Snapshot(cpu=dict.fromkeys(ROLES, 0.0), at=time.monotonic())
        up = self.process.pid
        with contextlib.suppress(OSError):
            snap.cpu["up"] = own_and_reaped(up)[0]
        for pid in children.get(up, []):
            try:
                own, reaped = own_and_reaped(pid)
                role = self._role(pid)
                if role == "worker":  # its cgroup: itself and every CLI it started (restarted: reaped)
                    total = self.meters[pid]() if pid in self.meters else own + reaped
            except OSError:
                continue
            if role != "worker":
                snap.cpu[role] += own + reaped
                continue
            snap.cpu["worker"] += own
            snap.cpu["cli"] += total - own
            for cli in self._descendants(pid, children):
                if self._is_cli(cli):
                    snap.clis += 1
                    snap.pool_rss_kib += _rss_kib(cli)
        return snap

    @staticmethod
    def _descendants(pid: int, children: dict[int, list[int]]) -> list[int]:
        found, todo = [], list(children.get(pid, []))
        while todo:
            child = todo.pop()
            found.append(child)
            todo += children.get(child, [])
        return found

    @staticmethod
    def _cmdline(pid: int) -> list[str]:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return []

    def _role(self, pid: int) -> str:
        command = self._cmdline(pid)
        if "cli.main" in command:
            return command[command.index("cli.main") + 1]
        return "redis"  # the only other process `up` starts

    def _is_cli(self, pid: int) -> bool:
        command = self._cmdline(pid)
        return bool(command) and Path(command[0]).name == "claude"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


async def first_token(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    elapsed = None
    async with client.stream("POST", url, json=BODY, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if elapsed is None and '"content":"' in line:
                elapsed = time.perf_counter() - started
    if elapsed is None:
        raise RuntimeError("no content chunk")
    return elapsed


async def settle(gateway: Gateway, *, quiet_s: float = 1.5, limit_s: float = 60.0) -> Snapshot:
    """Waits until the gateway's processes use < 5% of a core over `quiet_s` (refills done)."""
    deadline = time.monotonic() + limit_s
    last = gateway.snapshot()
    while True:
        await asyncio.sleep(quiet_s)
        now = gateway.snapshot()
        if sum(now.cpu.values()) - sum(last.cpu.values()) < 0.05 * quiet_s or time.monotonic() > deadline:
            return now
        last = now


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p95_ms": ordered[max(0, int(len(ordered) * 0.95) - 1)] * 1000,
        "min_ms": ordered[0] * 1000,
        "max_ms": ordered[-1] * 1000,
    }


def per_job(before: Snapshot, after: Snapshot, jobs: int) -> dict[str, float]:
    split = {role: (after.cpu[role] - before.cpu[role]) * 1000 / jobs for role in ROLES}
    split["gateway"] = sum(split[role] for role in ("worker", "api", "redis", "up"))
    split["total"] = split["gateway"] + split["cli"]
    return split


async def run(args: argparse.Namespace, url: str, gateway: Gateway) -> dict[str, object]:
    results: dict[str, object] = {}
    callers = itertools.cycle([{"Authorization": f"Bearer {key}"} for key in args.api_keys] or [{}])
    await gateway.meter_workers(args.workers)
    async with httpx.AsyncClient(timeout=120) as client:
        deadline = time.monotonic() + 90
        while True:  # up, and one job that shows the pool the usual request
            try:
                await first_token(client, url, next(callers))
                break
            except (httpx.HTTPError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        await settle(gateway)

        gaps = []
        for _ in range(args.requests):
            gaps.append(await first_token(client, url, next(callers)))
            await asyncio.sleep(args.gap)
        results["one_stream_gaps"] = summary(gaps)
        print(f"1 stream, {args.gap:g} s gaps: {results['one_stream_gaps']}", flush=True)

        back = [await first_token(client, url, next(callers)) for _ in range(args.requests)]
        results["one_stream_back_to_back"] = summary(back)
        print(f"1 stream, back to back: {results['one_stream_back_to_back']}", flush=True)

        await settle(gateway)
        await asyncio.sleep(args.idle)
        idle = gateway.snapshot()
        results["idle_before_burst"] = {"clis": idle.clis, "pool_rss_mib": idle.pool_rss_kib / 1024}
        burst = await asyncio.gather(*(first_token(client, url, next(callers)) for _ in range(args.burst)))
        after_burst = await settle(gateway)
        results["burst"] = summary(list(burst))
        results["burst_cpu_per_job_ms"] = per_job(idle, after_burst, args.burst)
        results["after_burst"] = {"clis": after_burst.clis, "pool_rss_mib": after_burst.pool_rss_kib / 1024}
        print(f"burst of {args.burst} after {args.idle:g} s idle: {results['burst']}", flush=True)

        before = gateway.snapshot()
        queue: asyncio.Queue[None] = asyncio.Queue()
        for _ in range(args.jobs):
            queue.put_nowait(None)

        async def caller() -> list[float]:
            times = []
            while not queue.empty():
                queue.get_nowait()
                times.append(await first_token(client, url, next(callers)))
            return times

        started = time.monotonic()
        loaded = [t for times in await asyncio.gather(*(caller() for _ in range(args.burst))) for t in times]
        wall = time.monotonic() - started
        after = await settle(gateway)
        results["concurrent"] = summary(loaded)
        results["concurrent_cpu_per_job_ms"] = per_job(before, after, args.jobs)
        results["concurrent_jobs_per_s"] = args.jobs / wall
        results["after_concurrent"] = {"clis": after.clis, "pool_rss_mib": after.pool_rss_kib / 1024}
        print(f"{args.burst} concurrent, {args.jobs} jobs: {results['concurrent']}", flush=True)

        await asyncio.sleep(args.shrink_wait)
        rested = gateway.snapshot()
        results["after_idle"] = {
            "clis": rested.clis,
            "pool_rss_mib": rested.pool_rss_kib / 1024,
            "idle_s": args.shrink_wait,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose gateway runs")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--gap", type=float, default=1.5)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--burst", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--shrink-wait", type=float, help="default: CLAUDE_WARM_IDLE_S + 15 s")
    parser.add_argument("--keys", type=int, default=0, help="API keys the requests take turns with")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()
    upstream = FakeAnthropic()
    upstream.start()
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    gateway = None
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {
            "PATH": os.environ["PATH"],
            "HOME": tmp,
            "STATE_DIR": str(Path(tmp) / "state"),
            "PORT": str(port),
            "BACKEND": "claude",
            "ANTHROPIC_BASE_URL": upstream.url,
            "ANTHROPIC_API_KEY": "bench-key-not-real",
            "WORKSPACE_ROOT": str(Path(tmp) / "workspaces"),
            "RATE_LIMIT_ENABLED": "false",
            "LOG_LEVEL": "warning",
        }
        args.api_keys = [f"bench-caller-{n:02d}-{uuid.uuid4().hex}" for n in range(args.keys)]
        if args.api_keys:
            env["API_KEYS"] = ",".join(args.api_keys)
        env.update(item.split("=", 1) for item in args.set)
        args.workers = int(env.get("WORKERS", Settings.model_fields["workers"].default))
        if args.shrink_wait is None:
            idle_s = env.get("CLAUDE_WARM_IDLE_S", Settings.model_fields["claude_warm_idle_s"].default)
            args.shrink_wait = float(idle_s) + 15
        try:
            gateway = Gateway(args.root, env)
            results = asyncio.run(run(args, f"http://127.0.0.1:{port}/v1/chat/completions", gateway))
        finally:
            if gateway is not None:
                gateway.stop()
            upstream.stop()
    used = resource.getrusage(resource.RUSAGE_SELF)
    results["bench_and_fake_upstream_cpu_s"] = (
        used.ru_utime + used.ru_stime - self_before.ru_utime - self_before.ru_stime
    )
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "root": str(args.root),
        "cpu_by": gateway.method if gateway is not None else "",
        "set": args.set,
        "keys": args.keys,
    }
    for phase in ("burst_cpu_per_job_ms", "concurrent_cpu_per_job_ms"):
        split = results[phase]
        assert isinstance(split, dict)
        print(f"{phase}: " + ", ".join(f"{role} {value:.0f}" for role, value in split.items()))
    for phase in ("idle_before_burst", "after_burst", "after_concurrent", "after_idle"):
        print(f"{phase}: {results[phase]}")
    print(f"machine: {results['machine']}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
