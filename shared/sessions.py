"""Sessions: conversations kept in Redis, so any worker continues them and any API lists them.

A session belongs to the API key that created it: its `owner` is a digest of the key id, so a key
id never appears in a Redis key, and another key's session is simply not found. Its record and
history slide their TTL whenever a request uses them.

Exactly one job extends a session at a time. The API takes the session's lock for the job before
it enqueues it (a second request meanwhile gets 409); the worker, before it emits the job's
terminal event, either commits the job's turns and releases the lock in one atomic step, or
(on any failure or cancellation) only releases it. A failed job therefore leaves the session as
it was, and a client that sends its next turn right after a reply never finds the lock held.
"""

import hashlib
import json
import math
import time
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis

from shared import quotas
from shared.jobs import CompletionJob, SessionRef, Turn
from shared.keys import (
    record_key,
    session_history_key,
    session_key,
    session_lock_key,
    sessions_index_key,
    transcript_key,
)
from shared.quotas import STORED_FUNCTIONS
from shared.transcripts import TRANSCRIPT_KEYS, delete_transcript, keep_transcript
from shared.workspaces import Manifest, check_key_limit

# Counts what a session keeps in Redis, its history and its Claude Code transcript, as they are
# now, as its `entry` in the ledger of what its key keeps (shared/quotas.py), until `expires` (ms).
# Uncounted, one key's sessions of 3 MB turns filled Redis for every key (an outside probe).
_COUNT_SESSION = (
    STORED_FUNCTIONS
    + TRANSCRIPT_KEYS
    + """
local function count_session(ledger, entry, record, history, transcript, now, expires)
  if not ledger or ledger == "" then return end
  local keys = transcript_keys(transcript)
  table.insert(keys, history)
  table.insert(keys, record)  -- its tool configuration (up to 20 KiB) too (an outside probe)
  local bytes = 0
  for _, key in ipairs(keys) do bytes = bytes + (redis.call("MEMORY", "USAGE", key, "SAMPLES", "0") or 0) end
  stored_count(ledger, entry, bytes, expires, now, true)
end
"""
)

# KEYS: lock, record, history, index, the job's record, the transcript's base key.
# ARGV: job id, expected history length, now (ms), ttl (s), transcript id, session id, workspace
# version ('': unchanged), worker holding it, the version's bytes, the session's ledger entry,
# then the turns to append as JSON. The workspace version advances with the turns, in this one
# step; the session is counted in the ledger its job's key has (the job's record names it).
_COMMIT = (
    _COUNT_SESSION
    + """
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return 0 end
redis.call("DEL", KEYS[1])
if redis.call("LLEN", KEYS[3]) ~= tonumber(ARGV[2]) then return -1 end
for i = 11, #ARGV do redis.call("RPUSH", KEYS[3], ARGV[i]) end
redis.call("HSETNX", KEYS[2], "created", ARGV[3])
redis.call("HSET", KEYS[2], "last_used", ARGV[3], "turns", redis.call("LLEN", KEYS[3]), "transcript", ARGV[5])
if ARGV[7] ~= "" then redis.call("HSET", KEYS[2], "workspace", ARGV[7], "workspace_bytes", ARGV[9]) end
if ARGV[8] ~= "" then redis.call("HSET", KEYS[2], "holder", ARGV[8]) end
redis.call("EXPIRE", KEYS[2], ARGV[4])
redis.call("EXPIRE", KEYS[3], ARGV[4])
redis.call("ZADD", KEYS[4], tonumber(ARGV[3]) + 1000 * tonumber(ARGV[4]), ARGV[6])
redis.call("ZREMRANGEBYSCORE", KEYS[4], "-inf", ARGV[3])
redis.call("EXPIRE", KEYS[4], ARGV[4])
local now, ledger = tonumber(ARGV[3]), redis.call("HGET", KEYS[5], "ledger")
count_session(ledger, ARGV[10], KEYS[2], KEYS[3], KEYS[6], now, now + 1000 * ARGV[4])
return 1
"""
)

