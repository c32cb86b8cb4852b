"""Soak: a steady mix of requests for minutes against 2 workers, counting how every one ended.

The gateway is the one bench/stream_latency.py starts (a redis-server, one API, two workers on the
scripted backend). Requests start at a steady rate, whatever the gateway's pace (open loop), in
a fixed rotation of five kinds:

    stream       a streamed completion, read to its end
    plain        a non-streamed completion
    background   `background: true`, polled until it ends, then read back
    cancelled    a stream cancelled (POST .../cancel) after its first token
    disconnect   a stream dropped after a few tokens and resumed from its last event id

Every reply's text is checked word for word (the scripted backend numbers them), so a lost or
repeated token shows. Targets: no worker exits, no lost or repeated token, every request ends
with its terminal event, and the resident memory of every process flat within 10% from the end
of the warm-up to the end (checked for runs of 2 minutes or more; shorter runs report it).

    .venv/bin/python bench/soak.py                      # 5 minutes, 10 requests/s
    .venv/bin/python bench/soak.py --duration 40 --check --json out.json
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.stream_latency import Gateway, cpu_s, rss_kib  # noqa: E402
from shared.stats import STATS_KEY  # noqa: E402

MODEL = "claude-sonnet-4-5"
RSS_TOLERANCE = 0.10
RSS_CHECKED_FROM_S = 120.0
SAMPLE_EVERY_S = 5.0


def words(n: int) -> str:
    return "".join(f"w{i} " for i in range(n))


def script(**spec: Any) -> str:
    return "script:" + json.dumps(spec)


def body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}


class Mismatch(Exception):
    """The reply's text is not the text the backend was scripted to send."""


class NoTerminal(Exception):
    """The reply ended without its terminal event."""


