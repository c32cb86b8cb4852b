"""Streaming latency and throughput: the gateway against its floors, side by side, on loopback.

The FLOOR is the scripted backend iterated in this process: what a stream costs with no gateway
at all. The IN-PROCESS SERVER (`bench/inprocess_server.py`) streams it over HTTP from a plain
FastAPI + sse-starlette app, the original wrapper's architecture. The GATEWAY is the whole path,
HTTP → API → arq/Redis → worker → Redis stream → API → SSE,
on a redis-server, `API_PROCESSES` API processes (2) and two worker processes that this script
starts and stops, as `claude-gateway up` runs them.

    .venv/bin/python bench/stream_latency.py             # full run, about a minute here
    .venv/bin/python bench/stream_latency.py --quick     # smoke run for CI, a few seconds
    .venv/bin/python bench/stream_latency.py --json out.json --check

Figures (docs/benchmarks.md explains each): time to first token (TTFT) for one stream at a time
and for 50 concurrent streams, the TTFT the gateway adds to the floor, relayed tokens per second
(one stream, and four at once), and the API's resident memory per open stream.
"""

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lean_http import LeanClient  # noqa: E402
from cli.embedded_redis import EmbeddedRedis, free_port, server_binary  # noqa: E402
from shared.jobs import CompletionJob, Delta, Turn  # noqa: E402
from shared.keys import Channels  # noqa: E402
from shared.settings import Settings  # noqa: E402
from worker.backends.scripted import ScriptedBackend  # noqa: E402

HELLO = "Say hello."  # not a directive: the scripted backend's default five-word reply
TARGET_ADDED_MEDIAN_S = 0.005
TARGET_ADDED_P99_S = 0.015
TARGET_TOKENS_PER_S = 20_000
TARGET_CONCURRENT_OVER_SERVER = 1.5  # the gateway's 50-concurrent TTFT against the in-process server's
TARGET_STREAMS_OVER_ONE = 1.5  # the gateway's aggregate rate with 4 streams against 1


@dataclass(frozen=True)
class Plan:
    warmup: int  # sequential requests before anything is measured
    sequential: int  # TTFT samples, one stream at a time
    concurrency: int  # streams per concurrent round
    rounds: int  # measured concurrent rounds (each after an unmeasured one on new connections)
    relay_tokens: int  # tokens per throughput stream
    relay_streams: int  # streams in the aggregate throughput run
    held_streams: int  # slowly paced streams held open for the memory figure
    held_tokens: int  # their length at 50 ms a token: long enough to measure, short enough to end
    budget_s: float  # the whole run, start-up included


FULL = Plan(20, 200, 50, 10, 200_000, 4, 100, 120, 900.0)
QUICK = Plan(5, 20, 50, 2, 20_000, 4, 20, 40, 120.0)
HELD_DELAY_MS = 50.0
WORKERS = 2
JOBS_PER_WORKER = 64  # 128 slots: the held streams and a concurrent round fit without queueing


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Sample:
    ttft_s: float  # request sent → first chunk with non-empty content
    tokens: int
    first_at: float  # perf_counter() of the first token
    done_at: float  # perf_counter() of the end ([DONE], or Done in the floor)


Stream = Callable[[str], Awaitable[Sample]]


def count_tokens(text: str) -> int:
    # The scripted backend emits whole words (`\S+\s*`); a chunk may carry several, never a part.
    return len(text.split())


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def script(**directive: object) -> str:
    return "script:" + json.dumps(directive)


# --- the two ways to stream ---------------------------------------------------------------------


async def floor_stream(backend: ScriptedBackend, model: str, prompt: str) -> Sample:
    job = CompletionJob(request_id="bench", model=model, turns=[Turn(role="user", text=prompt)])
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    async for event in backend.stream(job):
        if isinstance(event, Delta) and event.text:
            if first is None:
                first = time.perf_counter()
            tokens += count_tokens(event.text)
    if first is None:
        raise BenchError("the scripted backend produced no token")
    return Sample(first - start, tokens, first, time.perf_counter())


