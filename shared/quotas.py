"""Rate limits and concurrent-job caps in Redis, shared by every API replica.

Each check is one Lua script, so replicas never race between reading a count and updating it.
Rate limits are sliding-window logs (a sorted set of request times per bucket): exact, with no
burst at a window boundary. Times come from Redis's clock, so replicas need not agree on theirs.

A job slot is a member of its holder's sorted set (`slots_key`), scored by a lease deadline. The
script that creates a job takes it, and every step that ends a job frees it (shared/jobstore.py),
the lease when a process dies holding it, so a job holds a slot exactly while it exists and a
slot cannot leak. Those scripts name keys they were not given (the holder's set, read from the
job's slot record): fine on one Redis (arq does not support Cluster either).
"""

import hashlib
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from shared.keys import PREFIX

WINDOW_MS = 60_000

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
_CLOCK = _NOW + "local window = tonumber(ARGV[1])\n"

# Counts one request (member ARGV[2]) against every bucket in `buckets` (key -> cap) if all have room.
_HIT_FUNCTION = """
local function hit(buckets)
  local allowed, remaining, reset, limit = 1, math.huge, 0, 0
  for _, bucket in ipairs(buckets) do
    local key, cap = bucket[1], tonumber(bucket[2])
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
    for _, bucket in ipairs(buckets) do
      redis.call('ZADD', bucket[1], now, ARGV[2])
      redis.call('PEXPIRE', bucket[1], window)
    end
  end
  return {allowed, limit, remaining, reset}
end
"""

# The decision `hit` would take for one bucket, without counting a request.
_PEEK_FUNCTION = """
local function peek(key, cap)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if count < cap then return {1, cap, cap - count, window} end
  return {0, cap, 0, tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]) + window - now}
end
"""

# KEYS: buckets   ARGV: window, member, caps
_HIT = (
    _CLOCK
    + _HIT_FUNCTION
    + """
local buckets = {}
for i, key in ipairs(KEYS) do buckets[i] = {key, ARGV[i + 2]} end
return hit(buckets)
"""
)

# KEYS: bucket   ARGV: window, cap
_PEEK = _CLOCK + _PEEK_FUNCTION + "return peek(KEYS[1], tonumber(ARGV[2]))"

# A request's admission in one round trip: the address's failed authentications first (a
# throttled address gets nowhere), then who the caller is, then the count, and the values the
# request reads next (`reads`: they ride along rather than cost a round trip of their own).
# Who (ARGV[5]): KNOWN, a caller known without Redis; OPEN, anonymous only while no managed key
# exists nor existed (KEYS[4], the mark one leaves); or a presented key's digest, which a managed
# key's record in KEYS[2] must have (KEYS[3] is then the prefix of the bucket, which the key's id
# completes).
# KEYS: failed-authentication bucket, managed keys, bucket to count, protection mark, keys to read
# ARGV: window, member, the bucket's cap, the failed-authentication cap, who
# Returns {'throttled', decision...}, {'protected'} (OPEN, but a managed key exists or existed), {'unknown'}
# (no managed key has the digest) or {'counted', decision..., the managed key's record, values
# read...} (false: no record, no such key).
_ADMIT = (
    _CLOCK
    + _HIT_FUNCTION
    + _PEEK_FUNCTION
    + """
local throttled = peek(KEYS[1], tonumber(ARGV[4]))
if throttled[1] == 0 then return {'throttled', unpack(throttled)} end
local bucket, record = KEYS[3], false
if ARGV[5] == 'open' then
  if redis.call('EXISTS', KEYS[2], KEYS[4]) > 0 then return {'protected'} end
elseif ARGV[5] ~= 'known' then
  record = redis.call('HGET', KEYS[2], ARGV[5])
  if not record then return {'unknown'} end
  bucket = bucket .. cjson.decode(record).id
end
local counted = {'counted', unpack(hit({{bucket, ARGV[3]}}))}
counted[#counted + 1] = record
for i = 5, #KEYS do counted[#counted + 1] = redis.call('GET', KEYS[i]) end
return counted
"""
)
KNOWN = "known"
OPEN = "open"


