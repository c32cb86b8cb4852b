"""Tool configuration kept in Redis: the operator's global defaults and a caller's per-session ones.

Both are defaults for jobs that do not choose their tools themselves, never more than the
operator's policy (`CLAUDE_TOOLS`) grants; the API checks them when they are set and when a job
uses them (`api/core/policy.py`). The global one is one JSON value; a session's lives in the
session's own record (`tools` field), so it expires and is deleted with the session and belongs
to the session's key like everything else in it.
"""

import time
from dataclasses import dataclass

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.keys import TOOL_CONFIG_GLOBAL, session_key
from shared.quotas import STORED_FUNCTIONS, StorageLimit, StoredLimit, session_entry

_FIELD = "tools"

# KEYS: the session record. ARGV: the config as JSON, the ledger the session counts in ('':
# none), the session's entry, the ledger's limit. Only an existing session gets a config, counted
# with the session in its key's ledger (uncounted, a probe's 100 sessions held 2.6 MB per key).
_SET_IF_SESSION = (
    STORED_FUNCTIONS
    + """
if redis.call("EXISTS", KEYS[1]) == 0 then return 0 end
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ledger = ARGV[2] ~= "" and ARGV[2]
local wait = ledger and stored_wait(ledger, now, #ARGV[1], tonumber(ARGV[4]))
if wait then return redis.error_reply("STORAGE_LIMIT " .. wait) end
local before = redis.call("MEMORY", "USAGE", KEYS[1], "SAMPLES", "0") or 0
redis.call("HSET", KEYS[1], "tools", ARGV[1])
if ledger then
  local grown = (redis.call("MEMORY", "USAGE", KEYS[1], "SAMPLES", "0") or 0) - before
  stored_count(ledger, ARGV[3], grown, now + redis.call("PTTL", KEYS[1]), now, false)
end
return 1
"""
)


class ToolConfig(BaseModel):
    allowed_tools: list[str] | None = None
    """The tools a job has unless it names its own; None: every tool the policy permits."""
    disallowed_tools: list[str] | None = None
    """Tools (or rules) denied to every job this applies to, on top of the operator's."""
    created_at: int
    updated_at: int


def updated(config: ToolConfig | None, changes: dict[str, list[str] | None]) -> ToolConfig:
    """`config` with the fields in `changes` replaced (a new config if there was none)."""
    now = int(time.time())
    if config is None:
        return ToolConfig(**changes, created_at=now, updated_at=now)
    return config.model_copy(update={**changes, "updated_at": now})


async def global_config(redis: Redis) -> ToolConfig | None:
    raw = await redis.get(TOOL_CONFIG_GLOBAL)
    return None if raw is None else ToolConfig.model_validate_json(raw)


async def set_global_config(redis: Redis, config: ToolConfig) -> None:
    await redis.set(TOOL_CONFIG_GLOBAL, config.model_dump_json())


async def session_config(redis: Redis, owner: str, session_id: str) -> tuple[bool, ToolConfig | None]:
    """Whether the owner has this session, and its tool configuration if it has one."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.exists(session_key(owner, session_id))
        pipe.hget(session_key(owner, session_id), _FIELD)
        exists, raw = await pipe.execute()
    return bool(exists), None if raw is None else ToolConfig.model_validate_json(raw)


async def set_session_config(
    redis: Redis, owner: str, session_id: str, config: ToolConfig, stored: StoredLimit | None
) -> bool:
    """Stores the session's configuration, counted with the session in the `stored` ledger; False
    (nothing stored) if the owner has no such session. Raises `StorageLimit` (nothing stored) if
    the ledger is at its limit."""
    key = session_key(owner, session_id)
    ledger, limit = ("", 0) if stored is None else (stored.ledger, stored.limit)
    args = [config.model_dump_json(), ledger, session_entry(session_id), str(limit)]
    try:
        return bool(await redis.eval(_SET_IF_SESSION, 1, key, *args))  # type: ignore[misc]
    except ResponseError as exc:
        refusal, _, wait_ms = str(exc).partition(" ")
        if refusal == "STORAGE_LIMIT" and stored is not None:
            raise StorageLimit(stored.limit, int(wait_ms)) from None
        raise


@dataclass(frozen=True)
class StoredGlobal:
    """The global configuration's stored JSON (None: there is none), read by a round trip the
    request made anyway (its admission, `api/access.py`)."""

    raw: bytes | None


async def configs(
    redis: Redis, owner: str, session_id: str | None, stored_global: StoredGlobal | None = None
) -> list[ToolConfig]:
    """The configurations a job of this owner applies, global first: one round trip, or none
    when the global one was read already and the job continues no session."""
    if stored_global is not None and session_id is None:
        found = [stored_global.raw]
    else:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(TOOL_CONFIG_GLOBAL)
            if session_id is not None:
                pipe.hget(session_key(owner, session_id), _FIELD)
            found = await pipe.execute()
    return [ToolConfig.model_validate_json(raw) for raw in found if raw is not None]
