"""The Redis `SessionStore` adapter against the SDK's own conformance harness, on a real Redis."""

import asyncio
from collections.abc import AsyncIterator

import pytest
from claude_agent_sdk import SessionKey
from claude_agent_sdk.testing.session_store_conformance import run_session_store_conformance
from redis.asyncio import Redis

from cli.embedded_redis import EmbeddedRedis
from shared import sessions
from shared.keys import session_key, transcript_key
from shared.workspaces import Manifest
from worker.session_store import _MOST_SESSION_SUBPATHS, JobTranscript, RedisSessionStore, TranscriptTooLarge

_DB = 14  # this module's own database, flushed per store


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/{_DB}")
    await client.flushdb()
    yield client
    await client.aclose()


async def test_the_sdk_conformance_harness_passes(redis: Redis) -> None:
    made: list[RedisSessionStore] = []

    async def fresh_store() -> RedisSessionStore:
        await redis.flushdb()  # each contract starts from an empty store
        store = RedisSessionStore(redis, ttl_s=60)
        made.append(store)
        return store

    await run_session_store_conformance(fresh_store)
    # Every optional contract the adapter implements ran: none was skipped for lack of a method.
    assert len(made) == 14  # probe + 13 contracts (all but the summaries one, which it does not keep)


async def test_every_key_of_a_session_carries_the_sliding_ttl(redis: Redis) -> None:
    store = RedisSessionStore(redis, ttl_s=30)
    key = {"project_key": "p", "session_id": "s"}
    sub = {**key, "subpath": "subagents/agent-1"}
    await store.append(key, [{"type": "user", "uuid": "u1"}])  # type: ignore[typeddict-item]
    await store.append(sub, [{"type": "user", "uuid": "u2"}])  # type: ignore[typeddict-item]
    keys = await redis.keys("gateway:sdk:*")
    assert len(keys) == 6  # index, main, main uuids, subkeys, sub, sub uuids
    for name in keys:
        assert 0 < await redis.ttl(name) <= 30, name


async def test_an_idle_session_expires_whole_and_leaves_the_listing(redis: Redis) -> None:
    store = RedisSessionStore(redis, ttl_s=1)
    key = {"project_key": "p", "session_id": "s"}
    await store.append(key, [{"type": "user", "uuid": "u1"}])  # type: ignore[typeddict-item]
    assert [s["session_id"] for s in await store.list_sessions("p")] == ["s"]
    deadline = asyncio.get_running_loop().time() + 10
    while await redis.keys("gateway:sdk:*"):
        assert asyncio.get_running_loop().time() < deadline, "the session did not expire"
        await asyncio.sleep(0.1)
    assert await store.load(key) is None  # type: ignore[arg-type]
    assert await store.list_sessions("p") == []
    assert await redis.keys("gateway:sdk:*") == []


async def test_entries_with_a_known_uuid_are_not_stored_twice(redis: Redis) -> None:
    store = RedisSessionStore(redis, ttl_s=60)
    key = {"project_key": "p", "session_id": "s"}
    first = [{"type": "user", "uuid": "u1"}, {"type": "title"}]
    await store.append(key, first)  # type: ignore[arg-type]
    await store.append(key, [{"type": "user", "uuid": "u1"}, {"type": "title"}])  # type: ignore[typeddict-item]
    assert await store.load(key) == [*first, {"type": "title"}]  # type: ignore[arg-type]


async def test_ids_cannot_reach_each_others_keys(redis: Redis) -> None:
    store = RedisSessionStore(redis, ttl_s=60)
    await store.append({"project_key": "a:b", "session_id": "c"}, [{"type": "x", "n": 1}])  # type: ignore[typeddict-item]
    assert await store.load({"project_key": "a", "session_id": "b:c"}) is None
    assert await store.load({"project_key": "a:b", "session_id": "c", "subpath": "../main"}) is None


async def test_a_transcript_is_kept_as_long_as_its_session(redis: Redis) -> None:
    """Found by an outside probe: only the transcript's appends slid its TTL. Under a turn longer
    than the TTL (or past uploads, which keep the session) it expired while its session lived,
    and the next turns resumed without the earlier ones, unseen."""
    store = RedisSessionStore(redis, ttl_s=5)
    owner, session_id, transcript_id = sessions.owner_of("key-1"), "sess-1", "t-1"
    key = {"project_key": owner, "session_id": transcript_id}
    await store.append(key, [{"type": "user", "uuid": "u1"}])  # type: ignore[typeddict-item]
    sub = {**key, "subpath": "subagents/agent-1"}
    await store.append(sub, [{"type": "user", "uuid": "u2"}])  # type: ignore[typeddict-item]
    transcript = await redis.keys(f"{transcript_key(owner, transcript_id)}:*")
    assert len(transcript) == 5  # main, its uuids, subkeys, the subagent's list and uuids
    await redis.hset(
        session_key(owner, session_id),
        mapping={"created": 1, "last_used": 1, "turns": 2, "transcript": transcript_id},
    )  # type: ignore[misc]
    # A turn begins: its session, and now its transcript, outlive the longest it may take.
    await sessions.open_for_job(redis, owner, session_id, 5, head=0, turn_s=100, ledger=None)
    for name in transcript:
        assert await redis.ttl(name) > 100, name
    # An upload keeps the session (and its transcript) for the TTL, never shortening either.
    assert await sessions.lock(redis, owner, session_id, "upload-1", hold_s=10)
    await sessions.set_workspace(
        redis, owner, session_id, "upload-1", transcript_id, Manifest("v1"), 5, ledger=None
    )
    for name in transcript:
        assert await redis.ttl(name) > 100, name
    await redis.expire(transcript[0], 1)
    assert await sessions.lock(redis, owner, session_id, "upload-2", hold_s=10)
    await sessions.set_workspace(
        redis, owner, session_id, "upload-2", transcript_id, Manifest("v2"), 50, ledger=None
    )
    assert 5 < await redis.ttl(transcript[0]) <= 50