# KEYS: lock, record, history, index, the transcript's base key. ARGV: lock holder, now (ms), ttl
# (s), transcript id (for a new session), session id, workspace version, its bytes, the ledger
# ('': none), the session's entry. A new workspace version outside a turn (an upload or a deleted
# file): the session is created if it does not exist yet, with no turns.
_SET_WORKSPACE = (
    _COUNT_SESSION
    + """
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return 0 end
redis.call("DEL", KEYS[1])
if redis.call("HSETNX", KEYS[2], "created", ARGV[2]) == 1 then
  redis.call("HSET", KEYS[2], "turns", 0, "transcript", ARGV[4])
end
redis.call("HSET", KEYS[2], "last_used", ARGV[2], "workspace", ARGV[6], "workspace_bytes", ARGV[7])
redis.call("EXPIRE", KEYS[2], ARGV[3])
if redis.call("EXISTS", KEYS[3]) == 1 then redis.call("EXPIRE", KEYS[3], ARGV[3]) end
redis.call("ZADD", KEYS[4], tonumber(ARGV[2]) + 1000 * tonumber(ARGV[3]), ARGV[5])
redis.call("EXPIRE", KEYS[4], ARGV[3])
local now = tonumber(ARGV[2])
count_session(ARGV[8], ARGV[9], KEYS[2], KEYS[3], KEYS[5], now, now + 1000 * ARGV[3])
return 1
"""
)

# KEYS: index. ARGV: now (ms), the owner's record prefix, a session id. The bytes of the workspaces
# of the owner's live sessions but that one.
_WORKSPACE_BYTES_ELSEWHERE = """
local total = 0
for _, id in ipairs(redis.call("ZRANGEBYSCORE", KEYS[1], ARGV[1], "+inf")) do
  if id ~= ARGV[3] then
    total = total + (tonumber(redis.call("HGET", ARGV[2] .. id, "workspace_bytes")) or 0)
  end
end
return total
"""

# Lua: `restart_clock(clock)`, for a turn that held the session and ends without a commit (it
# failed, was cancelled or refused): the session was last used now, and it, its history and
# transcript expire `SESSION_TTL_S` from now, as a commit has them (`open_for_job` kept them for
# the turn's longest; an outside probe's failed turns kept sessions 1.5 hours past their TTL, with
# an `expires_at` long past). `clock`: `clock()`'s JSON, or false.
RESTART_CLOCK = (
    TRANSCRIPT_KEYS
    + """
local function restart_clock(clock)
  if not clock or clock == "" then return end
  local c = cjson.decode(clock)
  if redis.call("EXISTS", c.record) == 0 then return end
  local t = redis.call("TIME")
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call("HSET", c.record, "last_used", now)
  redis.call("EXPIRE", c.record, c.ttl)
  redis.call("EXPIRE", c.history, c.ttl)
  redis.call("ZADD", c.index, "XX", now + 1000 * c.ttl, c.id)
  for _, key in ipairs(transcript_keys(c.transcript)) do redis.call("EXPIRE", key, c.ttl) end
  if c.ledger ~= "" then redis.call("ZADD", c.ledger, "XX", now + 1000 * c.ttl, c.entry) end
end
"""
)

# KEYS: lock. ARGV: its holder, the session's clock ('': none). Releases the lock only if the
# holder still holds it, and restarts the session's clock.
_RELEASE = (
    RESTART_CLOCK
    + """
if redis.call("GET", KEYS[1]) ~= ARGV[1] then return 0 end
redis.call("DEL", KEYS[1])
restart_clock(ARGV[2])
return 1
"""
)


class SessionLost(Exception):
    """The job no longer holds its session (deleted, expired, or its lock timed out)."""


def owner_of(key_id: str) -> str:
    return hashlib.sha256(key_id.encode()).hexdigest()[:32]


def _ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Session:
    id: str
    created_ms: int
    last_used_ms: int
    expires_ms: int
    turns: int
    transcript_id: str
    has_tool_config: bool = False
    """Whether the session has its own tool configuration (`shared/tool_config.py`)."""
    workspace: str | None = None
    """The version of the session's workspace (None: empty so far)."""
    holder: str | None = None
    """The worker that last ran a turn of it, and so likely still holds its workspace."""


def _session(session_id: str, record: dict[bytes, bytes], ttl_s: int) -> Session:
    last_used = int(record[b"last_used"])
    workspace, holder = record.get(b"workspace"), record.get(b"holder")
    return Session(
        id=session_id,
        created_ms=int(record[b"created"]),
        last_used_ms=last_used,
        expires_ms=last_used + ttl_s * 1000,
        turns=int(record[b"turns"]),
        transcript_id=record[b"transcript"].decode(),
        has_tool_config=b"tools" in record,
        workspace=workspace.decode() if workspace else None,
        holder=holder.decode() if holder else None,
    )


