"""A Redis adapter for the SDK's `SessionStore`: Claude Code transcripts that any worker can resume.

The CLI writes its transcript to local disk; the SDK mirrors every entry to this store and, for
`resume=<id>`, materializes the transcript from it before the CLI starts. So a session written on
one worker continues on any other, and survives the worker that wrote it.

Layout, for project `p` and session `s` (each component percent-encoded, so no `:` or `/` inside
an id can reach another key):

    gateway:sdk:<p>:sessions                 sorted set  session id -> mtime (epoch ms)
    gateway:sdk:<p>:<s>:main                 list        transcript entries (JSON), in append order
    gateway:sdk:<p>:<s>:sub:<subpath>        list        a subagent transcript
    <list>:uuids                             set         entry uuids already stored (idempotency)
    gateway:sdk:<p>:<s>:subkeys              set         the session's subpaths

Every append slides the TTL of all of a session's keys, so an idle session disappears whole.
Summaries (`list_session_summaries`) are not kept: the SDK then falls back to `list_sessions` plus
`load`. The append script computes key names inside Lua, so this adapter is for a single Redis
(or Valkey) server, not a cluster.
"""

import json
import time
from typing import Any
from urllib.parse import quote, unquote

from claude_agent_sdk import SessionKey, SessionStore, SessionStoreEntry, SessionStoreListEntry
from claude_agent_sdk.types import SessionListSubkeysKey
from redis.asyncio import Redis

_PREFIX = "gateway:sdk"

# KEYS: list, its uuid set, the session's subkeys set, the project index, the main list.
# ARGV: ttl_s, mtime_ms, session id, subpath ("" for main), then (uuid or "", entry json) pairs.
# Appends entries whose uuid is new (or absent), records the subpath, indexes main sessions, and
# slides the TTL of every key of the session, subagent lists included.
_APPEND = """
local ttl = tonumber(ARGV[1])
for i = 5, #ARGV, 2 do
  if ARGV[i] == "" or redis.call("SADD", KEYS[2], ARGV[i]) == 1 then
    redis.call("RPUSH", KEYS[1], ARGV[i + 1])
  end
end
if ARGV[4] ~= "" then
  redis.call("SADD", KEYS[3], ARGV[4])
else
  redis.call("ZADD", KEYS[4], ARGV[2], ARGV[3])
end
local touched = {KEYS[5], KEYS[5] .. ":uuids", KEYS[3], KEYS[4], KEYS[1], KEYS[2]}
for _, subpath in ipairs(redis.call("SMEMBERS", KEYS[3])) do
  local sub = string.sub(KEYS[5], 1, -5) .. "sub:" .. subpath
  table.insert(touched, sub)
  table.insert(touched, sub .. ":uuids")
end
for _, key in ipairs(touched) do
  redis.call("EXPIRE", key, ttl)
end
return 1
"""


def _q(part: str) -> str:
    return quote(part, safe="")


class RedisSessionStore(SessionStore):
    """`SessionStore` on Redis lists, with a sliding TTL (`ttl_s`) on every session."""

    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._append = redis.register_script(_APPEND)

    @staticmethod
    def _session(project_key: str, session_id: str) -> str:
        return f"{_PREFIX}:{_q(project_key)}:{_q(session_id)}"

    @staticmethod
    def _index(project_key: str) -> str:
        return f"{_PREFIX}:{_q(project_key)}:sessions"

    def _list(self, key: SessionKey) -> str:
        session = self._session(key["project_key"], key["session_id"])
        subpath = key.get("subpath")
        return f"{session}:sub:{_q(subpath)}" if subpath else f"{session}:main"

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        if not entries:
            return
        session = self._session(key["project_key"], key["session_id"])
        target = self._list(key)
        args: list[Any] = [
            self._ttl_s,
            int(time.time() * 1000),
            key["session_id"],
            _q(key.get("subpath", "")),
        ]
        for entry in entries:
            args += [entry.get("uuid") or "", json.dumps(entry, separators=(",", ":"))]
        keys = [target, f"{target}:uuids", f"{session}:subkeys", self._index(key["project_key"])]
        await self._append(keys=[*keys, f"{session}:main"], args=args)

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        raw = await self._redis.lrange(self._list(key), 0, -1)  # type: ignore[misc]
        if not raw:
            return None
        return [json.loads(item) for item in raw]

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        index = self._index(project_key)
        members: list[tuple[bytes, float]] = await self._redis.zrange(index, 0, -1, withscores=True)
        if not members:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for member, _ in members:
                pipe.exists(f"{self._session(project_key, member.decode())}:main")
            alive = await pipe.execute()
        gone = [member for (member, _), exists in zip(members, alive, strict=True) if not exists]
        if gone:  # expired by TTL: the index entry outlived them
            await self._redis.zrem(index, *gone)
        return [
            {"session_id": member.decode(), "mtime": int(mtime)}
            for (member, mtime), exists in zip(members, alive, strict=True)
            if exists
        ]

    async def delete(self, key: SessionKey) -> None:
        session = self._session(key["project_key"], key["session_id"])
        if subpath := key.get("subpath"):
            target = self._list(key)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(target, f"{target}:uuids")
                pipe.srem(f"{session}:subkeys", _q(subpath))
                await pipe.execute()
            return
        subpaths: set[bytes] = await self._redis.smembers(f"{session}:subkeys")  # type: ignore[misc]
        keys = [f"{session}:main", f"{session}:main:uuids", f"{session}:subkeys"]
        for sub in subpaths:
            keys += [f"{session}:sub:{sub.decode()}", f"{session}:sub:{sub.decode()}:uuids"]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(*keys)
            pipe.zrem(self._index(key["project_key"]), key["session_id"])
            await pipe.execute()

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        session = self._session(key["project_key"], key["session_id"])
        subpaths: set[bytes] = await self._redis.smembers(f"{session}:subkeys")  # type: ignore[misc]
        return sorted(unquote(sub.decode()) for sub in subpaths)
