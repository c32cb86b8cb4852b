"""The job event stream on a real Redis: order, coalescing, late readers, expiry."""

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from cli.embedded_redis import EmbeddedRedis
from shared.events import EventWriter, NoEventWithin, read_events
from shared.jobs import Delta, Done, FinishReason, Usage, new_job_id
from shared.keys import events_key


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/15")
    yield client
    await client.aclose()


DONE = Done(finish_reason=FinishReason.STOP, usage=Usage(prompt_tokens=1, completion_tokens=3))


async def test_a_reader_arriving_after_the_whole_job_gets_every_event(redis: Redis) -> None:
    job_id = new_job_id()
    writer = EventWriter(redis, job_id, ttl_s=60)
    for text in ("a", "b", "c"):
        writer.emit(Delta(text=text))
        await writer.drain()  # one write each: no coalescing
    writer.emit(DONE)
    await writer.drain()
    events = [item async for item in read_events(redis, job_id, idle_timeout_s=1)]
    assert events == [(1, Delta(text="a")), (2, Delta(text="b")), (3, Delta(text="c")), (4, DONE)]
    assert 0 < await redis.ttl(events_key(job_id)) <= 60


async def test_reading_after_a_sequence_number_resumes_exactly_there(redis: Redis) -> None:
    job_id = new_job_id()
    writer = EventWriter(redis, job_id, ttl_s=60)
    for text in ("a", "b", "c"):
        writer.emit(Delta(text=text))
        await writer.drain()
    writer.emit(DONE)
    await writer.drain()
    events = [item async for item in read_events(redis, job_id, after=2, idle_timeout_s=1)]
    assert events == [(3, Delta(text="c")), (4, DONE)]


async def test_deltas_emitted_during_a_write_are_merged_in_order(redis: Redis) -> None:
    job_id = new_job_id()
    writer = EventWriter(redis, job_id, ttl_s=60)
    for i in range(1000):
        writer.emit(Delta(text=f"{i},"))
    writer.emit(DONE)
    await writer.drain()
    events = [event async for _, event in read_events(redis, job_id, idle_timeout_s=1)]
    assert 2 <= len(events) < 1001
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "".join(f"{i}," for i in range(1000))
    assert events[-1] == DONE


async def test_a_live_reader_follows_the_writer(redis: Redis) -> None:
    job_id = new_job_id()
    reader = asyncio.create_task(_collect(redis, job_id))
    writer = EventWriter(redis, job_id, ttl_s=60)
    for text in ("x", "y"):
        await asyncio.sleep(0.01)
        writer.emit(Delta(text=text))
    writer.emit(DONE)
    await writer.drain()
    assert await reader == [Delta(text="x"), Delta(text="y"), DONE]


async def test_silence_is_reported_not_waited_out(redis: Redis) -> None:
    with pytest.raises(NoEventWithin):
        async for _ in read_events(redis, new_job_id(), idle_timeout_s=0.05):
            pass


async def test_redis_refuses_an_event_that_does_not_extend_the_sequence(redis: Redis) -> None:
    job_id = new_job_id()
    first = EventWriter(redis, job_id, ttl_s=60)
    first.emit(Delta(text="a"))
    await first.drain()
    second = EventWriter(redis, job_id, ttl_s=60)  # e.g. a second attempt of the same job
    second.emit(Delta(text="b"))
    with pytest.raises(Exception, match="equal or smaller"):
        await second.drain()


async def _collect(redis: Redis, job_id: str) -> list[object]:
    return [event async for _, event in read_events(redis, job_id, idle_timeout_s=5)]
