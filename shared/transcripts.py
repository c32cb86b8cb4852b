"""Where the SDK session store keeps Claude Code transcripts, for both processes.

The worker's `RedisSessionStore` writes them; the API deletes them with their session. For
transcript `s` of project `p` (`transcript_key(p, s)` is `<t>`):

    <t>:main                     list  transcript entries (JSON), in append order
    <t>:sub:<subpath>            list  a subagent transcript (subpath percent-encoded)
    <list>:uuids                 set   entry uuids already stored (idempotent appends)
    <t>:subkeys                  set   the transcript's encoded subpaths
    transcript_index_key(p)      zset  transcript id -> last write (epoch ms)
"""

from urllib.parse import quote

from redis.asyncio import Redis

from shared.keys import transcript_index_key, transcript_key


def main_list(project: str, session: str) -> str:
    return f"{transcript_key(project, session)}:main"


def sub_list(project: str, session: str, subpath: str) -> str:
    return f"{transcript_key(project, session)}:sub:{quote(subpath, safe='')}"


def subkeys_set(project: str, session: str) -> str:
    return f"{transcript_key(project, session)}:subkeys"


# Lua: every key of the transcript whose base key (`transcript_key`) is `base`.
TRANSCRIPT_KEYS = """
local function transcript_keys(base)
  local keys = {base .. ":main", base .. ":main:uuids", base .. ":subkeys"}
  for _, sub in ipairs(redis.call("SMEMBERS", base .. ":subkeys")) do
    table.insert(keys, base .. ":sub:" .. sub)
    table.insert(keys, base .. ":sub:" .. sub .. ":uuids")
  end
  return keys
end
"""

# KEYS: the transcript's base key. ARGV: seconds. Each of its keys lives at least that long.
_KEEP = (
    TRANSCRIPT_KEYS
    + """
for _, key in ipairs(transcript_keys(KEYS[1])) do redis.call("EXPIRE", key, ARGV[1], "GT") end
return 1
"""
)


async def keep_transcript(redis: Redis, project: str, session: str, ttl_s: int) -> None:
    """Makes the transcript live at least `ttl_s` more, as its session is kept. Only its appends
    slid its TTL: under a turn longer than it, or past uploads, it expired while the session
    lived, and the next turns resumed without the earlier ones (an outside probe)."""
    await redis.eval(_KEEP, 1, transcript_key(project, session), str(ttl_s))  # type: ignore[misc]


async def delete_transcript(redis: Redis, project: str, session: str) -> None:
    """Removes a transcript with every subagent transcript under it."""
    base = transcript_key(project, session)
    encoded: set[bytes] = await redis.smembers(subkeys_set(project, session))  # type: ignore[misc]
    keys = [f"{base}:main", f"{base}:main:uuids", f"{base}:subkeys"]
    for sub in encoded:
        keys += [f"{base}:sub:{sub.decode()}", f"{base}:sub:{sub.decode()}:uuids"]
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(*keys)
        pipe.zrem(transcript_index_key(project), session)
        await pipe.execute()
