"""The quota scripts against a Redis of their own (the access checks built on them: test_access.py)."""

import asyncio

import pytest
from redis.asyncio import Redis

from shared import quotas, sessions
from shared.jobs import CompletionJob, SessionRef, Turn
from shared.keys import record_key, session_history_key, transcript_key


async def test_a_script_redis_no_longer_knows_is_sent_again(redis: Redis) -> None:
    bucket = {quotas.rate_key("someone", "chat"): 2}
    await redis.script_flush()  # e.g. a restarted Redis: called by its digest, the script is unknown
    first = await quotas.hit(redis, bucket)
    await redis.script_flush()
    second = await quotas.hit(redis, bucket)
    assert (first.allowed, first.remaining, second.allowed, second.remaining) == (True, 1, True, 0)
    assert not (await quotas.hit(redis, bucket)).allowed


async def test_an_admission_reads_what_the_request_needs_next(redis: Redis) -> None:
    auth = {quotas.rate_key("addr:1", "auth"): 5}
    bucket = {quotas.rate_key("addr:1", "chat"): 5}
    await redis.set("stored", b"value")
    admission = await quotas.admit(
        redis, auth, bucket, ("managed", "mark"), caller=quotas.OPEN, reads=["stored", "absent"]
    )
    assert admission is not None
    assert (admission.throttled, admission.decision.remaining) == (False, 4)
    assert admission.values == [b"value", None]
    await redis.set("mark", 1)  # a managed key existed: the caller is not anonymous
    assert (
        await quotas.admit(redis, auth, bucket, ("managed", "mark"), caller=quotas.OPEN, reads=["stored"])
        is None
    )
    await redis.delete("mark")
    await redis.hset("managed", "digest", "{}")  # a managed key exists: the caller is not anonymous
    assert (
        await quotas.admit(redis, auth, bucket, ("managed", "mark"), caller=quotas.OPEN, reads=["stored"])
        is None
    )


async def test_a_managed_key_is_counted_in_its_own_bucket_in_the_same_round_trip(redis: Redis) -> None:
    auth = {quotas.rate_key("addr:1", "auth"): 5}
    prefix = {quotas.rate_key("", "chat"): 2}  # the key's id completes it
    record = b'{"id": "key-1", "name": "a", "created": 0, "operator": false}'
    await redis.hset("managed", "digest-1", record)
    await redis.set("stored", b"value")
    first = await quotas.admit(redis, auth, prefix, ("managed", "mark"), caller="digest-1", reads=["stored"])
    assert first is not None
    assert (first.throttled, first.decision.allowed, first.decision.remaining) == (False, True, 1)
    assert (first.record, first.values) == (record, [b"value"])
    assert await redis.zcard(quotas.rate_key("key-1", "chat")) == 1
    await quotas.admit(redis, auth, prefix, ("managed", "mark"), caller="digest-1")
    third = await quotas.admit(redis, auth, prefix, ("managed", "mark"), caller="digest-1")
    assert third is not None
    assert not third.decision.allowed  # its limit of 2 is reached
    # A digest no managed key has: nothing is counted, the long check decides.
    assert await quotas.admit(redis, auth, prefix, ("managed", "mark"), caller="digest-2") is None
    assert await redis.zcard(quotas.rate_key("key-1", "chat")) == 2
    # An address with too many failed authentications gets nowhere, even with the right key.
    for _ in range(5):
        await quotas.hit(redis, auth)
    throttled = await quotas.admit(redis, auth, prefix, ("managed", "mark"), caller="digest-1")
    assert throttled is not None
    assert (throttled.throttled, throttled.record) == (True, None)
    assert await redis.zcard(quotas.rate_key("key-1", "chat")) == 2


