"""A worker survives every way a job can end: no job's outcome reaches arq's main loop.

Each test runs a real `GatewayWorker` in this process on a real Redis (scripted backend, short
leases), ends a job at one of the points where a job task can end cancelled or raising, and then
checks that the worker's main loop still runs and still completes the next job. Under load the
bench saw workers die from the first of these: a lease renewal that found the job just ended (by
its own terminal event) stopped the job's task while it recorded its outcome.
"""

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError

from api.metrics import render as render_metrics
from cli.embedded_redis import EmbeddedRedis
from cli.status import render as render_status
from shared import stats
from shared.events import EventReader
from shared.jobs import CompletionJob, Delta, Done, Failed, FailureCode, Turn
from shared.jobstore import JobStore
from shared.keys import Channels
from shared.settings import Settings
from shared.status import Snapshot, take_snapshot
from tests.conftest import followed, unit_db
from worker.main import GatewayWorker, build_worker

QUEUE = "test:lifecycle:queue"
Event = Delta | Done | Failed


class Running:
    """A worker in this process, its main loop, and a client for its Redis."""

    def __init__(self, redis_url: str, **settings: Any) -> None:
        self.settings = Settings(
            backend="scripted",
            queue_name=QUEUE,
            lease_s=1.0,
            lease_renew_s=0.05,
            poll_fallback_s=0.2,
            **settings,
        )
        self.worker: GatewayWorker = build_worker(self.settings, redis_url, handle_signals=False)
        self.redis = Redis.from_url(redis_url)
        self.store = JobStore(self.redis, queue_name=QUEUE, ttl_s=600)
        self.reader = EventReader(self.redis)
        self.main = asyncio.create_task(self.worker.main())
        self.worker.main_task = self.main

    async def submit(self, prompt: str) -> str:
        job = CompletionJob(request_id="req_1", model="m", turns=[Turn(role="user", text=prompt)])
        assert await self.store.create(job, owner="test") is None
        return job.id

    async def events(self, job_id: str, within_s: float = 10) -> list[Event]:
        async with asyncio.timeout(within_s):
            return [event async for _, event in followed(self.reader, job_id, idle_timeout_s=within_s)]

    async def assert_serving(self) -> None:
        """The main loop is alive and runs a new job to completion."""
        await asyncio.sleep(0.3)  # several poll iterations: any finished task's result is read
        assert not self.main.done(), f"the worker's main loop ended: {self.main!r}"
        events = await self.events(await self.submit("hello there"))
        assert isinstance(events[-1], Done), events[-1]
        assert not self.main.done()

    async def close(self) -> None:
        if not self.main.done():
            self.worker.handle_sig(signal.SIGTERM)
        await asyncio.wait([self.main])
        await self.worker.close()
        await self.reader.aclose()
        await self.redis.aclose()


def script(**spec: Any) -> str:
    return "script:" + json.dumps(spec)


@pytest.fixture
async def start(redis_server: EmbeddedRedis) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    started: list[Running] = []

    async def start(**settings: Any) -> Running:
        running = Running(unit_db(redis_server), **settings)
        started.append(running)
        await asyncio.sleep(0.2)  # subscribed to wake-ups
        return running

    yield start
    for running in started:
        await running.close()


