"""A Redis adapter for the SDK's `SessionStore`: Claude Code transcripts that any worker can resume.

The CLI writes its transcript to local disk; the SDK mirrors every entry to this store and, for
`resume=<id>`, materializes the transcript from it before the CLI starts. So a session written on
one worker continues on any other, and survives the worker that wrote it.

The key layout is `shared/transcripts.py`'s (the API deletes transcripts with their sessions).
Every append slides the TTL of all of a session's keys, so an idle session disappears whole.
Summaries (`list_session_summaries`) are not kept: the SDK then falls back to `list_sessions` plus
`load`. The append script computes key names inside Lua, so this adapter is for a single Redis
(or Valkey) server, not a cluster.
"""

import json
import time
from typing import Any
from urllib.parse import quote, unquote

from claude_agent_sdk import SessionKey, SessionStoreEntry, SessionStoreListEntry
from claude_agent_sdk.types import SessionListSubkeysKey
from redis.asyncio import Redis

from shared.keys import transcript_index_key
from shared.transcripts import delete_transcript, main_list, sub_list, subkeys_set

_MOST_SESSION_SUBPATHS = 256
"""Subagent transcripts one session keeps, over all its turns: every append slides each one's TTL.
Past them a new one is not kept (a turn may name 64: a session of forged turns had grown without
end, and its every append with it)."""

