"""The shared event reader on a real Redis: many followers on one connection, each on its own terms."""

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from cli.embedded_redis import EmbeddedRedis
from shared.events import EventReader, EventWriter, NoEventWithin
from shared.jobs import CompletionJob, Delta, Done, FinishReason, JobEventValue, Turn, Usage, encode_event
from shared.jobstore import JobStore
from tests.conftest import followed

DONE = Done(finish_reason=FinishReason.STOP, usage=Usage(prompt_tokens=1, completion_tokens=1))
Followed = list[tuple[int, JobEventValue]]


@pytest.fixture
async def reader(redis: Redis) -> AsyncIterator[EventReader]:
    reader = EventReader(redis)
    reader.BLOCK_MS = 60_000  # a lost wake-up fails the test instead of arriving late
    yield reader
    await reader.aclose()


async def _started_job(store: JobStore) -> str:
    job = CompletionJob(request_id="req_1", model="m", turns=[Turn(role="user", text="hi")])
    assert await store.create(job, owner="test") is None
    assert await store.claim(job.id, 1, worker_id="worker-1", in_progress_ms=10_000, lease_s=10) is not None
    return job.id


async def _write(writer: EventWriter, *events: JobEventValue) -> None:
    for event in events:
        writer.emit(event)
        await writer.drain()  # one entry each


async def _follow(
    reader: EventReader, job_id: str, got: Followed, *, after: int = 0, idle_s: float = 10
) -> None:
    async for item in followed(reader, job_id, after=after, idle_timeout_s=idle_s):
        got.append(item)


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


async def _clients(redis: Redis) -> list[dict[str, str]]:
    """The connections to this client's database (a unit database is one test's alone)."""
    db = str(redis.connection_pool.connection_kwargs["db"])
    return [client for client in await redis.client_list() if client["db"] == db]


async def _blocked_read(redis: Redis) -> None:
    async with asyncio.timeout(10):
        while not any(
            client["cmd"] == "xread" and "b" in client["flags"] for client in await _clients(redis)
        ):
            await asyncio.sleep(0.01)


async def test_many_followers_share_one_connection_and_each_gets_its_own_job(
    redis: Redis, reader: EventReader
) -> None:
    store = JobStore(redis, queue_name="test:queue", ttl_s=60)
    jobs = [await _started_job(store) for _ in range(30)]
    writers = [EventWriter(store, job_id, 1) for job_id in jobs]
    for i, writer in enumerate(writers):
        await _write(writer, Delta(text=f"{i} first "))
    # Even followers read from the start, odd ones resume after the first event.
    got: list[Followed] = [[] for _ in jobs]
    following = [
        asyncio.create_task(_follow(reader, job_id, got[i], after=i % 2)) for i, job_id in enumerate(jobs)
    ]
    await _until(lambda: all(got[i] for i in range(0, len(jobs), 2)))
    await _blocked_read(redis)
    clients = await _clients(redis)
    assert [client["cmd"] for client in clients].count("xread") == 1, clients
    assert len(clients) <= 3, clients  # the read, a wake-up's append, this listing
    for i, writer in enumerate(writers):
        await _write(writer, Delta(text=f"{i} second "), DONE)
    await asyncio.gather(*following)
    for i, items in enumerate(got):
        expected = [(1, Delta(text=f"{i} first ")), (2, Delta(text=f"{i} second ")), (3, DONE)]
        assert items == expected[i % 2 :]


async def test_a_follower_arriving_during_a_blocked_read_wakes_it(redis: Redis, reader: EventReader) -> None:
    store = JobStore(redis, queue_name="test:queue", ttl_s=60)
    waiting, written = await _started_job(store), await _started_job(store)
    await _write(EventWriter(store, written, 1), Delta(text="ready"), DONE)
    first = asyncio.create_task(_follow(reader, waiting, []))
    await _blocked_read(redis)  # over `waiting` alone, for longer than the late follower waits
    late: Followed = []
    await _follow(reader, written, late, idle_s=5)
    assert late == [(1, Delta(text="ready")), (2, DONE)]
    first.cancel()


async def test_each_follower_has_its_own_idle_limit(redis: Redis, reader: EventReader) -> None:
    store = JobStore(redis, queue_name="test:queue", ttl_s=60)
    silent, talking = await _started_job(store), await _started_job(store)
    got: Followed = []
    patient = asyncio.create_task(_follow(reader, talking, got, idle_s=10))
    with pytest.raises(NoEventWithin):
        await _follow(reader, silent, [], idle_s=0.1)
    assert not patient.done()  # the other follower waits on
    await _write(EventWriter(store, talking, 1), Delta(text="late"), DONE)
    await patient
    assert got == [(1, Delta(text="late")), (2, DONE)]


