"""The service at a glance, read from Redis: what `/metrics`, `/status`, `/ready`, the dashboard
and `claude-gateway status` all show.

Everything is computed from shared state at read time (the arq queue, worker heartbeats, the
outcome totals workers record), so any API process, or the CLI on any machine, gives the same
picture.
"""

import time

from pydantic import BaseModel
from redis.asyncio import Redis

from shared.heartbeats import Heartbeat, alive_workers
from shared.stats import RecentFailure, Stats, read_stats, recent_failures


class QueueState(BaseModel):
    depth: int
    oldest_age_s: float | None  # None when the queue is empty


class Snapshot(BaseModel):
    at: float
    queue: QueueState
    workers: list[Heartbeat]
    jobs_running: int
    slots: int
    stats: Stats
    recent_failures: list[RecentFailure]


async def queue_state(redis: Redis, queue_name: str, now: float) -> QueueState:
    """Depth is the queue's size; age comes from the lowest score, arq's enqueue time in ms."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(queue_name)
        pipe.zrange(queue_name, 0, 0, withscores=True)
        depth, oldest = await pipe.execute()
    age = max(0.0, now - oldest[0][1] / 1000) if oldest else None
    return QueueState(depth=depth, oldest_age_s=age)


async def take_snapshot(redis: Redis, queue_name: str, *, failures: int = 10) -> Snapshot:
    now = time.time()
    workers = await alive_workers(redis)
    return Snapshot(
        at=now,
        queue=await queue_state(redis, queue_name, now),
        workers=workers,
        jobs_running=sum(len(w.jobs) for w in workers),
        slots=sum(w.slots for w in workers),
        stats=await read_stats(redis),
        recent_failures=await recent_failures(redis, failures) if failures else [],
    )