async def sse(response: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    """(id, data) of each SSE event."""
    event_id: str | None = None
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            yield event_id, line[6:]
            event_id = None


def content(chunk: dict[str, Any]) -> str:
    return "".join(choice["delta"].get("content") or "" for choice in chunk.get("choices", []))


@dataclass
class Streamed:
    text: str = ""
    completion_id: str | None = None
    last_id: str | None = None
    finish: str | None = None
    error: str | None = None
    done: bool = False


def events_of(response: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    if response.status_code != 200:
        raise httpx.HTTPStatusError(
            f"status {response.status_code}", request=response.request, response=response
        )
    return sse(response)


async def read_stream(
    events: AsyncIterator[tuple[str | None, str]], into: Streamed, *, stop_after: int | None = None
) -> None:
    """Reads SSE chunks into `into`; returns early after `stop_after` content chunks."""
    chunks = 0
    async for event_id, data in events:
        if data == "[DONE]":
            into.done = True
            return
        chunk = json.loads(data)
        if "error" in chunk:
            into.error = chunk["error"].get("code")
            continue
        into.completion_id = chunk["id"]
        into.last_id = event_id or into.last_id
        if text := content(chunk):
            into.text += text
            chunks += 1
        for choice in chunk.get("choices", []):
            into.finish = choice.get("finish_reason") or into.finish
        if stop_after is not None and chunks >= stop_after:
            return


def completed(streamed: Streamed, expected: str) -> None:
    if not streamed.done or streamed.finish is None:
        raise NoTerminal(f"done={streamed.done} finish={streamed.finish} error={streamed.error}")
    if streamed.text != expected:
        raise Mismatch(f"{len(streamed.text)} characters instead of {len(expected)}")


# --- the five kinds of request ------------------------------------------------------------------------


async def post_stream(
    client: httpx.AsyncClient, prompt: str, into: Streamed, *, stop_after: int | None = None
) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=body(prompt, stream=True)) as r:
        await read_stream(events_of(r), into, stop_after=stop_after)


async def stream_kind(client: httpx.AsyncClient) -> str:
    expected = words(200)
    got = Streamed()
    await post_stream(client, script(text=expected, delay_ms=2), got)
    completed(got, expected)
    return "ok"


async def plain_kind(client: httpx.AsyncClient) -> str:
    expected = words(100)
    response = await client.post("/v1/chat/completions", json=body(script(text=expected)))
    response.raise_for_status()
    choice = response.json()["choices"][0]
    if choice["finish_reason"] != "stop":
        raise NoTerminal(choice["finish_reason"])
    if choice["message"]["content"] != expected:
        raise Mismatch("plain reply differs")
    return "ok"


async def background_kind(client: httpx.AsyncClient) -> str:
    expected = words(100)
    response = await client.post(
        "/v1/chat/completions", json=body(script(text=expected, wait_ms=200), background=True)
    )
    response.raise_for_status()
    completion_id = response.json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        polled = await client.get(f"/v1/chat/completions/{completion_id}")
        polled.raise_for_status()
        status = polled.json()["status"]
        if status == "completed":
            if polled.json()["choices"][0]["message"]["content"] != expected:
                raise Mismatch("background reply differs")
            return "ok"
        if status not in ("queued", "in_progress"):
            raise NoTerminal(f"background job ended {status}")
        await asyncio.sleep(0.2)
    raise NoTerminal("background job still running after 60 s")


async def cancelled_kind(client: httpx.AsyncClient) -> str:
    got = Streamed()
    prompt = script(text=words(2000), delay_ms=5)
    async with client.stream("POST", "/v1/chat/completions", json=body(prompt, stream=True)) as r:
        events = events_of(r)
        await read_stream(events, got, stop_after=1)
        if got.completion_id is None:
            raise NoTerminal("no chunk before the cancel")
        cancel = await client.post(f"/v1/chat/completions/{got.completion_id}/cancel")
        cancel.raise_for_status()
        await read_stream(events, got)
    if not got.done or got.error != "cancelled":
        raise NoTerminal(f"cancelled stream ended done={got.done} error={got.error}")
    if not words(2000).startswith(got.text):
        raise Mismatch("cancelled stream's text is not a prefix of the reply")
    return "ok"


async def disconnect_kind(client: httpx.AsyncClient) -> str:
    expected = words(300)
    got = Streamed()
    await post_stream(client, script(text=expected, delay_ms=3), got, stop_after=3)  # then it drops
    if got.completion_id is None or got.last_id is None:
        raise NoTerminal("nothing before the disconnect")
    headers = {"Last-Event-ID": got.last_id}
    url = f"/v1/chat/completions/{got.completion_id}?stream=true"
    async with client.stream("GET", url, headers=headers) as r:
        await read_stream(events_of(r), got)
    completed(got, expected)
    return "ok"


KINDS: dict[str, Callable[[httpx.AsyncClient], Awaitable[str]]] = {
    "stream": stream_kind,
    "plain": plain_kind,
    "background": background_kind,
    "cancelled": cancelled_kind,
    "disconnect": disconnect_kind,
}
ROTATION = [
    "stream",
    "plain",
    "disconnect",
    "background",
    "stream",
    "cancelled",
    "plain",
    "stream",
    "disconnect",
    "background",
]


async def attempt(kind: str, client: httpx.AsyncClient) -> str:
    try:
        return await KINDS[kind](client)
    except Mismatch as exc:
        outcome, detail = "lost_or_repeated_tokens", repr(exc)
    except NoTerminal as exc:
        outcome, detail = "no_terminal_event", repr(exc)
    except httpx.HTTPStatusError as exc:
        outcome, detail = f"http_{exc.response.status_code}", exc.response.text[:300]
    except Exception as exc:  # every request is counted, however it failed
        outcome, detail = f"error_{type(exc).__name__}", repr(exc)
    print(f"{time.strftime('%H:%M:%S')} {kind}: {outcome}: {detail}", file=sys.stderr)
    return outcome


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Report:
    duration_s: float
    rate_per_s: float
    warmup_s: float
    sent: int = 0
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)
    worker_exits: int = 0
    exited_processes: list[str] = field(default_factory=list)
    rss_kib: dict[str, list[int]] = field(default_factory=dict)
    rss_growth: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    load_before: str = ""
    load_after: str = ""
    seconds: float = 0.0

    def count(self, outcome: str) -> int:
        return sum(by.get(outcome, 0) for by in self.outcomes.values())

    def targets(self) -> dict[str, bool]:
        ended = sum(sum(by.values()) for by in self.outcomes.values())
        met = {
            "no worker exits": self.worker_exits == 0 and not self.exited_processes,
            "no lost or repeated token": self.count("lost_or_repeated_tokens") == 0,
            "every request ended with its terminal event": ended == self.sent == self.count("ok"),
        }
        if self.duration_s >= RSS_CHECKED_FROM_S:
            met["RSS flat within 10% after warm-up"] = all(
                g <= RSS_TOLERANCE for g in self.rss_growth.values()
            )
        return met


def _growth(samples: list[int]) -> float:
    """Growth from the first samples after the warm-up to the last ones (medians of three)."""
    if len(samples) < 2:
        return 0.0
    head, tail = samples[:3], samples[-3:]
    return statistics.median(tail) / statistics.median(head) - 1


