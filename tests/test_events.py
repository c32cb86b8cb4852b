"""The job event stream on a real Redis: order, coalescing, late readers, expiry, fencing."""

import asyncio
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from cli.embedded_redis import EmbeddedRedis
from shared import heartbeats, stats
from shared.events import EventReader, EventWriter, NoEventWithin, Superseded, events_so_far
from shared.heartbeats import Heartbeat
from shared.jobs import (
    CompletionJob,
    Delta,
    Done,
    Failed,
    FailureCode,
    FinishReason,
    Reasoning,
    Turn,
    Usage,
    new_job_id,
)
from shared.jobstore import AttemptEnd, JobSlot, JobStore
from shared.keys import events_key, record_key
from shared.quotas import slots_key
from tests.conftest import followed


@pytest.fixture
async def reader(redis: Redis) -> AsyncIterator[EventReader]:
    reader = EventReader(redis)
    yield reader
    await reader.aclose()


@pytest.fixture
def store(redis: Redis) -> JobStore:
    return JobStore(redis, queue_name="test:queue", ttl_s=60)


@pytest.fixture
async def fillable(tmp_path: Path) -> AsyncIterator[JobStore]:
    """A store on a Redis of the test's own, whose `maxmemory` the test may set (`noeviction`)."""
    server = EmbeddedRedis(tmp_path, persistent=False)
    server.start()
    client = Redis.from_url(server.url)
    await client.config_set("maxmemory-policy", "noeviction")
    try:
        yield JobStore(client, queue_name="full:queue", ttl_s=60)
    finally:
        await client.aclose()
        server.stop()


async def _writer(store: JobStore) -> tuple[str, EventWriter]:
    """A queued job's id and a writer for its first attempt (started, as a worker would)."""
    job = CompletionJob(request_id="req_1", model="m", turns=[Turn(role="user", text="hi")])
    assert await store.create(job, owner="test") is None
    assert await store.claim(job.id, 1, worker_id="worker-1", in_progress_ms=10_000, lease_s=10) is not None
    return job.id, EventWriter(store, job.id, 1)


DONE = Done(finish_reason=FinishReason.STOP, usage=Usage(prompt_tokens=1, completion_tokens=3))


async def test_a_reader_arriving_after_the_whole_job_gets_every_event(
    redis: Redis, reader: EventReader, store: JobStore
) -> None:
    job_id, writer = await _writer(store)
    for text in ("a", "b", "c"):
        writer.emit(Delta(text=text))
        await writer.drain()  # one write each: no coalescing
    writer.emit(DONE)
    await writer.drain()
    events = [item async for item in followed(reader, job_id, idle_timeout_s=1)]
    assert events == [(1, Delta(text="a")), (2, Delta(text="b")), (3, Delta(text="c")), (4, DONE)]
    assert 0 < await redis.ttl(events_key(job_id)) <= 60


async def test_reading_after_a_sequence_number_resumes_exactly_there(
    reader: EventReader, store: JobStore
) -> None:
    job_id, writer = await _writer(store)
    for text in ("a", "b", "c"):
        writer.emit(Delta(text=text))
        await writer.drain()
    writer.emit(DONE)
    await writer.drain()
    events = [item async for item in followed(reader, job_id, after=2, idle_timeout_s=1)]
    assert events == [(3, Delta(text="c")), (4, DONE)]


async def test_deltas_emitted_during_a_write_are_merged_in_order(
    reader: EventReader, store: JobStore
) -> None:
    job_id, writer = await _writer(store)
    for i in range(1000):
        writer.emit(Delta(text=f"{i},"))
    writer.emit(DONE)
    await writer.drain()
    events = [event async for _, event in followed(reader, job_id, idle_timeout_s=1)]
    assert 2 <= len(events) < 1001
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "".join(f"{i}," for i in range(1000))
    assert events[-1] == DONE


async def test_no_event_carries_more_text_than_its_bound(reader: EventReader, store: JobStore) -> None:
    """A burst of output (merged while writes are in flight) and one long delta are both written in
    events of at most `EVENT_CHARS`: a reader holds and sends each whole."""
    job_id, writer = await _writer(store)
    for i in range(5000):
        writer.emit(Reasoning(text=f"{i},"))
    long = "".join(chr(0x4E00 + i % 500) for i in range(3 * EventWriter.EVENT_CHARS + 7))
    writer.emit(Delta(text=long))
    writer.emit(DONE)
    await writer.drain()
    events = [event async for _, event in followed(reader, job_id, idle_timeout_s=1)]
    texts = [event for event in events if isinstance(event, Delta | Reasoning)]
    assert max(len(event.text) for event in texts) == EventWriter.EVENT_CHARS
    assert "".join(e.text for e in texts if isinstance(e, Reasoning)) == "".join(f"{i}," for i in range(5000))
    assert "".join(e.text for e in texts if isinstance(e, Delta)) == long
    assert events[-1] == DONE


