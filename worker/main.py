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

from shared import queue
from shared.keys import WAKEUP_CHANNEL
from shared.settings import Settings
from worker.backends import create_backend
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
        listener = asyncio.create_task(self._listen_for_wakeups())
        try:
            await super().main()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _poll_iteration(self) -> None:
        self._wake.clear()
        await super()._poll_iteration()
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

    async def _listen_for_wakeups(self) -> None:
        while True:
            redis = Redis.from_url(self._redis_url)
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(WAKEUP_CHANNEL)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self._wake.set()
            except (OSError, ConnectionError) as exc:
                log.warning("wake-up listener lost Redis (%s); polling every %.1f s", exc, self._fallback_s)
                await asyncio.sleep(1)
            finally:
                await redis.aclose()


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    ctx["backend"] = create_backend(settings)
    log.info("worker ready (backend %s)", settings.backend)


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
        ctx={"settings": settings},
        max_jobs=settings.jobs_per_worker,
        # Our own timeout fires first and reports it; arq's is the backstop.
        job_timeout=settings.job_timeout_s + 30,
        # The event stream is the result; a job runs at most once (crash recovery is a lease's job).
        keep_result=0,
        max_tries=1,
        retry_jobs=False,
        job_completion_wait=settings.drain_timeout_s,
        burst=burst,
    )


def run_worker(settings: Settings, redis_url: str) -> None:
    build_worker(settings, redis_url).run()
