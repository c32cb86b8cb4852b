"""This worker's heartbeat: who it is and what it runs, refreshed in Redis every few seconds.

The key expires `HEARTBEAT_TTL_FACTOR` intervals after the last beat, so a worker that is killed,
hangs or loses Redis stops counting as alive on its own. Jobs starting or ending trigger a beat
within `_COALESCE_S` (one for a whole burst), so `status` shows current jobs without waiting for
the interval. The beat on the interval also checks the worker's backend auth anew (local, but
file reads) for `GET /v1/auth/status`, and refreshes the worker's load that placement counts on.
"""

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import backend_auth, heartbeats
from shared.heartbeats import Heartbeat, SandboxReport
from shared.settings import Settings
from shared.workspace_store import store_name

log = logging.getLogger("gateway.worker")

_COALESCE_S = 0.25
"""Up to how long `status` lags a job starting or ending: a burst's starts and ends share beats
(at 0.05 s, a burst of 50 took 13 beats, a quarter of a round trip per job)."""


class HeartbeatLoop:
    def __init__(
        self,
        redis_url: str,
        settings: Settings,
        *,
        slots: int,
        jobs: Callable[[], list[str]],
        idle: Callable[[], bool],
        worker_id: str | None = None,
    ) -> None:
        self._redis_url = redis_url
        self._settings = settings
        self._store = store_name(settings)
        self._interval_s = settings.heartbeat_interval_s
        self._ttl_s = settings.heartbeat_ttl_s
        self._slots = slots
        self._jobs = jobs
        self._idle = idle
        self._auth: backend_auth.BackendAuth | None = None
        self._changed = asyncio.Event()
        host = socket.gethostname()
        self.worker_id = worker_id or heartbeats.new_worker_id(host)
        self.host, self.pid, self._started = host, os.getpid(), time.time()
        self.sandbox: SandboxReport | None = None
        """The backend's job sandbox, once it has started."""
        self.draining = False
        """Stopping on a signal: it says so at once, and placement, `/ready` and `status` stop
        counting its free slots (they did all through a drain: an outside probe's balancer kept
        sending requests to a fleet that took none)."""

    def poke(self) -> None:
        """The set of running jobs changed: beat now."""
        self._changed.set()

    def drain(self) -> None:
        self.draining = True
        self.poke()

    async def run(self) -> None:
        redis = Redis.from_url(self._redis_url, socket_timeout=self._interval_s)
        task = asyncio.current_task()
        assert task is not None
        try:
            checked = -self._interval_s
            # Until cancelled, even where a cancellation is swallowed on the way (in a Redis call):
            # the loop beat on, and a worker whose start-up had failed under `up` waited on it,
            # alive to /ready and `status`, its error unsaid, until stopped (an outside probe).
            while not task.cancelling():
                self._changed.clear()
                now = time.monotonic()
                full = now - checked >= self._interval_s
                await self._beat(redis, full)
                checked = now if full else checked
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(checked + self._interval_s - now):
                        await self._changed.wait()
                        await asyncio.sleep(_COALESCE_S)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await asyncio.shield(heartbeats.retire(redis, self.worker_id))
            await redis.aclose()

    async def _beat(self, redis: Redis, full: bool) -> None:
        """A beat; `full`: the one on the interval, which checks auth and refreshes the load."""
        if full or self._auth is None:
            self._auth = backend_auth.check(self._settings)
        heartbeat = Heartbeat(
            id=self.worker_id,
            host=self.host,
            pid=self.pid,
            started=self._started,
            beat=time.time(),
            slots=self._slots,
            jobs=self._jobs(),
            backend=self._settings.backend,
            auth=self._auth,
            sandbox=self.sandbox,
            draining=self.draining,
            workspace_store=self._store,
        )
        try:
            load = full or self.draining
            await heartbeats.beat(redis, heartbeat, self._ttl_s, load=load, idle=self._idle())
        except (RedisError, OSError) as exc:
            log.warning("heartbeat failed (%s); retrying in %.1f s", type(exc).__name__, self._interval_s)