async def gateway_stream(
    client: LeanClient, model: str, prompt: str, on_first: Callable[[], None] | None = None
) -> Sample:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True})
    start = time.perf_counter()
    first: float | None = None
    done: float | None = None
    tokens = 0
    async with aclosing(client.sse("/v1/chat/completions", body.encode())) as events:
        async for data in events:
            if data == "[DONE]":
                done = time.perf_counter()
                continue  # read on to the end of the response, so the connection can be reused
            chunk = json.loads(data)
            if "error" in chunk:
                raise BenchError(f"stream failed: {chunk['error']}")
            for choice in chunk["choices"]:
                text = choice["delta"].get("content")
                if text:
                    if first is None:
                        first = time.perf_counter()
                        if on_first is not None:
                            on_first()
                    tokens += count_tokens(text)
    if first is None or done is None:
        raise BenchError("the stream ended without a token or without [DONE]")
    return Sample(first - start, tokens, first, done)


async def httpx_stream(client: httpx.AsyncClient, model: str, prompt: str) -> Sample:
    """The same request through httpx's async client: what a typical Python caller sees."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True})
    start = time.perf_counter()
    first: float | None = None
    async with client.stream(
        "POST", "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    ) as response:
        async for line in response.aiter_lines():
            if first is None and '"content":"' in line.replace('"content":""', ""):
                first = time.perf_counter()
    if first is None:
        raise BenchError("the stream ended without a token")
    return Sample(first - start, 0, first, time.perf_counter())


# --- measurements, each for either stream ---------------------------------------------------------


async def sequential_ttft(stream: Stream, plan: Plan) -> list[float]:
    for _ in range(plan.warmup):
        await stream(HELLO)
    return [(await stream(HELLO)).ttft_s for _ in range(plan.sequential)]


async def concurrent_ttft(
    streams: Sequence[Stream],
    plan: Plan,
    clients: Sequence[LeanClient | None],
    on_connected: Callable[[int], None] = lambda _: None,
) -> list[list[float]]:
    """Each stream's TTFTs over `plan.rounds` rounds of `plan.concurrency` requests at once.

    Before each measured round, the stream's client (if any) closes its idle connections and an
    unmeasured round opens new ones (and warms the worker slots); `on_connected(i)` is called then.
    SO_REUSEPORT gives each connection to an API process once, by a hash, and the busier process
    sets a round's pace: one split kept for every round decided a run (eighth session). Several
    streams alternate round by round, each round in the other order, so all see the same machine.
    """
    ttfts: list[list[float]] = [[] for _ in streams]
    order = list(enumerate(zip(streams, clients, strict=True)))
    for round_ in range(plan.rounds):
        for i, (stream, client) in order if round_ % 2 else reversed(order):
            if client is not None:
                await client.close()
            await asyncio.gather(*(stream(HELLO) for _ in range(plan.concurrency)))
            on_connected(i)
            batch = await asyncio.gather(*(stream(HELLO) for _ in range(plan.concurrency)))
            ttfts[i].extend(sample.ttft_s for sample in batch)
    return ttfts


RELAY_REPEATS = 3  # the gateway's relay runs: 1 stream and 4, alternating; each rate is their median


async def relay_rate(stream: Stream, tokens: int, streams: int) -> float:
    """Tokens per second from the first token of any stream to the end of the last one."""
    prompt = script(text="tok ", tokens=tokens)
    batch = await asyncio.gather(*(stream(prompt) for _ in range(streams)))
    counted = sum(sample.tokens for sample in batch)
    if counted != tokens * streams:
        raise BenchError(f"expected {tokens * streams} tokens, counted {counted}")
    return counted / (max(s.done_at for s in batch) - min(s.first_at for s in batch))


# --- processes ------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class CpuMeter:
    """Each process's CPU use over every `with` block it has measured, in % of one core."""

    CLIENT = "bench client"

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._used = dict.fromkeys([*pids, self.CLIENT], 0.0)
        self._wall = 0.0

    @property
    def shares(self) -> dict[str, float]:
        return {name: used / self._wall * 100 for name, used in self._used.items()} if self._wall else {}

    def _now(self) -> dict[str, float]:
        return {**{name: cpu_s(pid) for name, pid in self._pids.items()}, self.CLIENT: time.process_time()}

    def __enter__(self) -> "CpuMeter":
        self._start_wall, self._start = time.perf_counter(), self._now()
        return self

    def __exit__(self, *_: object) -> None:
        self._wall += time.perf_counter() - self._start_wall
        for name, used in self._now().items():
            self._used[name] += used - self._start[name]