async def run(duration_s: float, rate: float, warmup_s: float) -> Report:
    report = Report(duration_s=duration_s, rate_per_s=rate, warmup_s=warmup_s)
    report.load_before = Path("/proc/loadavg").read_text().strip()
    began = time.perf_counter()
    outcomes: Counter[tuple[str, str]] = Counter()
    # Idle connections are dropped well before the server's keep-alive timeout (uvicorn: 5 s), so
    # the client never reuses one the server is closing at that moment (a client-side race).
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=128, keepalive_expiry=2.0)
    timeout = httpx.Timeout(120.0, connect=10.0)
    with tempfile.TemporaryDirectory(prefix="gateway-soak-") as workdir:
        # Job records and events expire a minute after their job ends (the least allowed), so
        # Redis's memory reaches its steady state within the warm-up instead of growing all run.
        gateway = Gateway(Path(workdir), EVENT_TTL_S="60")
        try:
            async with httpx.AsyncClient(
                base_url=gateway.url, limits=limits, timeout=timeout, trust_env=False
            ) as client:
                await gateway.start(client)
                pids = await gateway.pids()
                cpu_start = {name: cpu_s(pid) for name, pid in pids.items()}
                report.rss_kib = {name: [] for name in pids}
                in_flight: set[asyncio.Task[None]] = set()

                async def one(kind: str) -> None:
                    outcomes[(kind, await attempt(kind, client))] += 1

                start = time.monotonic()
                next_sample = start + warmup_s
                while (now := time.monotonic()) < start + duration_s:
                    kind = ROTATION[report.sent % len(ROTATION)]
                    task = asyncio.create_task(one(kind))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    report.sent += 1
                    if now >= next_sample:
                        for name, pid in pids.items():
                            report.rss_kib[name].append(rss_kib(pid))
                        next_sample += SAMPLE_EVERY_S
                    for process in [*gateway.apis, *gateway.workers]:
                        if process is not None and process.poll() is not None:
                            report.exited_processes.append(f"pid {process.pid} exited {process.returncode}")
                    if report.exited_processes:
                        break
                    await asyncio.sleep(max(0.0, start + report.sent / rate - time.monotonic()))
                if in_flight:
                    await asyncio.wait(in_flight, timeout=120)
                report.cpu_s = {name: cpu_s(pid) - cpu_start[name] for name, pid in pids.items()}
                redis = Redis.from_url(gateway.redis.url)
                try:
                    exits = await redis.hgetall(STATS_KEY)
                finally:
                    await redis.aclose()
                report.worker_exits = sum(int(v) for k, v in exits.items() if k.startswith(b"worker_exits|"))
        except Exception:
            print(gateway.log_tail(), file=sys.stderr)
            raise
        finally:
            gateway.stop()
    for (kind, outcome), count in sorted(outcomes.items()):
        report.outcomes.setdefault(kind, {})[outcome] = count
    report.rss_growth = {name: _growth(samples) for name, samples in report.rss_kib.items()}
    report.load_after = Path("/proc/loadavg").read_text().strip()
    report.seconds = time.perf_counter() - began
    return report


def markdown(report: Report) -> str:
    lines = [
        f"Soak: {report.sent} requests at {report.rate_per_s:g}/s for {report.duration_s:g} s "
        f"(warm-up {report.warmup_s:g} s), 2 workers, scripted backend",
        "",
        "| Kind | Outcomes |",
        "|---|---|",
    ]
    for kind, by in report.outcomes.items():
        lines.append(f"| {kind} | {', '.join(f'{o} {n}' for o, n in sorted(by.items()))} |")
    lines += ["", "| Process | RSS after warm-up → end (KiB) | growth | CPU (s) |", "|---|---|---:|---:|"]
    for name, samples in report.rss_kib.items():
        span = f"{samples[0]:,} → {samples[-1]:,}" if samples else "-"
        growth, cpu = report.rss_growth.get(name, 0.0), report.cpu_s.get(name, 0.0)
        lines.append(f"| {name} | {span} | {growth:+.1%} | {cpu:.1f} |")
    lines += [
        "",
        f"- Worker exits recorded: {report.worker_exits}; "
        f"processes that exited: {report.exited_processes or 'none'}",
    ]
    lines.append(
        f"- Load average before: {report.load_before}; after: {report.load_after}; "
        f"run time {report.seconds:.0f} s"
    )
    for target, ok in report.targets().items():
        lines.append(f"- {target}: {'met' if ok else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (300)")
    parser.add_argument("--rate", type=float, default=10.0, help="requests started per second (10)")
    parser.add_argument(
        "--warmup", type=float, help="seconds before memory is sampled (a quarter of the run)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else args.duration / 4
    report = asyncio.run(run(args.duration, args.rate, warmup))
    print(markdown(report))
    met = report.targets()
    if args.json is not None:
        args.json.write_text(json.dumps({**asdict(report), "targets_met": met}, indent=2) + "\n")
    return 1 if args.check and not all(met.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