async def test_the_first_text_after_thinking_does_not_wait_for_the_linger(
    reader: EventReader, store: JobStore
) -> None:
    job_id, writer = await _writer(store)
    writer.LINGER_S = 3600.0  # a hot stream's next write would wait past the test's timeout
    writer.emit(Reasoning(text="thinking"))
    await asyncio.sleep(0)  # its write is in flight
    writer.emit(Delta(text="Hello"))  # arrives during it: another kind, not more of the same
    await asyncio.wait_for(writer.drain(), timeout=10)
    writer.emit(DONE)
    await writer.drain()
    events = [event async for _, event in followed(reader, job_id, idle_timeout_s=1)]
    assert events == [Reasoning(text="thinking"), Delta(text="Hello"), DONE]


async def test_a_live_reader_follows_the_writer(reader: EventReader, store: JobStore) -> None:
    job_id, writer = await _writer(store)
    following = asyncio.create_task(_collect(reader, job_id))
    for text in ("x", "y"):
        await asyncio.sleep(0.01)
        writer.emit(Delta(text=text))
    writer.emit(DONE)
    await writer.drain()
    assert await following == [Delta(text="x"), Delta(text="y"), DONE]


async def test_silence_is_reported_not_waited_out(reader: EventReader) -> None:
    with pytest.raises(NoEventWithin):
        async for _ in followed(reader, new_job_id(), idle_timeout_s=0.05):
            pass


async def test_a_job_record_outlives_each_attempt_and_each_wait(redis: Redis, store: JobStore) -> None:
    """Found by a re-check probe: a job's record lived EVENT_TTL_S from its claim; a job running
    longer, or queued again after a lost worker for longer, lost its record (a 503 "Redis lost the
    job", or a 404 and its session held)."""
    job = CompletionJob(request_id="req_1", model="m", turns=[Turn(role="user", text="hi")])
    assert await store.create(job, owner="test", queue_timeout_s=500) is None
    assert await store.claim(job.id, 1, worker_id="w-1", in_progress_ms=300_000, lease_s=10) is not None
    assert await redis.ttl(record_key(job.id)) >= 60 + 500 - 1  # its wait's TTL, not shortened
    job_2 = CompletionJob(request_id="req_2", model="m", turns=[Turn(role="user", text="hi")])
    assert await store.create(job_2, owner="test") is None
    assert await store.claim(job_2.id, 1, worker_id="w-1", in_progress_ms=300_000, lease_s=10) is not None
    assert await redis.ttl(record_key(job_2.id)) >= 60 + 300 - 1  # the attempt may run 300 s
    await redis.hset(record_key(job_2.id), "queue_timeout", 900_000)  # type: ignore[misc]
    await redis.expire(record_key(job_2.id), 60)
    await store.expire_lease(job_2.id, 1)  # its worker is gone and produced nothing: retried
    assert await store.recover_expired(max_attempts=3, lease_s=10) == [(job_2.id, "retried")]
    assert await redis.ttl(record_key(job_2.id)) >= 60 + 900 - 1  # and may wait 900 s again


async def test_a_superseded_attempt_can_no_longer_write(reader: EventReader, store: JobStore) -> None:
    job_id, first = await _writer(store)
    await store.expire_lease(job_id, 1)  # its worker is gone and produced nothing: retried
    assert await store.recover_expired(max_attempts=3, lease_s=10) == [(job_id, "retried")]
    first.emit(Delta(text="late"))
    with pytest.raises(Superseded):
        await first.drain()
    second = EventWriter(store, job_id, 2)
    assert await store.claim(job_id, 2, worker_id="worker-2", in_progress_ms=10_000, lease_s=10) is not None
    second.emit(Delta(text="b"))
    second.emit(DONE)
    await second.drain()
    assert [e async for _, e in followed(reader, job_id, idle_timeout_s=1)] == [Delta(text="b"), DONE]


async def test_a_job_whose_every_attempt_lost_its_worker_says_so(
    reader: EventReader, store: JobStore
) -> None:
    job_id, _ = await _writer(store)
    await store.expire_lease(job_id, 1)
    assert await store.recover_expired(max_attempts=1, lease_s=10) == [(job_id, "failed")]
    [failed] = [e async for _, e in followed(reader, job_id, idle_timeout_s=1)]
    assert isinstance(failed, Failed)
    assert failed.code == "worker_lost"
    # Not "after it had produced output" (it had none): an outside probe was told so.
    assert "before any output, on every attempt" in failed.message


