"""`claude-gateway up` keeps what it started running, and stops it all within a bound.

A child that dies (the API, a worker, the private Redis) is logged with its exit status and
started again after a backoff (1 s, doubling up to 30 s; back to 1 s once it has run a minute),
while the others keep serving: workers and the API ride out a Redis restart on their own, and
Redis comes back from its own data folder. A worker killed outright (SIGKILL, the OOM killer, a
crash) cannot record its exit, so `up` records it (shared/worker_exits.py); its jobs are
recovered by the lease rules like any lost worker's.

Stopping (SIGINT, SIGTERM, SIGHUP) sends SIGTERM to the API and the workers, which drain for
`DRAIN_TIMEOUT_S`; whatever is still running `STOP_GRACE_S` later is killed, then Redis is
stopped. A second Ctrl-C kills at once.
"""

import asyncio
import logging
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from cli.embedded_redis import EmbeddedRedis
from shared import heartbeats, worker_exits
from shared.worker_exits import ExitReason

log = logging.getLogger("gateway.up")

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0
STOP_GRACE_S = 5.0
_TICK_S = 0.2


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


@dataclass
class Child:
    name: str  # "api 1", "worker 2", "redis"
    spawn: Callable[[], subprocess.Popen[bytes]]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff_s: float = FIRST_BACKOFF_S
    restart_at: float | None = None

    def start(self) -> None:
        self.process = self.spawn()
        self.started, self.restart_at = time.monotonic(), None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(self, children: list[Child], *, redis_url: str, drain_timeout_s: float) -> None:
        self.children = children
        self._redis_url = redis_url
        self._drain_timeout_s = drain_timeout_s
        self._signals = 0

    def request_stop(self, signum: int, _frame: object) -> None:
        self._signals += 1
        if self._signals > 1:  # a second Ctrl-C: do not wait for the drain
            log.warning("stopping now: running jobs are killed (the next start recovers them)")
            self._kill_all()

    def run(self) -> None:
        """Supervises until a stop is requested."""
        while not self._signals:
            for child in self.children:
                self._watch(child)
            time.sleep(_TICK_S)

    def _watch(self, child: Child) -> None:
        now = time.monotonic()
        assert child.process is not None
        code = child.process.poll()
        if code is None:
            if now - child.started >= STABLE_AFTER_S:
                child.backoff_s = FIRST_BACKOFF_S
            return
        if child.restart_at is None:
            log.error("%s (pid %d) %s", child.name, child.process.pid, describe_exit(code))
            if code < 0 and child.name.startswith("worker"):
                self._record_killed_worker(child.process, describe_exit(code))
            self._schedule(child, now)
        elif now >= child.restart_at:
            try:
                child.start()
            except (OSError, RuntimeError) as exc:
                log.error("could not restart %s (%s)", child.name, exc)
                self._schedule(child, now)
                return
            assert child.process is not None
            log.warning("restarted %s (pid %d)", child.name, child.process.pid)

    @staticmethod
    def _schedule(child: Child, now: float) -> None:
        child.restart_at = now + child.backoff_s
        log.warning("restarting %s in %.0f s", child.name, child.backoff_s)
        child.backoff_s = min(MAX_BACKOFF_S, child.backoff_s * 2)

    def _record_killed_worker(self, process: subprocess.Popen[bytes], detail: str) -> None:
        try:
            asyncio.run(_record_killed(self._redis_url, process, detail))
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("could not record the worker's exit in Redis (%s)", type(exc).__name__)

    def stop(self, redis: EmbeddedRedis | None) -> None:
        """SIGTERM to the API and workers, SIGKILL to what outlives the drain, then Redis."""
        deadline = time.monotonic() + self._drain_timeout_s + STOP_GRACE_S
        gateway = [c for c in self.children if c.process is not None and c.name != "redis"]
        # Said, or a drain looks like a hang (an outside probe).
        log.warning(
            "stopping: running jobs get up to %.0f s to finish (DRAIN_TIMEOUT_S); "
            "stop again to kill them now",
            self._drain_timeout_s,
        )
        for child in gateway:
            if child.running():
                assert child.process is not None
                child.process.send_signal(signal.SIGTERM)
        while any(c.running() for c in gateway) and time.monotonic() < deadline:
            time.sleep(_TICK_S)
        for child in gateway:
            if child.running():
                assert child.process is not None
                log.warning("%s (pid %d) did not stop in time; killing it", child.name, child.process.pid)
        self._kill_all(but_redis=True)
        if redis is not None:
            redis.stop(timeout_s=STOP_GRACE_S)

    def _kill_all(self, *, but_redis: bool = False) -> None:
        """Kills what still runs, Redis last: the workers' exits are recorded in it first (a
        second Ctrl-C's kills had gone unrecorded: an outside probe)."""
        for child in sorted(self.children, key=lambda c: c.name == "redis"):
            if child.running() and not (but_redis and child.name == "redis"):
                assert child.process is not None
                child.process.kill()
                child.process.wait()
                if child.name.startswith("worker"):
                    self._record_killed_worker(child.process, "was killed by up's stop")


async def _record_killed(redis_url: str, process: subprocess.Popen[bytes], detail: str) -> None:
    """Records a worker's exit for it under the id it was started with, and retires its heartbeat:
    it had counted as alive, its slots free, until the heartbeat expired."""
    args = process.args
    assert isinstance(args, list)  # `up` starts its workers with a list naming their ids
    worker_id = str(args[args.index("--id") + 1])
    gone = worker_exits.new_exit(worker_id, socket.gethostname(), process.pid, ExitReason.KILLED, detail)
    async with Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2) as redis:
        await worker_exits.record_exit(redis, gone)
        await heartbeats.retire(redis, worker_id)