async def lock(redis: Redis, owner: str, session_id: str, job_id: str, hold_s: float) -> bool:
    """Takes the session for `job_id`; False if another job holds it. `hold_s` bounds a lost holder."""
    key = session_lock_key(owner, session_id)
    return bool(await redis.set(key, job_id, nx=True, px=int(hold_s * 1000)))


async def release(redis: Redis, owner: str, session_id: str, holder: str, clock: str = "") -> None:
    """Frees the session if `holder` holds it; with a `clock`, a turn's, the session's restarts."""
    await redis.eval(_RELEASE, 1, session_lock_key(owner, session_id), holder, clock)  # type: ignore[misc]


def clock(owner: str, session_id: str, transcript_id: str, ttl_s: int, ledger: str | None) -> str:
    """What a turn's end restarts of the session it held (`RESTART_CLOCK`): its keys, its TTL,
    the `ledger` it counts in, and the turn's lock."""
    return json.dumps(
        {
            "lock": session_lock_key(owner, session_id),
            "record": session_key(owner, session_id),
            "history": session_history_key(owner, session_id),
            "index": sessions_index_key(owner),
            "id": session_id,
            "transcript": transcript_key(owner, transcript_id),
            "ttl": ttl_s,
            "ledger": ledger or "",
            "entry": quotas.session_entry(session_id),
        }
    )


async def open_for_job(
    redis: Redis, owner: str, session_id: str, ttl_s: int, *, head: int, turn_s: float, ledger: str | None
) -> tuple[Session | None, int, list[Turn]]:
    """The session (None if it does not exist), its length in turns, and its first `head` turns.

    Slides the session's TTL, its transcript's too, past the longest its turn may take (`turn_s`,
    queued and running): it expires once idle, never under a running turn (found by outside
    probes: a turn longer than the TTL lost the session's history and files, then its transcript).
    The turn's commit sets it back to the TTL. Its count in its key's `ledger` is kept as long.
    Only the head is read: all a request needs to be compared with.
    """
    record_key, history_key = session_key(owner, session_id), session_history_key(owner, session_id)
    kept_s = ttl_s + math.ceil(turn_s)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(record_key)
        pipe.llen(history_key)
        pipe.lrange(history_key, 0, head - 1)
        pipe.expire(record_key, kept_s)
        pipe.expire(history_key, kept_s)
        pipe.zadd(sessions_index_key(owner), {session_id: _ms() + kept_s * 1000}, xx=True)
        pipe.expire(sessions_index_key(owner), kept_s)  # no member expires later than now + kept_s
        if ledger is not None:
            pipe.zadd(ledger, {quotas.session_entry(session_id): _ms() + kept_s * 1000}, xx=True, gt=True)
            for key in (ledger, f"{ledger}:bytes"):
                pipe.expire(key, kept_s, gt=True)
        record, length, first, *_ = await pipe.execute()
    if not record:
        return None, 0, []
    session = _session(session_id, record, ttl_s)
    await keep_transcript(redis, owner, session.transcript_id, kept_s)
    return session, length, [Turn.model_validate_json(raw) for raw in first]


async def history(redis: Redis, ref: SessionRef) -> list[Turn]:
    """The turns a session held when `ref`'s job took it (for backends that need them all)."""
    if ref.history_len == 0:
        return []  # LRANGE 0 -1 would be the whole list
    raw = await redis.lrange(session_history_key(ref.owner, ref.id), 0, ref.history_len - 1)  # type: ignore[misc]
    return [Turn.model_validate_json(item) for item in raw]


def new_transcript_id() -> str:
    return str(uuid.uuid4())


