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

from shared.keys import TOOL_CONFIG_GLOBAL, session_key

_FIELD = "tools"

# KEYS: the session record. ARGV: the config as JSON. Only an existing session gets a config.
_SET_IF_SESSION = """
if redis.call("EXISTS", KEYS[1]) == 0 then return 0 end
redis.call("HSET", KEYS[1], "tools", ARGV[1])
return 1
"""


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


async def set_session_config(redis: Redis, owner: str, session_id: str, config: ToolConfig) -> bool:
    """Stores the session's configuration; False (nothing stored) if the owner has no such session."""
    key = session_key(owner, session_id)
    return bool(await redis.eval(_SET_IF_SESSION, 1, key, config.model_dump_json()))  # type: ignore[misc]


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
