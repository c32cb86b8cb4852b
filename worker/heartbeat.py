"""This worker's heartbeat: who it is and what it runs, refreshed in Redis every few seconds.

The key expires `HEARTBEAT_TTL_FACTOR` intervals after the last beat, so a worker that is killed,
hangs or loses Redis stops counting as alive on its own. A job starting or ending triggers a beat
at once, so `status` shows current jobs without waiting for the interval. Each beat also carries
the worker's backend auth, checked anew (local and cheap), for `GET /v1/auth/status`.
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

log = logging.getLogger("gateway.worker")


class HeartbeatLoop:
    def __init__(
        self, redis_url: str, settings: Settings, *, slots: int, jobs: Callable[[], list[str]]
    ) -> None:
        self._redis_url = redis_url
        self._settings = settings
        self._interval_s = settings.heartbeat_interval_s
        self._ttl_s = settings.heartbeat_ttl_s
        self._slots = slots
        self._jobs = jobs
        self._changed = asyncio.Event()
        host, pid = socket.gethostname(), os.getpid()
        self.worker_id = heartbeats.new_worker_id(host, pid)
        self.host, self.pid, self._started = host, pid, time.time()
        self.sandbox: SandboxReport | None = None
        """The backend's job sandbox, once it has started."""

    def poke(self) -> None:
        """The set of running jobs changed: beat now."""
        self._changed.set()

    async def run(self) -> None:
        redis = Redis.from_url(self._redis_url, socket_timeout=self._interval_s)
        try:
            while True:
                self._changed.clear()
                await self._beat(redis)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval_s):
                        await self._changed.wait()
        finally:
            with contextlib.suppress(RedisError, OSError):
                await asyncio.shield(heartbeats.retire(redis, self.worker_id))
            await redis.aclose()

    async def _beat(self, redis: Redis) -> None:
        heartbeat = Heartbeat(
            id=self.worker_id,
            host=self.host,
            pid=self.pid,
            started=self._started,
            beat=time.time(),
            slots=self._slots,
            jobs=self._jobs(),
            backend=self._settings.backend,
            auth=backend_auth.check(self._settings),
            sandbox=self.sandbox,
        )
        try:
            await heartbeats.beat(redis, heartbeat, self._ttl_s)
        except (RedisError, OSError) as exc:
            log.warning("heartbeat failed (%s); retrying in %.1f s", type(exc).__name__, self._interval_s)