async def commit(
    redis: Redis,
    job: CompletionJob,
    reply: str,
    ttl_s: int,
    *,
    workspace: Manifest | None = None,
    holder: str | None = None,
) -> None:
    """Appends the job's new turns and the reply to its session and releases the session; with
    `workspace`, the session's files advance to that saved version in the same step.

    Raises `SessionLost` (having changed nothing) if the job no longer holds the session.
    """
    ref: SessionRef = _ref(job)
    turns = [*job.turns, Turn(role="assistant", text=reply)]
    keys = [
        session_lock_key(ref.owner, ref.id),
        session_key(ref.owner, ref.id),
        session_history_key(ref.owner, ref.id),
        sessions_index_key(ref.owner),
        record_key(job.id),
        transcript_key(ref.owner, ref.transcript_id),
    ]
    args = [job.id, str(ref.history_len), str(_ms()), str(ttl_s), ref.transcript_id, ref.id]
    version, size = ("", 0) if workspace is None else (workspace.version or "", workspace.total_bytes)
    args += [version, holder or "", str(size), quotas.session_entry(ref.id)]
    args += [turn.model_dump_json() for turn in turns]
    if await redis.eval(_COMMIT, len(keys), *keys, *args) != 1:  # type: ignore[misc]
        raise SessionLost(ref.id)


async def set_workspace(
    redis: Redis,
    owner: str,
    session_id: str,
    holder: str,
    transcript_id: str,
    workspace: Manifest,
    ttl_s: int,
    ledger: str | None,
) -> None:
    """Makes `workspace`, a saved version, the session's and releases the session `holder` locked;
    the session counts in its key's `ledger`.

    Raises `SessionLost` (having changed nothing) if `holder` no longer holds the session.
    """
    keys = [
        session_lock_key(owner, session_id),
        session_key(owner, session_id),
        session_history_key(owner, session_id),
        sessions_index_key(owner),
        transcript_key(owner, transcript_id),
    ]
    assert workspace.version is not None
    args = [holder, str(_ms()), str(ttl_s), transcript_id, session_id, workspace.version]
    args += [str(workspace.total_bytes), ledger or "", quotas.session_entry(session_id)]
    if await redis.eval(_SET_WORKSPACE, len(keys), *keys, *args) != 1:  # type: ignore[misc]
        raise SessionLost(session_id)
    await keep_transcript(redis, owner, transcript_id, ttl_s)  # kept as its session is


async def check_key_share(
    redis: Redis, owner: str, session_id: str, workspace: Manifest, before: Manifest, max_bytes_per_key: int
) -> None:
    """Raises `WorkspaceTooLarge` if `workspace`, the session's next version after `before`, grows
    the workspaces of the owner's live sessions past `max_bytes_per_key` together."""
    if workspace.total_bytes <= before.total_bytes:
        return
    prefix = session_key(owner, session_id).removesuffix(session_id)
    args = [str(_ms()), prefix, session_id]
    elsewhere = int(await redis.eval(_WORKSPACE_BYTES_ELSEWHERE, 1, sessions_index_key(owner), *args))  # type: ignore[misc]
    check_key_limit(workspace.total_bytes, elsewhere, max_bytes_per_key)


def _ref(job: CompletionJob) -> SessionRef:
    if job.session is None:
        raise ValueError("the job continues no session")
    return job.session


async def list_sessions(redis: Redis, owner: str, ttl_s: int) -> list[Session]:
    """The owner's live sessions, most recently used first."""
    ids: list[bytes] = await redis.zrangebyscore(sessions_index_key(owner), _ms(), "+inf")
    async with redis.pipeline(transaction=False) as pipe:
        for raw in ids:
            pipe.hgetall(session_key(owner, raw.decode()))
        records = await pipe.execute()
    found = [
        _session(raw.decode(), record, ttl_s) for raw, record in zip(ids, records, strict=True) if record
    ]
    return sorted(found, key=lambda s: s.last_used_ms, reverse=True)


async def get(redis: Redis, owner: str, session_id: str, ttl_s: int) -> tuple[Session, list[Turn]] | None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(session_key(owner, session_id))
        pipe.lrange(session_history_key(owner, session_id), 0, -1)
        record, history = await pipe.execute()
    if not record:
        return None
    return _session(session_id, record, ttl_s), [Turn.model_validate_json(raw) for raw in history]


async def is_busy(redis: Redis, owner: str, session_id: str) -> bool:
    return bool(await redis.exists(session_lock_key(owner, session_id)))


async def delete(redis: Redis, owner: str, session: Session, ledger: str | None) -> None:
    """Removes the session, its history and its Claude Code transcript, and its count in its
    key's `ledger`."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(session_key(owner, session.id), session_history_key(owner, session.id))
        pipe.zrem(sessions_index_key(owner), session.id)
        await pipe.execute()
    await delete_transcript(redis, owner, session.transcript_id)
    if ledger is not None:
        await quotas.discard(redis, entry=quotas.session_entry(session.id), ledger=ledger)