class _Script:
    """A Lua script called by its SHA1, computed once (redis-py's `register_script` hashes the
    script again for every new script object); sent whole when Redis does not know it yet."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, redis: Redis, keys: list[str], args: list[str | int]) -> Any:
        values = [*keys, *map(str, args)]
        try:
            return await redis.evalsha(self._sha, len(keys), *values)  # type: ignore[misc]
        except NoScriptError:
            return await redis.eval(self._text, len(keys), *values)  # type: ignore[misc]


_HIT_SCRIPT = _Script(_HIT)
_ADMIT_SCRIPT = _Script(_ADMIT)


def rate_key(subject: str, endpoint_class: str) -> str:
    return f"{PREFIX}:ratelimit:{endpoint_class}:{subject}"


def slots_key(holder: str) -> str:
    return f"{PREFIX}:jobslots:{holder}"


def stored_key(holder: str) -> str:
    """The ledger of what a holder keeps in Redis beyond its running jobs: each answered job's
    stored Responses request and events (kept for `EVENT_TTL_S`), each session's history and
    Claude Code transcript (`SESSION_TTL_S` once idle). A sorted set of entries (a job's id,
    `session:<id>`), each scored by when what it counts expires (epoch ms), beside a hash of each
    entry's bytes and their `total` (`<ledger>:bytes`)."""
    return f"{PREFIX}:stored:{holder}"


def session_entry(session_id: str) -> str:
    """A session's entry in its holder's ledger."""
    return f"session:{session_id}"


# The ledger's steps (`stored_key`), for the scripts that keep, end or delete what is stored.
# Expired entries leave it as it is next counted or checked; the ledger expires with its last one.
STORED_FUNCTIONS = """
local function stored_purge(ledger, now)
  local gone = redis.call('zrangebyscore', ledger, '-inf', now, 'LIMIT', 0, 1000)
  if #gone == 0 then return end
  local freed = 0
  for _, size in ipairs(redis.call('hmget', ledger .. ':bytes', unpack(gone))) do
    freed = freed + (tonumber(size) or 0)
  end
  redis.call('zrem', ledger, unpack(gone))
  redis.call('hdel', ledger .. ':bytes', unpack(gone))
  redis.call('hincrby', ledger .. ':bytes', 'total', 0 - freed)  -- not -0: HINCRBY refuses it
end
-- Counts `bytes` more for the entry (`measured`: its bytes are all it keeps now, measured whole),
-- which expires at `expires` (ms): all it counts does then.
local function stored_count(ledger, entry, bytes, expires, now, measured)
  stored_purge(ledger, now)
  local counts = ledger .. ':bytes'
  if measured then bytes = bytes - (tonumber(redis.call('hget', counts, entry)) or 0) end
  redis.call('zadd', ledger, expires, entry)
  redis.call('hincrby', counts, entry, bytes)
  redis.call('hincrby', counts, 'total', bytes)
  local lives = tonumber(redis.call('zrange', ledger, -1, -1, 'WITHSCORES')[2]) - now
  redis.call('pexpire', ledger, lives)
  redis.call('pexpire', counts, lives)
end
local function stored_release(ledger, entry)
  local size = redis.call('hget', ledger .. ':bytes', entry)
  if not size then return end
  redis.call('zrem', ledger, entry)
  redis.call('hdel', ledger .. ':bytes', entry)
  redis.call('hincrby', ledger .. ':bytes', 'total', 0 - tonumber(size))
end
-- How long until `adding` more bytes fit within `limit` (ms, at least 1; the first entry's
-- expiry is the earliest anything leaves), or false if they fit now.
local function stored_wait(ledger, now, adding, limit)
  stored_purge(ledger, now)
  local total = tonumber(redis.call('hget', ledger .. ':bytes', 'total')) or 0
  if total + adding <= limit and (adding > 0 or total < limit) then return false end
  local first = redis.call('zrange', ledger, 0, 0, 'WITHSCORES')[2]
  return math.max(1, (tonumber(first) or now) - now)
end
"""


@dataclass(frozen=True)
class StoredLimit:
    """The ledger a job's stored bytes count in (`stored_key`) and its holder's limit."""

    ledger: str
    limit: int


class StorageLimit(Exception):
    """The holder keeps its limit of bytes in Redis already; `retry_after_ms` None: what was to be
    kept is over the whole limit, and never fits."""

    def __init__(self, limit: int, retry_after_ms: int | None) -> None:
        super().__init__(f"at most {limit} bytes kept")
        self.limit = limit
        self.retry_after_ms = retry_after_ms


# KEYS: the value's key, the ledger   ARGV: value, ttl s, job id, limit
# Returns the ms until it would fit (-1: never, it is over the limit), or false when it was kept
# (and counted for the job).
_KEEP = (
    _NOW
    + STORED_FUNCTIONS
    + """
if #ARGV[1] > tonumber(ARGV[4]) then return -1 end
local wait = stored_wait(KEYS[2], now, #ARGV[1], tonumber(ARGV[4]))
if wait then return wait end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
stored_count(KEYS[2], ARGV[3], #ARGV[1], now + ARGV[2] * 1000, now, false)
return false
"""
)
_KEEP_SCRIPT = _Script(_KEEP)

