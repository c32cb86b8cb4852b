"""The service at a glance, read from Redis: what `/metrics`, `/status`, `/ready`, the dashboard
and `claude-gateway status` all show.

Everything is computed from shared state at read time (the arq queue, worker heartbeats, the
outcome totals workers record), so any API process, or the CLI on any machine, gives the same
picture.
"""

import time

from arq.constants import in_progress_key_prefix
from pydantic import BaseModel
from redis.asyncio import Redis

from shared.heartbeats import Heartbeat, alive_workers
from shared.stats import RecentFailure, Stats, read_stats, recent_failures


class QueueState(BaseModel):
    depth: int  # jobs waiting for a worker (not those running)
    oldest_age_s: float | None  # None when the queue is empty


class Snapshot(BaseModel):
    at: float
    queue: QueueState
    workers: list[Heartbeat]
    jobs_running: int
    slots: int
    stats: Stats
    recent_failures: list[RecentFailure]


# arq leaves a running job in the queue's sorted set (score = enqueue time, ms) until it finishes,
# marked by an `arq:in-progress:<id>` key. So "waiting" is the members without that key, and the
# oldest waiting job is the lowest-scored of those. Jobs are started in score order, so running
# ones sit among the lowest scores: checking the lowest `ARGV[2]` members is exact as long as
# fewer jobs run at once, and keeps a scrape cheap however deep the queue grows.
_WAITING = """
local depth = redis.call('ZCARD', KEYS[1])
local head = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
local oldest = false
for i = 1, #head, 2 do
  if redis.call('EXISTS', ARGV[1] .. head[i]) == 1 then
    depth = depth - 1
  elseif not oldest then
    oldest = head[i + 1]
  end
end
return {depth, oldest}
"""
_HEAD_CHECKED = 5000


async def queue_state(redis: Redis, queue_name: str, now: float) -> QueueState:
    depth, oldest = await redis.eval(  # type: ignore[misc]
        _WAITING, 1, queue_name, in_progress_key_prefix, str(_HEAD_CHECKED)
    )
    age = max(0.0, now - float(oldest) / 1000) if oldest else None
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
