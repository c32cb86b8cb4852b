"""The quota scripts against a Redis of their own (the access checks built on them: test_access.py)."""

from redis.asyncio import Redis

from shared import quotas


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
    admission = await quotas.admit(redis, auth, bucket, "managed", open_only=True, reads=["stored", "absent"])
    assert admission is not None
    assert (admission.throttled, admission.decision.remaining) == (False, 4)
    assert admission.values == [b"value", None]
    await redis.hset("managed", "digest", "{}")  # a managed key exists: the caller is not anonymous
    assert await quotas.admit(redis, auth, bucket, "managed", open_only=True, reads=["stored"]) is None