# KEYS: the ledger, keys to delete   ARGV: the entry
_DISCARD = (
    STORED_FUNCTIONS
    + """
if #KEYS > 1 then redis.call('del', unpack(KEYS, 2)) end
stored_release(KEYS[1], ARGV[1])
"""
)
_DISCARD_SCRIPT = _Script(_DISCARD)


async def keep(
    redis: Redis, key: str, value: str, ttl_s: int, *, job_id: str, stored: StoredLimit | None
) -> None:
    """Sets `key` to `value` for `ttl_s`, counted as `job_id`'s in the holder's ledger; raises
    `StorageLimit` (and sets nothing) if it does not fit within the holder's limit."""
    if stored is None:
        await redis.set(key, value, ex=ttl_s)
        return
    wait = await _KEEP_SCRIPT(redis, [key, stored.ledger], [value, ttl_s, job_id, stored.limit])
    if wait is not None:
        raise StorageLimit(stored.limit, None if wait == -1 else int(wait))


async def discard(redis: Redis, *keys: str, entry: str, ledger: str | None) -> None:
    """Deletes `keys` and the ledger's `entry`, which counted them (what `keep` kept: its job's)."""
    if ledger is None:
        await redis.delete(*keys)
    else:
        await _DISCARD_SCRIPT(redis, [ledger, *keys], [entry])


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_ms: int

    @classmethod
    def of(cls, reply: list[int]) -> "RateDecision":
        """A decision from the reply of `hit`'s or `peek`'s script."""
        allowed, limit, remaining, reset = reply
        return cls(bool(allowed), int(limit), max(0, int(remaining)), int(reset))

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.reset_ms / 1000))


async def hit(redis: Redis, buckets: dict[str, int]) -> RateDecision:
    """Counts one request against every bucket (key → limit per window) if all have room."""
    keys = list(buckets)
    # A fresh member per request: a client-chosen id (x-request-id) would let repeats collapse.
    return RateDecision.of(await _HIT_SCRIPT(redis, keys, [WINDOW_MS, uuid.uuid4().hex, *buckets.values()]))


@dataclass(frozen=True)
class Admission:
    """`admit`'s answer: the address is `throttled` (nothing was counted), or the request was
    `counted` (`decision` says whether it is within its limit, `record` is the managed key's,
    `values` are the keys it read)."""

    throttled: bool
    decision: RateDecision
    record: bytes | None = None
    values: list[bytes | None] = field(default_factory=list)


async def admit(
    redis: Redis,
    auth_bucket: dict[str, int],
    bucket: dict[str, int],
    managed_keys: tuple[str, str],
    *,
    caller: str,
    reads: Sequence[str] = (),
) -> Admission | None:
    """Checks the failed-authentication bucket (key → limit per window, counting nothing) and, if it
    has room, counts one request against `bucket` and reads the string keys `reads`, in one round
    trip. `managed_keys`: the hash of managed keys and the mark that one existed. `caller`:
    `KNOWN`; `OPEN` (anonymous only while no managed key exists nor existed); or the digest of
    the key presented, whose record in the hash (JSON with its `id`) names the bucket: `bucket`'s
    key is the prefix of it. None (nothing was counted): a managed key exists or existed for an
    `OPEN` caller, or none has the digest."""
    ((auth_key, auth_cap),) = auth_bucket.items()
    ((key, cap),) = bucket.items()
    args: list[str | int] = [WINDOW_MS, uuid.uuid4().hex, cap, auth_cap, caller]
    managed, mark = managed_keys
    reply = await _ADMIT_SCRIPT(redis, [auth_key, managed, key, mark, *reads], args)
    if reply[0] in (b"protected", b"unknown"):
        return None
    if reply[0] == b"throttled":
        return Admission(True, RateDecision.of(reply[1:]))
    return Admission(False, RateDecision.of(reply[1:5]), reply[5], list(reply[6:]))


def peek(pipe: Pipeline, bucket: dict[str, int]) -> None:
    """Queues on `pipe` whether one bucket (key → limit per window) has room, counting nothing;
    `RateDecision.of` reads its reply. (`EVAL`: a registered script would cost the pipeline a
    `SCRIPT EXISTS` round trip of its own.)"""
    ((key, cap),) = bucket.items()
    pipe.eval(_PEEK, 1, key, str(WINDOW_MS), str(cap))
