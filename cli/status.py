"""`claude-gateway status [--json] [--watch [SECONDS]]`: the service at a glance, from Redis.

It reads the same shared state as `/metrics` and the dashboard (shared/status.py), so it works
from any machine that reaches `REDIS_URL`, with or without an API process running.
"""

import asyncio
import contextlib
import os
import signal
import sys
import time
from typing import Literal

from redis.exceptions import RedisError

from cli.reach import cli_redis, redis_problem
from shared.heartbeats import Heartbeat, SandboxReport
from shared.settings import Settings
from shared.status import Snapshot, take_snapshot


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _sandbox(report: SandboxReport | None) -> str:
    """on; OFF (the operator's choice); UNUSABLE (jobs are refused); - (the backend runs no agent)."""
    if report is None:
        return "-"
    return "on" if report.ready else "OFF" if report.mode == "off" else "UNUSABLE"


def _disagreement(
    workers: list[Heartbeat], setting: Literal["workspace_store", "backend"], why: str
) -> list[str]:
    """Lines naming each worker's `setting` when the workers do not all have the same."""
    if len({getattr(worker, setting) for worker in workers}) < 2:
        return []
    heading = f"workers with different {setting.upper()}: {why}"
    return ["", heading, *(f"  {worker.id}: {getattr(worker, setting)}" for worker in workers)]


def render(snapshot: Snapshot) -> str:
    now = snapshot.at
    queue = snapshot.queue
    oldest = "-" if queue.oldest_age_s is None else _age(queue.oldest_age_s)
    lines = [
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
        f"queue      {queue.depth} waiting, oldest {oldest}",
        f"running    {snapshot.jobs_running} of {snapshot.slots} slots, {len(snapshot.workers)} live workers",
        "",
        f"{'WORKER':<40} {'HOST':<20} {'PID':>7} {'UP':>6} {'BEAT':>6}  {'AUTH':<21} {'SANDBOX':<8} JOBS",
    ]
    problems, sandbox_problems = [], []
    for worker in snapshot.workers:
        beat = _age(max(0.0, now - worker.beat))
        # The scripted backend reaches no model: its auth, checked as any worker's, is no problem.
        checked = worker.auth if worker.backend != "scripted" else None
        auth = worker.backend or "-"
        if checked is not None:
            auth = checked.method + ("" if checked.valid else " UNUSABLE")
        lines.append(
            f"{worker.id:<40} {worker.host[:20]:<20} {worker.pid:>7} {_age(now - worker.started):>6} "
            f"{beat:>6}  {auth:<21} {_sandbox(worker.sandbox):<8} {len(worker.jobs)}/{worker.slots} "
            f"{'draining ' if worker.draining else ''}{' '.join(worker.jobs)}"
        )
        problems += [f"  {worker.id}: {error}" for error in (checked.errors if checked else [])]
        if worker.sandbox is not None and not worker.sandbox.ready:
            sandbox_problems.append(f"  {worker.id}: {worker.sandbox.reason}")
        elif worker.sandbox is not None:  # sandboxed, with less than it should have
            sandbox_problems += [f"  {worker.id}: {warning}" for warning in worker.sandbox.warnings]
    if not snapshot.workers:
        lines.append("(no live worker)")
    if problems:
        lines += ["", "backend auth problems (GET /v1/auth/status)", *problems]
    if sandbox_problems:
        lines += ["", "jobs without a sandbox, or with less of one (docs/security.md)", *sandbox_problems]
    # Each is one setting every worker must share: found differing by an outside probe, with
    # nothing in sight to say which worker broke sessions or answered callers from a script.
    lines += _disagreement(snapshot.workers, "workspace_store", "sessions' files are lost between them")
    lines += _disagreement(snapshot.workers, "backend", "callers get answers from either")
    stats = snapshot.stats
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(stats.jobs.items())) or "none yet"
    lines += ["", f"jobs       {outcomes}", "", "recent failures"]
    for failure in snapshot.recent_failures:
        lines.append(f"  {_age(max(0.0, now - failure.at)):>6} ago  {failure.code:<30} job {failure.job_id}")
    if not snapshot.recent_failures:
        lines.append("  none")
    lines += ["", "recent worker exits"]
    for gone in snapshot.recent_worker_exits:
        lines.append(
            f"  {_age(max(0.0, now - gone.at)):>6} ago  {gone.reason:<10} {gone.worker_id} {gone.detail}"
        )
    if not snapshot.recent_worker_exits:
        lines.append("  none")
    return "\n".join(lines)


async def _status(settings: Settings, redis_url: str, *, as_json: bool, watch_s: float | None) -> None:
    # Ctrl-C ends the watch between snapshots: asyncio's own handling cancels the task wherever it
    # is, and a cancel inside redis-py's command left it waiting for ever (2 of 40 tries).
    interrupted = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted.set)
    redis = cli_redis(redis_url)
    try:
        while not interrupted.is_set():
            try:
                snapshot = await take_snapshot(redis, settings.queue_name)
                text = snapshot.model_dump_json() if as_json else render(snapshot)
            except (OSError, RedisError) as exc:
                if watch_s is None:
                    raise
                # A frame of its own: the watch goes on through the outage it should show (an
                # outside probe's ended at the first error).
                text = f"{time.strftime('%H:%M:%S')}  {redis_problem('status', exc)}"
            if watch_s is not None and not as_json and sys.stdout.isatty():
                sys.stdout.write("\033[H\033[2J")  # clear the screen between frames
            print(text, flush=True)
            if watch_s is None:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(watch_s):
                    await interrupted.wait()
    finally:
        await redis.aclose()


def run_status(settings: Settings, redis_url: str, *, as_json: bool, watch_s: float | None) -> None:
    try:
        asyncio.run(_status(settings, redis_url, as_json=as_json, watch_s=watch_s))
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # its reader (`| head`) left: nothing more to say, nowhere to say it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, RedisError, ValueError) as exc:  # unreachable, refused, or no Redis URL
        sys.exit(redis_problem("status", exc))