async def test_a_lease_runs_out_only_while_redis_could_be_reached(store: JobStore) -> None:
    # Found by an outside probe: after an outage longer than a lease, the first process to sweep
    # failed the healthy jobs of every worker it beat to renewing them.
    job = CompletionJob(request_id="req_1", model="m", turns=[Turn(role="user", text="hi")])
    assert await store.create(job, owner="test") is None
    assert await store.claim(job.id, 1, worker_id="worker-1", in_progress_ms=10_000, lease_s=1) is not None
    assert await store.recover_expired(max_attempts=3, lease_s=1) == []  # swept before the outage
    await asyncio.sleep(1.5)  # Redis out of reach of every process: none swept, none renewed
    assert await store.recover_expired(max_attempts=3, lease_s=1) == []  # the first sweep after it
    assert await store.renew(job.id, 1, lease_s=1) == "ok"  # its worker, back a moment later

    # Its worker dies in the next outage: the job is recovered when the granted lease runs out.
    await asyncio.sleep(1.5)
    assert await store.recover_expired(max_attempts=3, lease_s=1) == []
    recovered: list[tuple[str, str]] = []
    deadline = time.monotonic() + 3
    while not recovered and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # the surviving workers sweep
        recovered = await store.recover_expired(max_attempts=3, lease_s=1)
    assert recovered == [(job.id, "retried")]


async def test_commands_held_up_by_an_outage_take_no_lease_for_lost(tmp_path: Path) -> None:
    # Found by an outside probe: Redis stopped for 20 s (SIGSTOP) failed a healthy worker's job.
    # The sweeps and the renewal sent during the outage were timed by their senders' clocks, long
    # past when Redis ran them: a renewal set a lease already over, and sweeps timed through the
    # outage, a few hundred ms apart, each saw no silence. Leases are timed by Redis's clock now.
    server = EmbeddedRedis(tmp_path, persistent=False)
    server.start()
    clients = [Redis.from_url(server.url) for _ in range(10)]
    stores = [JobStore(client, queue_name="outage:queue", ttl_s=60) for client in clients]
    try:
        job = CompletionJob(request_id="req_1", model="m", turns=[Turn(role="user", text="hi")])
        assert await stores[0].create(job, owner="test") is None
        assert await stores[0].claim(job.id, 1, worker_id="w", in_progress_ms=60_000, lease_s=2) is not None
        for store in stores:
            await store.redis.ping()  # each process connected before the outage
        assert await stores[0].recover_expired(max_attempts=3, lease_s=2) == []
        # The sweep run first after the outage sees the silence; its process is slow to go on
        # (the next probe found the others' sweeps, run next, taking the job in between).
        first_sweep = stores[2]._recover

        async def slow_to_go_on(**call: Any) -> Any:
            await asyncio.sleep(1)
            return await first_sweep(**call)

        stores[2]._recover = slow_to_go_on  # type: ignore[method-assign]
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        held_up = []
        for store in stores[2:]:  # the other processes' sweeps, through the outage
            await asyncio.sleep(0.45)
            held_up.append(asyncio.create_task(store.recover_expired(max_attempts=3, lease_s=2)))
        await asyncio.sleep(0.5)  # 4.1 s in all: past the 2 s lease
        server.process.send_signal(signal.SIGCONT)
        swept = await asyncio.wait_for(asyncio.gather(*held_up), timeout=10)
        assert swept == [[]] * len(swept)
        # Its worker was in a sweep of its own when Redis stopped: it renews a round later.
        assert await stores[1].renew(job.id, 1, lease_s=2) == "ok"
        assert await stores[0].recover_expired(max_attempts=3, lease_s=2) == []
        record = await stores[0].get(job.id)
        assert record is not None
        assert record.ended is None
    finally:
        if server.process is not None:
            server.process.send_signal(signal.SIGCONT)
        for client in clients:
            await client.aclose()
        server.stop()