@pytest.fixture
def held_report(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Holds every job in its last finishing step (the write of its terminal event, which records
    its outcome) once Redis has it, until the event is set."""
    release = asyncio.Event()
    real = JobStore.append

    async def append(self: JobStore, *args: Any, **kwargs: Any) -> None:
        await real(self, *args, **kwargs)
        if kwargs.get("end") is not None:
            await release.wait()

    monkeypatch.setattr(JobStore, "append", append)
    return release


async def test_a_lease_renewal_during_the_finishing_steps_does_not_stop_the_worker(
    start: Callable[..., Awaitable[Running]], held_report: asyncio.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The root cause: a renewal pass takes the running jobs, then renews them one round trip
    # after another. Under load a job ends (its own terminal event ends its record) before the
    # pass reaches it, the renewal answers "superseded", and the worker used to cancel the task
    # that was by then recording the job's outcome: its CancelledError closed the worker.
    real_renew = JobStore.renew

    async def slow_renew(self: JobStore, *args: Any) -> Any:
        await asyncio.sleep(0.15)  # the round trips for the jobs ahead of this one
        return await real_renew(self, *args)

    monkeypatch.setattr(JobStore, "renew", slow_renew)
    running = await start()
    events = await running.events(await running.submit(script(text="a ", tokens=20, delay_ms=10)))
    assert isinstance(events[-1], Done)
    await asyncio.sleep(0.3)  # the passes that began while it ran reach it
    held_report.set()
    await running.assert_serving()


async def test_a_late_cancel_during_the_finishing_steps_does_not_stop_the_worker(
    start: Callable[..., Awaitable[Running]], held_report: asyncio.Event
) -> None:
    running = await start()
    job_id = await running.submit("hello")
    events = await running.events(job_id)
    await running.redis.publish(
        Channels.of(running.redis).cancel, job_id
    )  # a cancel notice that crossed the end
    await asyncio.sleep(0.2)
    held_report.set()
    assert isinstance(events[-1], Done)
    await running.assert_serving()


async def test_a_cancelled_job_ends_cancelled_and_the_worker_serves_on(
    start: Callable[..., Awaitable[Running]],
) -> None:
    running = await start()
    job_id = await running.submit(script(text="a ", tokens=10_000, delay_ms=5))
    async with asyncio.timeout(5):
        async for _ in followed(running.reader, job_id, idle_timeout_s=5):
            break  # it produces
    failure = Failed(code=FailureCode.CANCELLED, message="cancelled by test")
    assert await running.store.stop(job_id, withdraw_only=False, failure=failure) == "cancelling"
    events = await running.events(job_id)
    assert isinstance(events[-1], Failed)
    assert events[-1].code is FailureCode.CANCELLED
    await running.assert_serving()


@pytest.mark.parametrize(
    ("limits", "prompt", "code"),
    [
        ({"stall_timeout_s": 0.3}, script(text="late", wait_ms=3000), FailureCode.STALLED),
        ({"job_timeout_s": 0.5}, script(text="a ", tokens=10_000, delay_ms=5), FailureCode.TIMEOUT),
        ({}, script(text="a ", tokens=5, fail_after=2), FailureCode.UPSTREAM_ERROR),
    ],
    ids=["stall", "wall-clock", "backend-error"],
)
async def test_a_job_over_a_limit_fails_and_the_worker_serves_on(
    start: Callable[..., Awaitable[Running]], limits: dict[str, float], prompt: str, code: FailureCode
) -> None:
    running = await start(**limits)
    events = await running.events(await running.submit(prompt))
    assert isinstance(events[-1], Failed)
    assert events[-1].code is code
    await running.assert_serving()


async def test_a_job_whose_lease_is_lost_stops_quietly_and_the_worker_serves_on(
    start: Callable[..., Awaitable[Running]],
) -> None:
    running = await start()
    job_id = await running.submit(script(text="a ", tokens=10_000, delay_ms=5))
    async with asyncio.timeout(5):
        async for _ in followed(running.reader, job_id, idle_timeout_s=5):
            break
    # A sweep takes the job over, as if this worker had stopped renewing: this one, or the worker's
    # own, which runs every 50 ms and may get there first.
    await running.store.expire_lease(job_id, 1)
    assert await running.store.recover_expired(max_attempts=3, lease_s=10) in ([(job_id, "failed")], [])
    events = await running.events(job_id)
    assert isinstance(events[-1], Failed)
    assert events[-1].code is FailureCode.WORKER_LOST
    await running.assert_serving()


@pytest.mark.parametrize("error", [RedisConnectionError("gone"), OSError("reset"), RuntimeError("bug")])
async def test_an_error_removing_the_arq_keys_does_not_stop_the_worker(
    start: Callable[..., Awaitable[Running]], monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    # The step of its own that an attempt without a terminal event of its own takes (here: one
    # superseded after its lease was lost).
    running = await start()
    failures = [error]
    real = JobStore.finish_attempt

    async def finish_attempt(self: JobStore, *args: Any) -> None:
        if failures:
            raise failures.pop()
        await real(self, *args)

    monkeypatch.setattr(JobStore, "finish_attempt", finish_attempt)
    job_id = await running.submit(script(text="a ", tokens=10_000, delay_ms=5))
    async with asyncio.timeout(5):
        async for _ in followed(running.reader, job_id, idle_timeout_s=5):
            break
    await running.store.expire_lease(job_id, 1)  # the worker's own sweep fails the job
    events = await running.events(job_id)
    assert isinstance(events[-1], Failed)
    assert events[-1].code is FailureCode.WORKER_LOST
    await running.assert_serving()
    assert not failures  # the step did fail


async def test_an_outcome_the_totals_cannot_take_does_not_fail_the_job(
    start: Callable[..., Awaitable[Running]], caplog: pytest.LogCaptureFixture
) -> None:
    running = await start()
    await running.redis.set(stats.STATS_KEY, "not a hash")
    job_id = await running.submit("hello")
    events = await running.events(job_id)
    assert isinstance(events[-1], Done)
    await asyncio.sleep(0.1)
    assert f"could not record the outcome of job {job_id}" in caplog.text
    await running.redis.delete(stats.STATS_KEY)
    await running.assert_serving()
    assert (await stats.read_stats(running.redis)).jobs == {"completed": 1}


async def test_the_queue_poll_claims_an_attempt_another_worker_runs_only_once(
    start: Callable[..., Awaitable[Running]], monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start()
    claims: list[str] = []
    real = JobStore.claim

    async def claim(self: JobStore, job_id: str, *args: Any, **kwargs: Any) -> Any:
        claims.append(job_id)
        return await real(self, job_id, *args, **kwargs)

    monkeypatch.setattr(JobStore, "claim", claim)
    running.worker.allow_pick_jobs = False  # another worker takes it, as if it came first
    job_id = await running.submit("hello")
    assert await running.store.claim(job_id, 1, worker_id="other", in_progress_ms=10_000, lease_s=10)
    await asyncio.sleep(0.3)  # its wake-ups are passed on and ignored meanwhile
    claims.clear()
    running.worker.allow_pick_jobs = True
    await asyncio.sleep(5 * running.settings.poll_fallback_s)  # it stays in arq's queue: polled 5 times
    assert claims == [job_id]


async def test_a_claim_that_redis_refuses_gives_its_slot_back(
    start: Callable[..., Awaitable[Running]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an outside probe: each claim refused by a full Redis kept its slot for good, and
    after JOBS_PER_WORKER of them the worker ran nothing, though it looked healthy."""
    running = await start()
    running.worker.allow_pick_jobs = False  # this test claims the attempts itself
    real = JobStore.claim

    async def full(self: JobStore, *args: Any, **kwargs: Any) -> Any:
        raise OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")

    monkeypatch.setattr(JobStore, "claim", full)
    job_id = await running.submit("hello")
    for _ in range(running.settings.jobs_per_worker + 1):
        with pytest.raises(OutOfMemoryError):
            await running.worker.start_jobs([f"{job_id}.1".encode()])
    monkeypatch.setattr(JobStore, "claim", real)
    running.worker.allow_pick_jobs = True
    async with asyncio.timeout(10):
        events = await running.events(job_id)
    assert isinstance(events[-1], Done)
    await running.assert_serving()


async def test_a_job_placed_on_a_worker_that_takes_no_more_wakes_every_worker(
    start: Callable[..., Awaitable[Running]],
) -> None:
    running = await start()
    running.worker.allow_pick_jobs = False  # as while it drains on SIGTERM
    everyone = running.redis.pubsub()
    await everyone.subscribe(Channels.of(running.redis).wakeup)
    assert await everyone.get_message(timeout=1) is not None
    job_id = await running.submit("hello")  # placed on it: the only live worker
    assert (
        await running.redis.hget(f"gateway:job:{job_id}", "routed")
        == running.worker.heartbeat.worker_id.encode()
    )
    message = await everyone.get_message(timeout=2)
    assert message is not None
    assert message["data"] == f"{job_id}.1".encode()
    await everyone.aclose()
    running.worker.allow_pick_jobs = True


async def test_an_attempt_cancelled_before_it_began_is_handed_back(
    start: Callable[..., Awaitable[Running]],
) -> None:
    running = await start()
    running.worker.allow_pick_jobs = False  # this test claims the attempt itself
    job_id = await running.submit("hello")
    await running.worker.start_jobs([f"{job_id}.1".encode()])
    running.worker.tasks[f"{job_id}.1"].cancel()  # as a shutdown would, before the task first ran
    running.worker.allow_pick_jobs = True
    events = await running.events(job_id)  # handed back, then run again as attempt 2
    assert isinstance(events[-1], Done)
    record = await running.store.get(job_id)
    assert record is not None
    assert record.attempt == 2
    await running.assert_serving()


async def test_shutdown_with_running_jobs_closes_the_worker_cleanly(
    start: Callable[..., Awaitable[Running]],
) -> None:
    running = await start(drain_timeout_s=0)
    talking = await running.submit(script(text="a ", tokens=10_000, delay_ms=5))
    silent = await running.submit(script(text="late", wait_ms=10_000))
    async with asyncio.timeout(5):
        async for _ in followed(running.reader, talking, idle_timeout_s=5):
            break
    async with asyncio.timeout(5):
        while not (record := await running.store.get(silent)) or not record.started:
            await asyncio.sleep(0.02)  # the silent one has started too
    running.worker.handle_sig_wait_for_completion(signal.SIGTERM)
    with contextlib.suppress(asyncio.CancelledError):
        await running.main
    # What arq's close() does first when it handles signals; it used to raise the job tasks'
    # CancelledError.
    await asyncio.gather(*running.worker.tasks.values())
    await running.worker.close()
    events = await running.events(talking)
    assert isinstance(events[-1], Failed)
    assert events[-1].code is FailureCode.WORKER_SHUTDOWN
    record = await running.store.get(silent)
    assert record is not None
    assert (record.attempt, record.ended) == (2, None)  # handed back: queued for another worker


async def _exits_shown(running: Running) -> tuple[Snapshot, str, str]:
    snapshot = await take_snapshot(running.redis, QUEUE)
    return snapshot, render_status(snapshot), render_metrics(snapshot).decode()


async def test_an_error_that_ends_the_main_loop_is_logged_counted_and_shown(
    start: Callable[..., Awaitable[Running]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = await start()

    async def broken() -> None:
        raise RuntimeError("the loop broke")

    monkeypatch.setattr(running.worker, "heart_beat", broken)
    with pytest.raises(RuntimeError):
        async with asyncio.timeout(5):
            await running.main
    worker_id = running.worker.heartbeat.worker_id
    assert f"worker {worker_id} exits: error (RuntimeError: the loop broke)" in caplog.text
    snapshot, status, metrics = await _exits_shown(running)
    [gone] = snapshot.recent_worker_exits
    assert (gone.worker_id, gone.reason, gone.detail) == (worker_id, "error", "RuntimeError: the loop broke")
    assert f"error      {worker_id} RuntimeError: the loop broke" in status
    assert 'gateway_worker_exits_total{reason="error"} 1.0' in metrics


async def test_a_signal_that_stops_the_worker_is_logged_counted_and_shown(
    start: Callable[..., Awaitable[Running]], caplog: pytest.LogCaptureFixture
) -> None:
    running = await start(drain_timeout_s=0)
    running.worker.handle_sig_wait_for_completion(signal.SIGTERM)
    with pytest.raises(asyncio.CancelledError):
        await running.main
    worker_id = running.worker.heartbeat.worker_id
    assert f"worker {worker_id} exits: shutdown (SIGTERM)" in caplog.text
    snapshot, status, metrics = await _exits_shown(running)
    assert [(g.worker_id, g.reason) for g in snapshot.recent_worker_exits] == [(worker_id, "shutdown")]
    assert f"shutdown   {worker_id} SIGTERM" in status
    assert 'gateway_worker_exits_total{reason="shutdown"} 1.0' in metrics
