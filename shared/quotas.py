"""Rate limits and concurrent-job caps in Redis, shared by every API replica.

Each check is one Lua script, so replicas never race between reading a count and updating it.
Rate limits are sliding-window logs (a sorted set of request times per bucket): exact, with no
burst at a window boundary. Times come from Redis's clock, so replicas need not agree on theirs.

A job slot is a member of its holder's sorted set, scored by a lease deadline: every step that
ends a job frees it (shared/jobstore.py), and the lease when a process dies holding it, so a slot
cannot leak. The script reads the holder from the job's slot record, so
it names a key it was not given: fine on one Redis (arq does not support Cluster either).
"""

import math
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.keys import PREFIX, is_job_id

WINDOW_MS = 60_000

_HIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local allowed, remaining, reset, limit = 1, math.huge, 0, 0
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[i + 2])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  local until_free = 0
  if count > 0 then
    until_free = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]) + window - now
  end
  local left = cap - count
  if left <= 0 and allowed == 1 then allowed, remaining, reset, limit = 0, 0, until_free, cap end
  if allowed == 1 and left - 1 < remaining then
    remaining, reset, limit = left - 1, (count > 0) and until_free or window, cap
  end
end
if allowed == 1 then
  for _, key in ipairs(KEYS) do
    redis.call('ZADD', key, now, ARGV[2])
    redis.call('PEXPIRE', key, window)
  end
end
return {allowed, limit, remaining, reset}
"""

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease)
redis.call('SET', KEYS[2], KEYS[1], 'PX', lease)
return 1
"""

_RELEASE = """
local holder = redis.call('GET', KEYS[1])
if holder then
  redis.call('ZREM', holder, ARGV[1])
  redis.call('DEL', KEYS[1])
end
return holder and 1 or 0
"""


def rate_key(subject: str, endpoint_class: str) -> str:
    return f"{PREFIX}:ratelimit:{endpoint_class}:{subject}"


def slots_key(holder: str) -> str:
    return f"{PREFIX}:jobslots:{holder}"


def slot_record_key(job_id: str) -> str:
    if not is_job_id(job_id):
        raise ValueError("malformed job id")
    return f"{PREFIX}:job:{job_id}:slot"


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_ms: int

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.reset_ms / 1000))


async def hit(redis: Redis, buckets: dict[str, int]) -> RateDecision:
    """Counts one request against every bucket (key → limit per window) if all have room."""
    keys = list(buckets)
    # A fresh member per request: a client-chosen id (x-request-id) would let repeats collapse.
    script = redis.register_script(_HIT)
    allowed, limit, remaining, reset = await script(
        keys=keys, args=[WINDOW_MS, uuid.uuid4().hex, *buckets.values()]
    )
    return RateDecision(bool(allowed), int(limit), max(0, int(remaining)), int(reset))


async def acquire_job_slot(redis: Redis, holder: str, job_id: str, cap: int, lease_s: float) -> bool:
    script = redis.register_script(_ACQUIRE)
    keys = [slots_key(holder), slot_record_key(job_id)]
    acquired = await script(keys=keys, args=[cap, job_id, int(lease_s * 1000)])
    return bool(acquired)


async def release_job_slot(redis: Redis, job_id: str) -> None:
    """Frees the job's slot, if it holds one; idempotent."""
    await redis.register_script(_RELEASE)(keys=[slot_record_key(job_id)], args=[job_id])