async def test_a_write_waits_out_a_full_redis(fillable: JobStore) -> None:
    # Found by an outside probe: with Redis full for 8 s (`maxmemory`, `noeviction`), every running
    # job failed as worker_lost on healthy workers; and the next probe found it so once Redis was
    # full longer than REDIS_OUTAGE_GRACE_S. A full Redis is waited out as long as the job may run.
    store, client = fillable, fillable.redis
    job_id, _ = await _writer(store)
    writer = EventWriter(store, job_id, 1, outage_grace_s=0.5, full_grace_s=60)
    await client.config_set("maxmemory", 1)  # below what it holds: every write refused
    writer.emit(Delta(text="written once there is room"))
    draining = asyncio.create_task(writer.drain())
    await asyncio.sleep(1.5)
    assert not draining.done()
    await client.config_set("maxmemory", 0)
    await asyncio.wait_for(draining, timeout=5)
    assert await client.xlen(events_key(job_id)) == 1


async def test_a_write_waits_out_a_redis_that_cannot_save(tmp_path: Path) -> None:
    """Found by a re-check probe: a Redis that cannot save to its disk refuses writes (MISCONF, a
    plain error in redis-py), and 2 s of it ended a running job as a lost worker's: it is waited
    out as a full Redis is."""
    server = EmbeddedRedis(tmp_path / "data", persistent=False)
    server.start()
    client = Redis.from_url(server.url)
    try:
        store = JobStore(client, queue_name="misconf:queue", ttl_s=60)
        job_id, _ = await _writer(store)
        writer = EventWriter(store, job_id, 1, outage_grace_s=0.5, full_grace_s=60)
        shutil.rmtree(tmp_path / "data")  # its next save finds no folder
        await client.config_set("save", "3600 1")
        await client.bgsave()
        while (await client.info("persistence"))["rdb_last_bgsave_status"] != "err":
            await asyncio.sleep(0.05)
        writer.emit(Delta(text="written once Redis can save"))
        draining = asyncio.create_task(writer.drain())
        await asyncio.sleep(1.5)
        assert not draining.done()
        await client.config_set("save", "")  # no save to fail: it takes writes again
        await asyncio.wait_for(draining, timeout=5)
        assert await client.xlen(events_key(job_id)) == 1
    finally:
        await client.aclose()
        server.stop()


async def test_output_that_finds_no_room_is_dropped_and_only_a_failure_ends_it(fillable: JobStore) -> None:
    """Redis full past the writer's patience: what was not written is dropped, a `Done` (which
    would hide the loss) is refused, and a failure is written alone while Redis stays full."""
    store, client = fillable, fillable.redis
    job_id, _ = await _writer(store)
    writer = EventWriter(store, job_id, 1, outage_grace_s=0.5, full_grace_s=0.5)
    writer.emit(Delta(text="written "))
    await writer.drain()
    await client.config_set("maxmemory", 1)  # below what it holds: every write refused
    writer.emit(Delta(text="never stored"))
    with pytest.raises(OutOfMemoryError):
        await writer.drain()
    assert writer.no_room
    record = stats.JobRecord(
        job_id=job_id, request_id="req_1", worker_id="worker-1", outcome="", queue_wait_s=0, duration_s=1
    )
    end = AttemptEnd("worker-1", record, failures_kept=10)
    with pytest.raises(OutOfMemoryError):
        writer.finish(DONE, end)
    failed = Failed(code=FailureCode.STORAGE_FULL, message="no room")
    writer.finish(failed, end)
    await asyncio.wait_for(writer.drain(), timeout=5)
    assert await events_so_far(client, job_id) == [Delta(text="written "), failed]


async def test_a_full_redis_takes_no_new_job_and_keeps_the_running_ones(fillable: JobStore) -> None:
    """Found by an outside probe: with Redis full, a job that takes one of its caller's slots was
    queued all the same (the script's first write, freeing expired slots, let the rest through),
    and the running jobs' leases could not be renewed, so they failed as worker_lost once the
    sweeps got through. Now nothing of a new job is written, leases are renewed, sweeps run, and
    a queued job can still be withdrawn."""
    store, client = fillable, fillable.redis
    running, _ = await _writer(store)
    queued = CompletionJob(request_id="req_2", model="m", turns=[Turn(role="user", text="hi")])
    assert await store.create(queued, owner="test") is None
    await client.config_set("maxmemory", 1)  # below what it holds: Redis is full
    new = CompletionJob(request_id="req_3", model="m", turns=[Turn(role="user", text="hi")])
    slot = JobSlot(holder="test", cap=4, lease_ms=60_000)
    with pytest.raises(OutOfMemoryError):
        await store.create(new, owner="test", slot=slot)
    assert await client.exists(record_key(new.id), slots_key("test")) == 0
    assert await store.renew(running, 1, lease_s=10) == "ok"
    assert await store.recover_expired(max_attempts=3, lease_s=10) == []
    # Its worker stays alive to status, metrics and placement (they lost every worker).
    beat = Heartbeat(
        id="w-1", host="h", pid=1, started=time.time(), beat=time.time(), slots=2, jobs=[running]
    )
    await heartbeats.beat(client, beat, ttl_s=10, load=True)
    assert [worker.jobs for worker in await heartbeats.alive_workers(client)] == [[running]]
    failure = Failed(code=FailureCode.QUEUE_TIMEOUT, message="No worker started the job.")
    assert await store.stop(queued.id, withdraw_only=True, failure=failure) == "stopped"