async def test_kept_values_count_against_their_holders_limit_until_they_leave(redis: Redis) -> None:
    limit = quotas.StoredLimit(quotas.stored_key("key-1"), 100)
    await quotas.keep(redis, "kept:1", "a" * 40, 60, job_id="job-1", stored=limit)
    await quotas.keep(redis, "kept:2", "b" * 40, 1, job_id="job-2", stored=limit)
    with pytest.raises(quotas.StorageLimit) as refused:
        await quotas.keep(redis, "kept:3", "c" * 40, 60, job_id="job-3", stored=limit)
    assert 0 < refused.value.retry_after_ms <= 1000  # when the first to leave (job-2) expires
    assert not await redis.exists("kept:3")
    other = quotas.StoredLimit(quotas.stored_key("key-2"), 100)  # another holder has its own room
    await quotas.keep(redis, "kept:4", "d" * 90, 60, job_id="job-4", stored=other)
    await quotas.discard(redis, "kept:1", entry="job-1", ledger=limit.ledger)  # deleted: its room is free
    assert not await redis.exists("kept:1")
    await quotas.keep(redis, "kept:3", "c" * 40, 60, job_id="job-3", stored=limit)
    await asyncio.sleep(1.1)  # job-2's value expired: so does its count
    await quotas.keep(redis, "kept:5", "e" * 55, 60, job_id="job-5", stored=limit)
    assert int(await redis.hget(quotas.stored_key("key-1") + ":bytes", "total")) == 95
    with pytest.raises(quotas.StorageLimit) as never:  # over the whole limit: no wait would do
        await quotas.keep(redis, "kept:6", "f" * 101, 60, job_id="job-6", stored=other)
    assert never.value.retry_after_ms is None


async def test_a_session_counts_its_history_and_transcript_as_they_are_at_each_commit(redis: Redis) -> None:
    ledger = quotas.stored_key("key-1")
    owner, session_id, transcript_id = sessions.owner_of("key-1"), "chat-1", "transcript-1"
    entry = f"{ledger}:bytes"
    base = transcript_key(owner, transcript_id)
    await redis.rpush(f"{base}:main", *["x" * 1000] * 50)  # as the worker's session store writes it
    await redis.sadd(f"{base}:subkeys", "agent-1")
    await redis.rpush(f"{base}:sub:agent-1", "y" * 5000)

    async def turn(job_id: str, history_len: int, text: str) -> None:
        ref = SessionRef(owner=owner, id=session_id, history_len=history_len, transcript_id=transcript_id)
        job = CompletionJob(
            id=job_id, request_id="r", model="m", turns=[Turn(role="user", text=text)], session=ref
        )
        await redis.hset(record_key(job_id), "ledger", ledger)  # as the create script records it
        assert await sessions.lock(redis, owner, session_id, job_id, 60)
        await sessions.commit(redis, job, "reply", 600)

    await turn("a" * 32, 0, "u" * 20_000)
    keys = [session_history_key(owner, session_id), f"{base}:main", f"{base}:sub:agent-1", f"{base}:subkeys"]
    measured = sum([await redis.memory_usage(key, samples=0) or 0 for key in keys])
    counted = int(await redis.hget(entry, quotas.session_entry(session_id)))
    assert counted >= measured > 70_000  # the history, the transcript and its subagent's
    await turn("b" * 32, 2, "v" * 20_000)  # measured whole again: counted once, not added up
    total = int(await redis.hget(entry, "total"))
    assert total == int(await redis.hget(entry, quotas.session_entry(session_id))) > counted + 20_000
    assert 0 < await redis.pttl(ledger) <= 600_000
    found = await sessions.get(redis, owner, session_id, 600)
    assert found is not None
    await sessions.delete(redis, owner, found[0], ledger)
    assert int(await redis.hget(entry, "total")) == 0


async def test_entries_that_count_nothing_leave_and_expire_cleanly(redis: Redis) -> None:
    """A session made by an upload has no history nor transcript: its entry counts 0 bytes, and
    Lua's -0 is no integer to HINCRBY (its delete was a 500)."""
    ledger = quotas.stored_key("key-1")
    await quotas.keep(redis, "kept:1", "", 1, job_id="job-1", stored=quotas.StoredLimit(ledger, 100))
    await quotas.keep(redis, "kept:2", "", 60, job_id="job-2", stored=quotas.StoredLimit(ledger, 100))
    await quotas.discard(redis, "kept:2", entry="job-2", ledger=ledger)
    await asyncio.sleep(1.1)
    await quotas.keep(redis, "kept:3", "abc", 60, job_id="job-3", stored=quotas.StoredLimit(ledger, 100))
    assert int(await redis.hget(f"{ledger}:bytes", "total")) == 3
