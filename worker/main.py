"""The worker process: an arq worker that wakes on enqueue instead of polling on a timer."""

import asyncio
import contextlib
import functools
import logging
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker, func
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from shared import queue
from shared.jobstore import JobStore
from shared.keys import CANCEL_CHANNEL, WAKEUP_CHANNEL
from shared.settings import Settings
from worker.backends import create_backend
from worker.leases import RunningJobs
from worker.task import run_completion

log = logging.getLogger("gateway.worker")

_DEFER_PER_RUNNING_JOB_S = 0.001


# arq's claim (the job is still queued and due, nobody holds it: mark it in progress) as one
# atomic step instead of WATCH, EXISTS, ZSCORE, MULTI/EXEC: one round trip, and a lost race costs
# the loser nothing more. Returns the job's score, or nil when it is not ours to start.
_CLAIM = """
if redis.call('exists', KEYS[1]) == 1 then return false end
local score = redis.call('zscore', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('psetex', KEYS[1], ARGV[3], '1')
return score
"""


class GatewayWorker(Worker):
    """arq's worker with its poll sleep replaced by "until woken, or `fallback_s` at most".

    The API publishes on `WAKEUP_CHANNEL` after each enqueue, so a job starts within a Redis
    round trip of being queued. A missed wake-up (pub/sub is at-most-once) costs one fallback poll.
    Every worker wakes; the busier ones look a little later, so a burst spreads over the fleet.
    """

    def __init__(self, *, redis_url: str, fallback_s: float, **kwargs: Any) -> None:
        super().__init__(poll_delay=0, **kwargs)
        self._redis_url = redis_url
        self._fallback_s = fallback_s
        self._wake = asyncio.Event()

    @functools.cached_property
    def _claim(self) -> AsyncScript:
        return self.pool.register_script(_CLAIM)  # sent once, then run by its SHA

    async def main(self) -> None:
        listener = asyncio.create_task(self._listen())
        try:
            await super().main()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _poll_iteration(self) -> None:
        self._wake.clear()
        try:
            await super()._poll_iteration()
        except RedisError as exc:
            # arq's worker would die here; ride out the outage (running jobs keep their state).
            log.warning("cannot reach Redis to poll the queue (%s); retrying", type(exc).__name__)
            await asyncio.sleep(1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._fallback_s):
                await self._wake.wait()
        if self.job_counter:
            await asyncio.sleep(_DEFER_PER_RUNNING_JOB_S * self.job_counter)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's `start_jobs`, with the claim done by `_CLAIM`."""
        timeout_ms = int(self.in_progress_timeout_s * 1000)
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            job_id = job_id_b.decode()
            keys = (in_progress_key_prefix + job_id, self.queue_name)
            score = await self._claim(keys=keys, args=(job_id, timestamp_ms(), timeout_ms))
            if score is None:
                self.sem.release()
                continue
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._wake.set()  # a slot is free: look at the queue now

    async def _listen(self) -> None:
        """Wake-ups (a job was queued) and cancels (stop a job if it runs here)."""
        while True:
            redis = Redis.from_url(self._redis_url)
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(WAKEUP_CHANNEL, CANCEL_CHANNEL)
                    async for message in pubsub.listen():
                        if message["type"] != "message":
                            continue
                        if message["channel"] == CANCEL_CHANNEL.encode():
                            self.ctx["running"].cancel(message["data"].decode())
                        else:
                            self._wake.set()
            except (OSError, RedisError) as exc:
                log.warning("lost Redis notifications (%s); polling every %.1f s", exc, self._fallback_s)
                await asyncio.sleep(1)
            finally:
                await redis.aclose()


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    ctx["backend"] = create_backend(settings)
    running = RunningJobs(
        JobStore(ctx["redis"], queue_name=settings.queue_name, ttl_s=settings.event_ttl_s), settings
    )
    ctx["running"] = running
    ctx["maintain"] = asyncio.create_task(running.maintain())
    log.info("worker %s ready (backend %s)", running.worker_id, settings.backend)


async def _shutdown(ctx: dict[str, Any]) -> None:
    if (task := ctx.get("maintain")) is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def build_worker(settings: Settings, redis_url: str, *, burst: bool = False) -> GatewayWorker:
    return GatewayWorker(
        redis_url=redis_url,
        fallback_s=settings.poll_fallback_s,
        functions=[func(run_completion, name=queue.RUN_COMPLETION)],
        queue_name=settings.queue_name,
        redis_settings=queue.redis_settings(redis_url),
        job_serializer=queue.serialize,
        job_deserializer=queue.deserialize,
        on_startup=_startup,
        on_shutdown=_shutdown,
        ctx={"settings": settings},
        max_jobs=settings.jobs_per_worker,
        # Our own timeout fires first and reports it; arq's is the backstop.
        job_timeout=settings.job_timeout_s + 30,
        # The event stream is the result; each attempt runs at most once (leases retry jobs).
        keep_result=0,
        max_tries=1,
        retry_jobs=False,
        job_completion_wait=settings.drain_timeout_s,
        burst=burst,
    )


def run_worker(settings: Settings, redis_url: str) -> None:
    build_worker(settings, redis_url).run()