# KEYS: list, its uuid set, the session's subkeys set, the project index, the main list.
# ARGV: ttl_s, mtime_ms, session id, subpath ("" for main), then (uuid or "", entry json) pairs.
# Appends entries whose uuid is new (or absent), records the subpath, indexes main sessions, and
# slides the TTL of every key of the session, subagent lists included. A new subpath past the
# session's `MOST_SUBPATHS` is not kept (returns 0).
_APPEND = (
    f"local MOST_SUBPATHS = {_MOST_SESSION_SUBPATHS}\n"
    + """
local ttl = tonumber(ARGV[1])
local new_subpath = ARGV[4] ~= "" and redis.call("SISMEMBER", KEYS[3], ARGV[4]) == 0
if new_subpath and redis.call("SCARD", KEYS[3]) >= MOST_SUBPATHS then return 0 end
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
)


class RedisSessionStore:
    """`SessionStore` on Redis lists, with a sliding TTL (`ttl_s`) on every session.

    Duck-typed, as the SDK expects: it implements `append`, `load`, `list_sessions`, `delete` and
    `list_subkeys`, and leaves out `list_session_summaries`.
    """

    def __init__(self, redis: Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._append = redis.register_script(_APPEND)

    @staticmethod
    def _list(key: SessionKey) -> str:
        subpath = key.get("subpath")
        if subpath:
            return sub_list(key["project_key"], key["session_id"], subpath)
        return main_list(key["project_key"], key["session_id"])

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        if not entries:
            return
        project, session = key["project_key"], key["session_id"]
        subpath = quote(key.get("subpath", ""), safe="")
        args: list[Any] = [self._ttl_s, int(time.time() * 1000), session, subpath]
        for entry in entries:
            args += [entry.get("uuid") or "", json.dumps(entry, separators=(",", ":"))]
        target = self._list(key)
        keys = [target, f"{target}:uuids", subkeys_set(project, session), transcript_index_key(project)]
        await self._append(keys=[*keys, main_list(project, session)], args=args)

    async def exists(self, key: SessionKey) -> bool:
        """Whether a transcript is stored under `key`, without loading it (not part of the protocol)."""
        return bool(await self._redis.exists(self._list(key)))

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        raw = await self._redis.lrange(self._list(key), 0, -1)  # type: ignore[misc]
        if not raw:
            return None
        return [json.loads(item) for item in raw]

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        index = transcript_index_key(project_key)
        members: list[tuple[bytes, float]] = await self._redis.zrange(index, 0, -1, withscores=True)
        if not members:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for member, _ in members:
                pipe.exists(main_list(project_key, member.decode()))
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
        project, session = key["project_key"], key["session_id"]
        if subpath := key.get("subpath"):
            target = self._list(key)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(target, f"{target}:uuids")
                pipe.srem(subkeys_set(project, session), quote(subpath, safe=""))
                await pipe.execute()
            return
        await delete_transcript(self._redis, project, session)

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        encoded: set[bytes] = await self._redis.smembers(subkeys_set(key["project_key"], key["session_id"]))  # type: ignore[misc]
        return sorted(unquote(sub.decode()) for sub in encoded)


_ENTRY_CHARS = 100
"""What each entry counts beyond its JSON: held parsed until commit, an entry costs the worker
about that much memory more (an outside probe's 7.5 million `{}` entries, 30 MB as JSON, took
600 MB)."""


_MOST_SUBPATHS = 64
"""Transcripts one turn may add (its main one and its subagents'): far over what a turn's
subagents make, few enough that a session's lists stay cheap to keep alive together."""


class TranscriptTooLarge(Exception):
    def __init__(self, max_chars: int, subpaths: int) -> None:
        if subpaths > _MOST_SUBPATHS:
            super().__init__(f"the turn's transcript named over {_MOST_SUBPATHS} subagent transcripts")
        else:
            super().__init__(
                f"the turn's transcript passed TURN_TRANSCRIPT_MAX_CHARS ({max_chars:,} characters)"
            )


class JobTranscript:
    """One job's view of its session's transcript: pinned to the session, written only on success.

    The SDK keys transcripts by a project derived from the CLI's working directory, which is a
    fresh workspace per job; the view pins every key to the session owner's project instead, so
    the next job finds it whatever its directory. Only the session's own transcript is kept: the
    job's tools can write frames to the CLI's output naming any other (an outside probe stored a
    gigabyte under made-up session ids, counted in no ledger). Appends are held until the turn commits
    (`seal`, then `write`: a job that fails or is cancelled adds nothing), and dropped after the
    seal: what the CLI mirrors while it shuts down (prompt and cost bookkeeping) could otherwise
    land after the next job took the session.
    """

    def __init__(self, store: RedisSessionStore, project: str, session_id: str, *, max_chars: int) -> None:
        """`max_chars`: the most characters of entries (as JSON, and `_ENTRY_CHARS` each) one turn
        may add: the CLI mirrors whatever frames reach its stdout, where the job's tools can write
        (an outside probe put 200 MB in one session's transcript); past it, `seal` fails the turn."""
        self._store = store
        self._project = project
        self.session_id = session_id
        self._pending: list[tuple[SessionKey, list[SessionStoreEntry]]] = []
        self._sealed = False
        self._room = self._max_chars = max_chars
        self._subpaths: set[str] = set()

    def _pinned(self, key: SessionKey) -> SessionKey:
        pinned: SessionKey = {"project_key": self._project, "session_id": key["session_id"]}
        if "subpath" in key:
            pinned["subpath"] = key["subpath"]
        return pinned

    async def exists(self) -> bool:
        return await self._store.exists({"project_key": self._project, "session_id": self.session_id})

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        if self._sealed or self._room < 0 or key["session_id"] != self.session_id:
            return
        # A subagent's transcript is a list of its own, named by its path (quoted: up to 3 times
        # as long), and each append touches every list of the session: both are bounded too (a
        # re-check probe stored 147 MB in key names, and 8,000 subpaths held Redis for minutes).
        subpath = key.get("subpath", "")
        self._subpaths.add(subpath)
        self._room -= len(json.dumps(entries)) + _ENTRY_CHARS * len(entries) + 3 * len(subpath)
        if len(self._subpaths) > _MOST_SUBPATHS:
            self._room = -1
        if self._room >= 0:
            self._pending.append((self._pinned(key), entries))
        else:
            self._pending = []  # the turn fails at `seal`: nothing is held for it

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        if key["session_id"] != self.session_id:
            return None
        return await self._store.load(self._pinned(key))

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        if key["session_id"] != self.session_id:
            return []
        return await self._store.list_subkeys({"project_key": self._project, "session_id": self.session_id})

    def seal(self) -> None:
        """Ends the turn's entries at the CLI's result (`TranscriptTooLarge` if they passed the
        limit: nothing will be added); `write` adds them once the turn commits."""
        self._sealed = True
        if self._room < 0:
            self._pending = []
            raise TranscriptTooLarge(self._max_chars, len(self._subpaths))

    async def write(self) -> None:
        """Adds the sealed turn's entries to the session's transcript: only as the turn commits,
        after its files are saved (a turn refused then, over the workspace limit, had left its
        entries there, and the next turns resumed a turn the session never had: an outside probe)."""
        pending, self._pending = self._pending, []
        for key, entries in pending:
            await self._store.append(key, entries)

    async def drop(self) -> None:
        """For a turn cut before its end (a token limit, a refusal): the stored transcript lacks
        it and would resume without it, so it is removed, and the next turn starts a new one
        with the session's history (this turn as the client received it) as context."""
        self._sealed = True
        self._pending = []
        await self._store.delete({"project_key": self._project, "session_id": self.session_id})