class InProcessServer:
    """`bench/inprocess_server.py`: the scripted backend streamed by a plain FastAPI app."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "inprocess_server.py"), str(self.port)], cwd=ROOT
        )

    async def start(self, model: str, timeout_s: float = 30.0) -> LeanClient:
        deadline = time.monotonic() + timeout_s
        while True:
            client = LeanClient("127.0.0.1", self.port)
            try:
                await gateway_stream(client, model, HELLO)
                return client
            except OSError:
                await client.close()
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("the in-process server did not start") from None
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)


class Gateway:
    """A private redis-server, the API processes and `WORKERS` workers; `stop` always ends them all."""

    def __init__(self, workdir: Path, **env: str) -> None:
        self._workdir = workdir
        self._env = env  # settings beyond the benchmark's own
        self.redis = EmbeddedRedis(workdir / "redis", persistent=False)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.apis: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []

    def _spawn(self, role: str, index: int) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "REDIS_URL": self.redis.url,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "BACKEND": "scripted",
            "LOG_LEVEL": "warning",
            "JOBS_PER_WORKER": str(JOBS_PER_WORKER),
            "STATE_DIR": str(self._workdir / "state"),
            # Quotas stay on, as by default (their Redis work is part of the path), but never bite.
            "RATE_LIMIT_CHAT_PER_MINUTE": "100000000",
            "RATE_LIMIT_PER_MINUTE": "100000000",
            "MAX_CONCURRENT_JOBS_PER_KEY": "100000",
            **self._env,
        }
        log = (self._workdir / f"{role}-{index}.log").open("wb")
        with log:
            return subprocess.Popen(
                [sys.executable, "-m", "cli.main", role], cwd=ROOT, env=env, stdout=log, stderr=log
            )

    async def start(self, client: httpx.AsyncClient, timeout_s: float = 60.0) -> None:
        self.redis.start()
        self.workers = [self._spawn("worker", i) for i in range(WORKERS)]
        # As `up` runs them: API_PROCESSES on one port.
        processes = Settings().api_processes
        self._env.setdefault("API_SHARED_PORT", str(processes > 1).lower())
        self.apis = [self._spawn("api", i) for i in range(processes)]
        redis = Redis.from_url(self.redis.url)
        deadline = time.monotonic() + timeout_s
        try:
            while True:  # the API answers /health and every worker listens for wake-ups
                if any(p.poll() is not None for p in [*self.apis, *self.workers]):
                    raise BenchError("a gateway process exited during start-up (gateway log above)")
                if time.monotonic() > deadline:
                    raise BenchError(f"the gateway did not start within {timeout_s:g} s (gateway log above)")
                try:
                    healthy = (await client.get("/health", timeout=1.0)).status_code == 200
                except httpx.TransportError:
                    healthy = False
                wakeup = Channels.of(redis).wakeup
                listeners = dict(await redis.pubsub_numsub(wakeup)).get(wakeup.encode(), 0)
                # Every API process listening too: connections opened before the last one binds
                # all stay with the others (keep-alive), and the run would measure fewer processes.
                if healthy and listeners >= WORKERS and listening_sockets(self.port) >= processes:
                    return
                await asyncio.sleep(0.05)
        finally:
            await redis.aclose()

    async def pids(self) -> dict[str, int]:
        redis = Redis.from_url(self.redis.url)
        try:
            redis_pid = int((await redis.info("server"))["process_id"])
        finally:
            await redis.aclose()
        workers = {f"worker {i + 1}": p.pid for i, p in enumerate(self.workers)}
        apis = {f"api {i + 1}": p.pid for i, p in enumerate(self.apis)}
        return {**apis, **workers, "redis": redis_pid}

    def log_tail(self, lines: int = 20) -> str:
        tails = []
        for log in sorted(self._workdir.glob("*.log")):
            tails.append(
                f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            )
        return "\n".join(tails)

    def stop(self) -> None:
        children = [*self.apis, *self.workers]
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=5)
        self.redis.stop()


def tcp_sockets(port: int) -> Iterator[tuple[int, str, str]]:
    """IPv4 TCP sockets on local port `port`, from /proc/net/tcp: (remote port, state, inode)."""
    suffix = f":{port:04X}"
    for row in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]):
        if row[1].endswith(suffix):
            yield int(row[2].rpartition(":")[2], 16), row[3], row[9]


def listening_sockets(port: int) -> int:
    """IPv4 TCP sockets listening on `port`: one per API process (they share it by SO_REUSEPORT)."""
    return sum(1 for _, state, _ in tcp_sockets(port) if state == "0A")  # 0A: LISTEN


def connections_by_process(port: int, peers: set[int], pids: Sequence[int]) -> list[int]:
    """How many of the connections to `port` from the client ports `peers` each of `pids` holds."""
    inodes = {inode for peer, _, inode in tcp_sockets(port) if peer in peers}

    def socket_inode(fd: Path) -> str:
        try:
            return os.readlink(fd).removeprefix("socket:[").rstrip("]")
        except OSError:  # closed since the folder was listed (the client's last connections)
            return ""

    def held(pid: int) -> int:
        return sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir() if socket_inode(fd) in inodes)

    return [held(pid) for pid in pids]


# --- memory per open stream ---------------------------------------------------------------------------


@dataclass
class Memory:
    streams: int
    before_kib: int
    held_kib: int
    after_kib: int
    per_stream_kib: float
    open_when_measured: int
    redis_clients_before: int  # connections to Redis from all processes
    redis_clients_held: int


async def redis_clients(redis_url: str) -> int:
    redis = Redis.from_url(redis_url)
    try:
        return int((await redis.info("clients"))["connected_clients"]) - 1  # not this one
    finally:
        await redis.aclose()


async def memory_per_stream(
    client: LeanClient, model: str, api_pids: Sequence[int], redis_url: str, plan: Plan
) -> Memory:
    """API RSS (all its processes) before, while holding `held_streams` slow streams open, and
    after they ended."""

    def rss() -> int:
        return sum(map(rss_kib, api_pids))

    prompt = script(text="x ", tokens=plan.held_tokens, delay_ms=HELD_DELAY_MS)
    opened = 0

    def on_first() -> None:
        nonlocal opened
        opened += 1

    before = rss()
    clients_before = await redis_clients(redis_url)
    tasks = [
        asyncio.create_task(gateway_stream(client, model, prompt, on_first)) for _ in range(plan.held_streams)
    ]
    try:
        deadline = time.monotonic() + 60
        while opened < plan.held_streams:
            if ended := [task for task in tasks if task.done()]:
                ended[0].result()  # a failure surfaces here, with its own message
                raise BenchError("a held stream ended before all were open: raise Plan.held_tokens")
            if time.monotonic() > deadline:
                raise BenchError(f"only {opened} of {plan.held_streams} held streams opened within 60 s")
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        still_open = sum(not task.done() for task in tasks)
        held = rss()
        clients_held = await redis_clients(redis_url)
        samples = await asyncio.gather(*tasks)  # let them finish: the workers are then free again
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if any(sample.tokens != plan.held_tokens for sample in samples):
        raise BenchError("a held stream lost tokens")
    after = rss()
    per_stream = (held - before) / plan.held_streams
    return Memory(
        plan.held_streams, before, held, after, per_stream, still_open, clients_before, clients_held
    )


# --- the run -----------------------------------------------------------------------------------------


@dataclass
class Side:
    ttft_1: list[float] = field(default_factory=list)
    ttft_n: list[float] = field(default_factory=list)
    ttft_httpx: list[float] = field(default_factory=list)  # the gateway through httpx, for reference
    rates_1: list[float] = field(default_factory=list)  # relayed tokens/s of each run, 1 stream
    rates_n: list[float] = field(default_factory=list)  # and `relay_streams` at once

    @property
    def rate_1(self) -> float:
        return statistics.median(self.rates_1)

    @property
    def rate_n(self) -> float:
        return statistics.median(self.rates_n)


@dataclass
class Report:
    plan: Plan
    machine: dict[str, str]
    floor: Side
    gateway: Side
    server: Side
    memory: Memory
    splits: list[list[int]]  # each concurrent round's connections held by each API process
    cpu_1: dict[str, float]
    cpu_n: dict[str, float]
    seconds: float


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    redis = subprocess.run(
        [server_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "redis": next((w.removeprefix("v=") for w in redis if w.startswith("v=")), "?"),
        "kernel": platform.release(),
    }


async def run(plan: Plan) -> Report:
    started = time.perf_counter()
    settings = Settings(backend="scripted")
    model = settings.models[0]
    floor: Stream = partial(floor_stream, ScriptedBackend(settings), model)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    timeout = httpx.Timeout(120.0, connect=10.0)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as workdir:
        gateway = Gateway(Path(workdir))
        server = InProcessServer()
        try:
            async with httpx.AsyncClient(
                base_url=gateway.url, limits=limits, timeout=timeout, trust_env=False
            ) as client:
                await gateway.start(client)
                pids = await gateway.pids()
                lean = LeanClient("127.0.0.1", gateway.port)
                remote: Stream = partial(gateway_stream, lean, model)
                for _ in range(plan.warmup):
                    await remote(HELLO)
                server_client = await server.start(model)
                served: Stream = partial(gateway_stream, server_client, model)
                memory = await memory_per_stream(
                    lean, model, [p.pid for p in gateway.apis], gateway.redis.url, plan
                )
                f, g, v = Side(), Side(), Side()
                # The three alternate phase by phase, so all see the same machine noise.
                f.ttft_1 = await sequential_ttft(floor, plan)
                g.ttft_1 = await sequential_ttft(remote, plan)
                v.ttft_1 = await sequential_ttft(served, plan)
                g.ttft_httpx = await sequential_ttft(partial(httpx_stream, client, model), plan)
                (f.ttft_n,) = await concurrent_ttft([floor], plan, [None])
                # The gateway and the server, compared by a target, alternate round by round: in
                # two phases a second apart, the machine's speed alone moved their ratio (eighth
                # session). Each round connects afresh: besides the split, the memory phase's idle
                # connections, reused last-in first-out, were those whose held streams ended last,
                # mostly on one API process (sixth session).
                apis = [p.pid for p in gateway.apis]
                splits: list[list[int]] = []

                def record_split(side: int) -> None:
                    if side == 0:
                        splits.append(connections_by_process(gateway.port, lean.local_ports(), apis))

                g.ttft_n, v.ttft_n = await concurrent_ttft(
                    [remote, served], plan, [lean, server_client], record_split
                )
                f.rates_1.append(await relay_rate(floor, plan.relay_tokens, 1))
                v.rates_1.append(await relay_rate(served, plan.relay_tokens, 1))
                f.rates_n.append(await relay_rate(floor, plan.relay_tokens, plan.relay_streams))
                v.rates_n.append(await relay_rate(served, plan.relay_tokens, plan.relay_streams))
                cpu_1, cpu_n = CpuMeter(pids), CpuMeter(pids)
                for _ in range(RELAY_REPEATS):
                    # A run takes a second or two, and the machine's speed moves on that scale
                    # (docs/benchmarks.md, seventh session): one stream and four alternate, and
                    # each rate is the median of its runs, so one disturbed run decides nothing.
                    with cpu_1:
                        g.rates_1.append(await relay_rate(remote, plan.relay_tokens, 1))
                    with cpu_n:
                        g.rates_n.append(await relay_rate(remote, plan.relay_tokens, plan.relay_streams))
                await lean.close()
                await server_client.close()
        except Exception:
            print(gateway.log_tail(), file=sys.stderr)  # the gateway's side of the failure
            raise
        finally:
            gateway.stop()
            server.stop()
    seconds = time.perf_counter() - started
    return Report(plan, info, f, g, v, memory, splits, cpu_1.shares, cpu_n.shares, seconds)


# --- output ---------------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def _met(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def figures(report: Report) -> dict[str, Any]:
    f, g, v = report.floor, report.gateway, report.server
    out: dict[str, Any] = {}
    for name, fs, gs, vs in (
        ("ttft_1", f.ttft_1, g.ttft_1, v.ttft_1),
        (f"ttft_{report.plan.concurrency}", f.ttft_n, g.ttft_n, v.ttft_n),
        ("ttft_1_httpx", f.ttft_1, g.ttft_httpx, []),
    ):
        for q_name, q in (("median", 0.5), ("p99", 0.99)):
            fv, gv = percentile(fs, q), percentile(gs, q)
            out[f"{name}_{q_name}_s"] = {"floor": fv, "gateway": gv, "added": gv - fv, "samples": len(gs)}
            if vs:
                out[f"{name}_{q_name}_s"]["server"] = percentile(vs, q)
    out["tokens_per_s_1"] = {
        "floor": f.rate_1,
        "gateway": g.rate_1,
        "server": v.rate_1,
        "gateway_runs": g.rates_1,
    }
    out[f"tokens_per_s_{report.plan.relay_streams}"] = {
        "floor": f.rate_n,
        "gateway": g.rate_n,
        "server": v.rate_n,
        "gateway_runs": g.rates_n,
    }
    return out


def targets_met(report: Report) -> dict[str, bool]:
    """Each target, keyed by the figure it applies to."""
    fig, n, k = figures(report), report.plan.concurrency, report.plan.relay_streams
    return {
        "ttft_1_median_s": fig["ttft_1_median_s"]["added"] <= TARGET_ADDED_MEDIAN_S,
        "ttft_1_p99_s": fig["ttft_1_p99_s"]["added"] <= TARGET_ADDED_P99_S,
        **{
            key: fig[key]["gateway"] <= TARGET_CONCURRENT_OVER_SERVER * fig[key]["server"]
            for key in (f"ttft_{n}_median_s", f"ttft_{n}_p99_s")
        },
        "tokens_per_s_1": report.gateway.rate_1 >= TARGET_TOKENS_PER_S,
        f"tokens_per_s_{k}": report.gateway.rate_n >= TARGET_STREAMS_OVER_ONE * report.gateway.rate_1,
    }


def markdown(report: Report) -> str:
    p, fig, met, m = report.plan, figures(report), targets_met(report), report.memory
    n, k = p.concurrency, p.relay_streams
    rows = [
        "| Figure | Floor | In-process server | Gateway | Added | Target | Met |",
        "|---|---:|---:|---:|---:|---|---|",
    ]

    def row(key: str, label: str, cells: Sequence[str], target: str = "") -> None:
        ok = _met(met[key]) if key in met else ""
        rows.append(f"| {label} | {' | '.join(cells)} | {target} | {ok} |")

    over = f"gateway ≤ {TARGET_CONCURRENT_OVER_SERVER:g} x server"
    for key, label, target in (
        ("ttft_1_median_s", "TTFT, 1 stream, median (ms)", "added ≤ 5 ms"),
        ("ttft_1_p99_s", "TTFT, 1 stream, p99 (ms)", "added ≤ 15 ms"),
        (f"ttft_{n}_median_s", f"TTFT, {n} concurrent, median (ms)", over),
        (f"ttft_{n}_p99_s", f"TTFT, {n} concurrent, p99 (ms)", over),
        ("ttft_1_httpx_median_s", "TTFT, 1 stream, through httpx, median (ms)", ""),
        ("ttft_1_httpx_p99_s", "TTFT, 1 stream, through httpx, p99 (ms)", ""),
    ):
        v = fig[key]
        served = _ms(v["server"]) if "server" in v else ""
        row(key, label, [_ms(v["floor"]), served, _ms(v["gateway"]), _ms(v["added"])], target)
    for key, label, target in (
        ("tokens_per_s_1", "Relayed tokens/s, 1 stream", "≥ 20,000"),
        (
            f"tokens_per_s_{k}",
            f"Relayed tokens/s, {k} streams (aggregate)",
            f"≥ {TARGET_STREAMS_OVER_ONE:g} x 1 stream",
        ),
    ):
        cells = [f"{fig[key][side]:,.0f}" for side in ("floor", "server", "gateway")]
        row(key, label, [*cells, ""], target)
    row("rss", "API RSS per open stream (KiB)", ["", "", f"{m.per_stream_kib:,.1f}", ""])
    cpu = [f"| Process | 1 stream (% of a core) | {k} streams (% of a core) |", "|---|---:|---:|"]
    cpu += [
        f"| {name} | {share:.0f} | {report.cpu_n.get(name, 0):.0f} |" for name, share in report.cpu_1.items()
    ]
    mc = report.machine
    notes = [
        f"Machine: {mc['cores']} cores ({mc['cpu']}), load average at start {mc['loadavg']}, "
        f"Python {mc['python']}, Redis {mc['redis']}, Linux {mc['kernel']}.",
        f"Samples: {len(report.gateway.ttft_1)} sequential TTFT after {p.warmup} warm-up; "
        f"{len(report.gateway.ttft_n)} TTFT at {n} concurrent ({p.rounds} rounds, each after an unmeasured "
        f"one on new connections, the gateway's and the server's alternating); "
        f"{p.relay_tokens:,} tokens per throughput stream. Added = gateway - floor, per percentile.",
        f"The {n} concurrent connections by API process in each round (`SO_REUSEPORT` places each by a "
        f"hash): {', '.join('/'.join(map(str, split)) for split in report.splits)}.",
        f"Gateway relay runs, 1 stream and {k} alternating, each rate the median of its runs: "
        f"1 stream {', '.join(f'{rate:,.0f}' for rate in report.gateway.rates_1)}; "
        f"{k} streams {', '.join(f'{rate:,.0f}' for rate in report.gateway.rates_n)} tokens/s.",
        f"Memory: API RSS {m.before_kib:,} KiB before, {m.held_kib:,} KiB holding {m.streams} open streams "
        f"({m.open_when_measured} still open when read), {m.after_kib:,} KiB after they ended; "
        f"Redis connections (all processes) {m.redis_clients_before} before, {m.redis_clients_held} held.",
        f"Run time {report.seconds:.1f} s.",
    ]
    return "\n".join(
        [
            "## Stream latency and throughput",
            "",
            *rows,
            "",
            "CPU during the gateway relay runs:",
            "",
            *cpu,
            "",
            *(f"- {note}" for note in notes),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="far fewer samples: a smoke report for CI")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    async def bounded() -> Report:
        # SIGTERM (a CI timeout) and SIGINT cancel the run, so `run` stops the gateway on the way out.
        task = asyncio.current_task()
        assert task is not None
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
        async with asyncio.timeout(plan.budget_s):
            return await run(plan)

    try:
        report = asyncio.run(bounded())
    except asyncio.CancelledError:
        print("interrupted; the gateway processes were stopped", file=sys.stderr)
        return 130
    except TimeoutError:
        print(f"the run exceeded its budget of {plan.budget_s:g} s; stopped", file=sys.stderr)
        return 2
    print(markdown(report))
    met = targets_met(report)
    if args.json is not None:
        payload = {
            "plan": asdict(plan),
            "machine": report.machine,
            "figures": figures(report),
            "memory": asdict(report.memory),
            "concurrent_connections_by_api_process": report.splits,
            "cpu_percent": {"1_stream": report.cpu_1, f"{plan.relay_streams}_streams": report.cpu_n},
            "targets_met": met,
            "seconds": report.seconds,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if args.check and not all(met.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