async def test_a_turn_whose_transcript_passes_its_limit_adds_nothing(redis: Redis) -> None:
    """Found by an outside probe: the CLI mirrors whatever frames reach its stdout, where a job's
    tools write, and one session's transcript took 200 MB of Redis."""
    store = RedisSessionStore(redis, ttl_s=60)
    key: SessionKey = {"project_key": "owner", "session_id": "s1"}
    turn = JobTranscript(store, "owner", "s1", max_chars=1_000)
    await turn.append(key, [{"type": "user", "uuid": "u1", "pad": "x" * 400}])
    await turn.append(key, [{"type": "user", "uuid": "u2", "pad": "x" * 800}])
    with pytest.raises(TranscriptTooLarge):
        turn.seal()
    await turn.write()
    assert await store.load(key) is None
    within = JobTranscript(store, "owner", "s1", max_chars=1_000)
    await within.append(key, [{"type": "user", "uuid": "u3", "pad": "x" * 400}])
    within.seal()
    await within.write()
    assert [entry["uuid"] for entry in await store.load(key) or []] == ["u3"]
    # Many small entries count as what they cost the worker to hold, not as their few characters.
    tiny = JobTranscript(store, "owner", "s1", max_chars=1_000)
    await tiny.append(key, [{"type": "user", "uuid": f"t{i}"} for i in range(10)])
    with pytest.raises(TranscriptTooLarge):
        tiny.seal()


async def test_a_turn_keeps_only_its_own_sessions_transcript(redis: Redis) -> None:
    """Found by an outside probe: a job's tool wrote transcript frames to its CLI's output naming
    made-up session ids; the SDK mirrored each to the store, a gigabyte counted in no ledger."""
    store = RedisSessionStore(redis, ttl_s=60)
    own: SessionKey = {"project_key": "elsewhere", "session_id": "s1"}
    forged: SessionKey = {"project_key": "elsewhere", "session_id": "forged"}
    turn = JobTranscript(store, "owner", "s1", max_chars=10_000)
    await turn.append(forged, [{"type": "user", "uuid": "f1", "pad": "x" * 100}])
    await turn.append({**forged, "subpath": "subagents/a"}, [{"type": "user", "uuid": "f2"}])
    await turn.append(own, [{"type": "user", "uuid": "u1"}])
    turn.seal()
    await turn.write()
    assert [
        entry["uuid"] for entry in await store.load({"project_key": "owner", "session_id": "s1"}) or []
    ] == ["u1"]
    assert [key async for key in redis.scan_iter("*forged*")] == []
    assert await turn.load(forged) is None


async def test_a_turns_subagent_transcripts_count_by_their_names_and_number(redis: Redis) -> None:
    """Found by a re-check probe: subagent transcripts forged with 600,000-character paths stored
    147 MB in key names under a 100,000-character limit, and 8,000 of them held Redis for minutes
    (each append touches every list of the session)."""
    store = RedisSessionStore(redis, ttl_s=60)
    own: SessionKey = {"project_key": "any", "session_id": "s1"}
    long_name = JobTranscript(store, "owner", "s1", max_chars=100_000)
    await long_name.append({**own, "subpath": "subagents/" + "€" * 50_000}, [{"type": "user"}])
    with pytest.raises(TranscriptTooLarge, match="TURN_TRANSCRIPT_MAX_CHARS"):
        long_name.seal()
    many = JobTranscript(store, "owner", "s1", max_chars=100_000)
    for number in range(65):
        await many.append({**own, "subpath": f"subagents/agent-{number}.jsonl"}, [{"type": "user"}])
    with pytest.raises(TranscriptTooLarge, match="over 64 subagent transcripts"):  # not the size's message
        many.seal()
    await many.write()
    assert [key async for key in redis.scan_iter("*agent-*")] == []


async def test_a_session_keeps_a_bounded_number_of_subagent_transcripts(redis: Redis) -> None:
    """A turn names at most 64 subagent transcripts, but they add up over a session's turns, and
    each append slides every one's TTL: past `_MOST_SESSION_SUBPATHS` a new one is not kept,
    while the ones kept (and the main transcript) still take entries."""
    store = RedisSessionStore(redis, ttl_s=60)
    main: SessionKey = {"project_key": "owner", "session_id": "s1"}
    for number in range(_MOST_SESSION_SUBPATHS + 1):
        await store.append({**main, "subpath": f"subagents/agent-{number}.jsonl"}, [{"type": "user"}])
    await store.append({**main, "subpath": "subagents/agent-0.jsonl"}, [{"type": "assistant"}])
    await store.append(main, [{"type": "user"}])
    subpaths = await store.list_subkeys(main)
    assert len(subpaths) == _MOST_SESSION_SUBPATHS
    assert f"subagents/agent-{_MOST_SESSION_SUBPATHS}.jsonl" not in subpaths
    assert await store.load({**main, "subpath": f"subagents/agent-{_MOST_SESSION_SUBPATHS}.jsonl"}) is None
    assert await store.load({**main, "subpath": "subagents/agent-0.jsonl"}) == [
        {"type": "user"},
        {"type": "assistant"},
    ]
    assert await store.load(main) == [{"type": "user"}]
