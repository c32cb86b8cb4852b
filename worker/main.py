"""The worker process: an arq worker that wakes on enqueue instead of polling on a timer."""

import asyncio
import contextlib
import logging
from typing import Any

from arq.worker import Worker, func
from redis.asyncio import Redis

from shared import queue
from shared.keys import WAKEUP_CHANNEL
from shared.settings import Settings
from worker.backends import create_backend
from worker.task import run_completion

log = logging.getLogger("gateway.worker")


class GatewayWorker(Worker):
    """arq's worker with its poll sleep replaced by "until woken, or `fallback_s` at most".

    The API publishes on `WAKEUP_CHANNEL` after each enqueue, so a job starts within a Redis
    round trip of being queued. A missed wake-up (pub/sub is at-most-once) costs one fallback poll.
    """

    def __init__(self, *, redis_url: str, fallback_s: float, **kwargs: Any) -> None:
        super().__init__(poll_delay=0, **kwargs)
        self._redis_url = redis_url
        self._fallback_s = fallback_s
        self._wake = asyncio.Event()

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
    ctx["backend"] = create_backend(settings, ctx["redis"])
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