async def test_events_read_together_are_handed_over_together(redis: Redis, reader: EventReader) -> None:
    store = JobStore(redis, queue_name="test:queue", ttl_s=60)
    job_id = await _started_job(store)
    written = [encode_event(Delta(text="a")), encode_event(Delta(text="b"))]
    await store.append(job_id, 1, 1, written, outcome="", ttl_s=60)
    batches = reader.batches(job_id, idle_timeout_s=10)
    assert await anext(batches) == [(1, Delta(text="a")), (2, Delta(text="b"))]
    last = [encode_event(Delta(text="c")), encode_event(DONE)]
    await store.append(job_id, 1, 3, last, outcome="completed", ttl_s=60)
    assert await anext(batches) == [(3, Delta(text="c")), (4, DONE)]  # the terminal event ends it
    with pytest.raises(StopAsyncIteration):
        await anext(batches)


async def test_a_follower_that_leaves_does_not_disturb_the_others(redis: Redis, reader: EventReader) -> None:
    store = JobStore(redis, queue_name="test:queue", ttl_s=60)
    job_id = await _started_job(store)
    writer = EventWriter(store, job_id, 1)
    staying: Followed = []
    stays = asyncio.create_task(_follow(reader, job_id, staying))
    leaving = followed(reader, job_id, idle_timeout_s=10)
    await _write(writer, Delta(text="a"))
    assert await anext(leaving) == (1, Delta(text="a"))
    await leaving.aclose()  # e.g. its client went away
    cancelled = asyncio.create_task(_follow(reader, job_id, []))
    await _until(lambda: bool(staying))
    cancelled.cancel()
    await _write(writer, Delta(text="b"), DONE)
    await stays
    assert staying == [(1, Delta(text="a")), (2, Delta(text="b")), (3, DONE)]
    assert cancelled.cancelled()


async def test_a_follower_far_behind_gets_every_event_in_order(redis: Redis, reader: EventReader) -> None:
    store = JobStore(redis, queue_name="test:queue", ttl_s=60)
    job_id = await _started_job(store)
    count = EventReader.HELD * 3  # more than it holds for one follower: it is read on in turns
    texts = [f"{i}," for i in range(count)]
    await store.append(job_id, 1, 1, [encode_event(Delta(text=text)) for text in texts], outcome="", ttl_s=60)
    await store.append(job_id, 1, count + 1, [encode_event(DONE)], outcome="completed", ttl_s=60)
    got: Followed = []
    async for item in followed(reader, job_id, idle_timeout_s=10):
        got.append(item)
        if len(got) % 100 == 0:
            await asyncio.sleep(0.001)  # a slow client
    assert got == [(i + 1, Delta(text=text)) for i, text in enumerate(texts)] + [(count + 1, DONE)]


async def test_followers_of_one_job_far_apart_each_get_every_event(redis: Redis, reader: EventReader) -> None:
    store = JobStore(redis, queue_name="test:queue", ttl_s=60)
    job_id = await _started_job(store)
    count = EventReader.HELD * 3
    texts = [f"{i}," for i in range(count)]
    await store.append(job_id, 1, 1, [encode_event(Delta(text=text)) for text in texts], outcome="", ttl_s=60)
    ahead: Followed = []
    waits_at_the_end = asyncio.create_task(_follow(reader, job_id, ahead, after=count))
    behind = followed(reader, job_id, idle_timeout_s=10)
    got = [await anext(behind)]  # its inbox fills: it is left out of the read while the other reads on
    await _blocked_read(redis)
    await store.append(job_id, 1, count + 1, [encode_event(DONE)], outcome="completed", ttl_s=60)
    await waits_at_the_end
    got += [item async for item in behind]
    assert ahead == [(count + 1, DONE)]
    assert got == [(i + 1, Delta(text=text)) for i, text in enumerate(texts)] + [(count + 1, DONE)]


async def test_a_lost_redis_is_reported_to_every_follower_and_reading_resumes(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, persistent=True)
    server.start()
    redis = Redis.from_url(server.url)
    reader = EventReader(redis)
    try:
        store = JobStore(redis, queue_name="test:queue", ttl_s=60)
        jobs = [await _started_job(store) for _ in range(3)]
        got: list[Followed] = [[] for _ in jobs]
        following = [asyncio.create_task(_follow(reader, job_id, got[i])) for i, job_id in enumerate(jobs)]
        await _blocked_read(redis)
        server.stop()
        for task in following:
            with pytest.raises(RedisConnectionError):
                await task
        server.start()  # same data: each follower comes back after its last event
        writer = EventWriter(store, jobs[0], 1)
        await _write(writer, Delta(text="back"), DONE)
        assert [item async for item in followed(reader, jobs[0], idle_timeout_s=10)] == [
            (1, Delta(text="back")),
            (2, DONE),
        ]
    finally:
        await reader.aclose()
        await redis.aclose()
        server.stop()