async def test_a_repeated_write_is_applied_once(redis: Redis, store: JobStore) -> None:
    job_id, _ = await _writer(store)
    batch = [b'{"type":"delta","text":"a"}', b'{"type":"delta","text":"b"}']
    await store.append(job_id, 1, 1, batch, outcome="", ttl_s=60)
    await store.append(job_id, 1, 1, batch, outcome="", ttl_s=60)  # its reply was lost: sent again
    assert await redis.xlen(events_key(job_id)) == 2


async def test_a_lost_worker_with_output_fails_the_job(
    redis: Redis, reader: EventReader, store: JobStore
) -> None:
    job_id, writer = await _writer(store)
    writer.emit(Delta(text="partial"))
    await writer.drain()
    await store.expire_lease(job_id, 1)
    assert await store.recover_expired(max_attempts=3, lease_s=10) == [(job_id, "failed")]
    events = [e async for _, e in followed(reader, job_id, idle_timeout_s=1)]
    assert events[0] == Delta(text="partial")
    assert events[-1].type == "failed"
    assert events[-1].code == "worker_lost"
    record = await store.get(job_id)
    assert record is not None
    assert record.status == "failed"
    # Counted like a failure its worker wrote, although no worker did.
    assert (await stats.read_stats(redis)).jobs == {"worker_lost": 1}
    [failure] = await stats.recent_failures(redis, 5)
    assert (failure.job_id, failure.request_id, failure.worker_id) == (job_id, "req_1", "worker-1")
    assert (failure.code, failure.message) == ("worker_lost", events[-1].message)
    assert abs(failure.at - time.time()) < 60


async def test_jobs_ended_before_a_worker_started_them_are_counted_once(
    redis: Redis, store: JobStore
) -> None:
    """Withdrawn from the queue or cancelled while queued: in the totals and the recent failures,
    once however often they are stopped."""
    jobs = [
        CompletionJob(request_id=f"req_{i}", model="m", turns=[Turn(role="user", text="hi")])
        for i in range(2)
    ]
    for job in jobs:
        assert await store.create(job, owner="test") is None
    timeout = Failed(code=FailureCode.QUEUE_TIMEOUT, message="No worker started the job.")
    cancelled = Failed(code=FailureCode.CANCELLED, message="The job was cancelled.")
    assert await store.stop(jobs[0].id, withdraw_only=True, failure=timeout) == "stopped"
    assert await store.stop(jobs[1].id, withdraw_only=False, failure=cancelled) == "stopped"
    assert await store.stop(jobs[1].id, withdraw_only=False, failure=cancelled) == "ended"
    assert (await stats.read_stats(redis)).jobs == {"queue_timeout": 1, "cancelled": 1}
    latest = await stats.recent_failures(redis, 5)
    assert [(f.job_id, f.request_id, f.worker_id, f.code) for f in latest] == [
        (jobs[1].id, "req_1", "", "cancelled"),
        (jobs[0].id, "req_0", "", "queue_timeout"),
    ]


async def _collect(reader: EventReader, job_id: str) -> list[object]:
    return [event async for _, event in followed(reader, job_id, idle_timeout_s=5)]


async def test_a_jobs_events_are_read_a_page_at_a_time(redis: Redis, store: JobStore) -> None:
    """Redis holds a reply whole until it is sent: a job's whole stream read at once by many
    readers took it past its `maxmemory` (an outside probe). Every event comes, in order."""
    job_id, writer = await _writer(store)
    count = EventReader.COUNT * 2 + 5
    for index in range(count):
        writer.emit(Delta(text=f"{index},"))
        await writer.drain()  # one event each
    writer.emit(DONE)
    await writer.drain()
    calls_before = (await redis.info("commandstats")).get("cmdstat_xrange", {}).get("calls", 0)
    events = await events_so_far(redis, job_id)
    calls = (await redis.info("commandstats"))["cmdstat_xrange"]["calls"] - calls_before
    assert "".join(event.text for event in events if isinstance(event, Delta)) == "".join(
        f"{index}," for index in range(count)
    )
    assert events[-1] == DONE
    assert calls >= 3  # three pages (others on this Redis may read meanwhile)
