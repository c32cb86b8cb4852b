"""Where and when queued jobs run, on a real Redis and worker processes: a burst is spread over
the workers instead of filling the first one to wake; when every slot is busy, queued jobs start
in the order they came, whichever caller sent them (a caller's share is bounded by the per-key
job cap, tested in tests/test_access.py)."""

import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from cli.embedded_redis import EmbeddedRedis
from shared import heartbeats, stats
from shared.heartbeats import Heartbeat, worker_key
from shared.jobs import (
    CompletionJob,
    Done,
    Failed,
    FailureCode,
    FinishReason,
    SessionRef,
    Turn,
    Usage,
    encode_event,
)
from shared.jobstore import PUSH_LIMIT_BYTES, AttemptEnd, Claimed, JobStore
from shared.keys import WORKER_LOAD, Channels, attempt_id
from tests.conftest import Gateway, chat, unit_db
from tests.test_operations import wait_for

DONE = Done(finish_reason=FinishReason.STOP, usage=Usage(prompt_tokens=1, completion_tokens=3))
SLOW = "script:" + json.dumps({"text": "x ", "tokens": 80, "delay_ms": 25})  # 2 s: outlasts a loaded moment


@pytest.fixture(scope="module")
def pair(start_gateway: Any) -> Gateway:
    gateway: Gateway = start_gateway(workers=2, BACKEND="scripted")
    return gateway


def worker_of(gateway: Gateway, completion_id: str) -> str:
    worker = gateway.redis().hget(f"gateway:job:{completion_id.removeprefix('chatcmpl-')}", "worker")
    assert worker is not None
    return str(worker.decode())


def burst(gateway: Gateway, jobs: int) -> list[str]:
    """Sends `jobs` requests at once; returns the worker that ran each."""

    def one(_: int) -> str:
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(SLOW), timeout=30)
        assert response.status_code == 200, response.text
        return worker_of(gateway, response.json()["id"])

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, range(jobs)))


def test_a_burst_is_spread_over_the_workers(pair: Gateway) -> None:
    burst(pair, 1)  # both workers are up and have heard each other's heartbeat
    splits = [sorted(Counter(burst(pair, 4)).values()) for _ in range(5)]
    # Every burst is split evenly (before placement, a burst could all go to the first worker to
    # wake): each job counts in its worker's load from its creation.
    assert splits == [[2, 2]] * 5, splits


KEY_A, KEY_B = "caller-a-" + "a" * 32, "caller-b-" + "b" * 32


@pytest.fixture(scope="module")
def one_slot(start_gateway: Any) -> Gateway:
    gateway: Gateway = start_gateway(
        workers=1, BACKEND="scripted", JOBS_PER_WORKER="1", API_KEYS=f"{KEY_A},{KEY_B}"
    )
    return gateway


def jobs_created(gateway: Gateway) -> int:
    """Job records in the gateway's database (`gateway:job:<id>`; they outlive their jobs)."""
    return sum(1 for key in gateway.redis().scan_iter("gateway:job:*") if key.count(b":") == 2)


def test_queued_jobs_start_in_order_whichever_caller_sent_them(one_slot: Gateway) -> None:
    """Caller A queues three jobs, then B one, then A another: B's starts before A's last."""
    callers = [KEY_A, KEY_A, KEY_A, KEY_B, KEY_A]
    first_token: dict[int, float] = {}

    def stream(index: int, key: str) -> None:
        body = {**chat(SLOW), "stream": True}
        headers = {"Authorization": f"Bearer {key}"}
        url = f"{one_slot.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if index not in first_token and '"content":"x' in line:
                    first_token[index] = time.monotonic()

    threads = []
    created = jobs_created(one_slot)
    for index, key in enumerate(callers):
        threads.append(threading.Thread(target=stream, args=(index, key)))
        threads[-1].start()
        # Queued in this order (each send waits for the one before it to be queued); the first
        # job runs meanwhile, for ~2 s.
        created += 1
        wait_for(lambda done=created: jobs_created(one_slot) >= done, 20, f"job {index} queued")
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(first_token, key=first_token.__getitem__) == list(range(len(callers)))


def test_a_queued_job_is_not_overtaken_by_jobs_sent_after_it(one_slot: Gateway) -> None:
    """Found by an outside probe: with callers sending job after job, a job queued behind them
    waited until its queue timeout while later ones ran (each new job went straight to the slot
    that had just freed). Caller A keeps the one slot busy from two loops; B's job, queued
    meanwhile, starts before every job A sends after it."""
    quick = "script:" + json.dumps({"text": "x ", "tokens": 12, "delay_ms": 25})
    sent: dict[str, float] = {}  # each job's name -> when its request was sent
    first_token: dict[str, float] = {}
    stop = threading.Event()

    def stream(name: str, key: str) -> None:
        body = {**chat(quick), "stream": True}
        headers = {"Authorization": f"Bearer {key}"}
        sent[name] = time.monotonic()
        with httpx.stream(
            "POST", f"{one_slot.url}/v1/chat/completions", json=body, headers=headers, timeout=60
        ) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if name not in first_token and '"content":"x' in line:
                    first_token[name] = time.monotonic()

    def loop(index: int) -> None:
        for turn in range(40):
            if stop.is_set():
                return
            stream(f"a{index}.{turn}", KEY_A)

    loops = [threading.Thread(target=loop, args=(index,)) for index in range(2)]
    for thread in loops:
        thread.start()
    time.sleep(1.0)  # the loops have the slot and the queue busy
    created = jobs_created(one_slot)
    polite = threading.Thread(target=stream, args=("b", KEY_B))
    polite.start()
    wait_for(lambda: jobs_created(one_slot) > created, 20, "B's job queued")
    queued = time.monotonic()
    polite.join(timeout=60)
    time.sleep(1.0)  # jobs sent after B's have had their turns
    stop.set()
    for thread in loops:
        thread.join(timeout=60)
    later = [name for name, at in sent.items() if name[0] == "a" and at > queued and name in first_token]
    assert later, "no job was sent after B's while it waited"
    assert "b" in first_token
    overtook = [name for name in later if first_token[name] < first_token["b"]]
    assert not overtook, f"sent after B's job, started before it: {overtook}"


# --- the job store's placement, on a real Redis ------------------------------------------------


@pytest.fixture
def store(redis: Redis) -> JobStore:
    return JobStore(redis, queue_name="test:queue", ttl_s=60)


@pytest.fixture
async def listening(redis: Redis) -> AsyncIterator[Callable[..., Awaitable[None]]]:
    """Makes workers listen on their own wake-up channels, as running workers do."""
    pubsub = redis.pubsub()

    async def listen(*workers: str) -> None:
        await pubsub.subscribe(*(Channels.of(redis).worker_wakeup(worker) for worker in workers))
        for _ in workers:  # subscribed once Redis confirms
            assert await pubsub.get_message(timeout=1) is not None

    yield listen
    await pubsub.aclose()


async def _subscribed(redis: Redis, channel: str) -> Any:
    """A subscription to `channel`, once Redis confirms it (e.g. a worker's pushed jobs)."""
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    assert await pubsub.get_message(timeout=1) is not None
    return pubsub


async def _workers(redis: Redis, slots: int = 4, **running: int) -> None:
    """Live workers (heartbeat keys) with these running jobs and `slots` slots each."""
    for worker, jobs in running.items():
        await redis.set(worker_key(worker), "{}", px=60_000)
        await redis.hset(WORKER_LOAD, mapping={worker: jobs, f"{worker}:slots": slots})


async def _queued(store: JobStore, text: str = "hi", waits: float | None = None) -> str:
    job = CompletionJob(request_id="req_1", model="m", turns=[Turn(role="user", text=text)])
    assert await store.create(job, owner="test", queue_timeout_s=waits) is None
    return job.id


async def _routed(redis: Redis, job_id: str) -> str | None:
    routed = await redis.hget(f"gateway:job:{job_id}", "routed")
    return None if routed is None else routed.decode()


async def _load(redis: Redis, worker: str) -> int:
    """The jobs `worker` runs or was chosen to run."""
    running, routed = await redis.hmget(WORKER_LOAD, [worker, f"{worker}:routed"])  # type: ignore[misc]
    return int(running or 0) + int(routed or 0)


async def _claim(store: JobStore, job_id: str, worker: str) -> Claimed | None:
    return await store.claim(job_id, 1, worker_id=worker, in_progress_ms=10_000, lease_s=10)


async def test_a_burst_alternates_between_the_least_loaded_workers(
    redis: Redis, store: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    await _workers(redis, a=0, b=0, c=2)
    await listening("a", "b", "c")
    routed = [await _routed(redis, await _queued(store)) for _ in range(7)]
    # Each job counts in its worker's load from its creation, before any claim.
    assert sorted(routed[:2]) == ["a", "b"]
    assert sorted(routed[2:4]) == ["a", "b"]
    assert sorted(routed[4:]) == ["a", "b", "c"]
    assert [await _load(redis, w) for w in "abc"] == [3, 3, 3]


async def test_a_job_wakes_only_the_worker_chosen_to_run_it(
    redis: Redis, store: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    await _workers(redis, busy=3, idle=1)
    await listening("busy", "idle")
    everyone = await _subscribed(redis, store.channels.wakeup)
    job_id = await _queued(store)
    assert await _routed(redis, job_id) == "idle"
    assert await everyone.get_message(timeout=0.2) is None  # no other worker heard of it
    await everyone.aclose()


async def test_every_worker_is_woken_when_none_can_be_chosen(
    redis: Redis, store: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    # "full" has no free slot, "dead" no heartbeat, "old" does not listen on a channel of its own.
    await _workers(redis, full=4, old=0)
    await redis.hset(WORKER_LOAD, mapping={"dead": 0, "dead:slots": 4})
    await listening("full", "dead")
    everyone = await _subscribed(redis, store.channels.wakeup)
    job_id = await _queued(store)
    message = await everyone.get_message(timeout=1)
    assert message is not None
    assert message["data"] == f"{job_id}.1".encode()
    assert await _routed(redis, job_id) is None
    assert (await _load(redis, "full"), await _load(redis, "old")) == (4, 0)
    assert not await redis.hexists(WORKER_LOAD, "dead")  # forgotten
    await everyone.aclose()
    assert isinstance(await _claim(store, job_id, "old"), Claimed)  # the first to claim it
    assert await _load(redis, "old") == 1


async def test_a_gateway_on_another_database_of_the_server_hears_none_of_its_notices(
    redis: Redis, store: JobStore, redis_server: EmbeddedRedis
) -> None:
    """Keys live in a database, pub/sub channels are server-wide: each database's are its own."""
    other = Redis.from_url(unit_db(redis_server))
    theirs = other.pubsub()
    await theirs.subscribe(Channels.of(other).wakeup, Channels.of(other).cancel)
    ours = redis.pubsub()
    await ours.subscribe(store.channels.wakeup, store.channels.cancel)
    for _ in range(2):  # subscribed once Redis confirms
        assert await theirs.get_message(timeout=1) is not None
        assert await ours.get_message(timeout=1) is not None
    await _workers(redis, full=4)  # no free slot: every worker is told of a new job

    job_id = await _queued(store)
    assert isinstance(await _claim(store, job_id, "spare"), Claimed)  # a worker the store counts no slots of
    cancelled = Failed(code=FailureCode.CANCELLED, message="cancelled")
    assert await store.stop(job_id, withdraw_only=False, failure=cancelled) == "cancelling"

    heard = [await ours.get_message(timeout=1) for _ in range(2)]
    assert [(m["channel"], m["data"]) for m in heard if m] == [
        (store.channels.wakeup.encode(), f"{job_id}.1".encode()),
        (store.channels.cancel.encode(), job_id.encode()),
    ]
    assert await theirs.get_message(timeout=0.3) is None
    await theirs.aclose()
    await ours.aclose()
    await other.aclose()


async def test_a_job_claimed_by_another_worker_moves_to_its_load(
    redis: Redis, store: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    await _workers(redis, a=0, b=1)
    await listening("a", "b")
    job_id = await _queued(store)
    assert await _load(redis, "a") == 1
    assert isinstance(await _claim(store, job_id, "b"), Claimed)  # its fallback poll came first
    assert (await _load(redis, "a"), await _load(redis, "b")) == (0, 2)
    assert await _claim(store, job_id, "a") == "taken"
    other = await _queued(store)
    assert isinstance(await _claim(store, other, "a"), Claimed)  # the chosen one: counted once
    assert await _load(redis, "a") == 1


async def test_a_job_withdrawn_before_it_starts_leaves_its_workers_load(
    redis: Redis, store: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    await _workers(redis, only=0)
    await listening("only")
    job_id = await _queued(store)
    assert await _load(redis, "only") == 1
    failure = Failed(code=FailureCode.QUEUE_TIMEOUT, message="nobody took it")
    assert await store.stop(job_id, withdraw_only=True, failure=failure) == "stopped"
    assert await _load(redis, "only") == 0


async def test_a_retried_job_is_placed_again(
    redis: Redis, store: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    await _workers(redis, lost=0, other=1)
    await listening("lost", "other")
    job_id = await _queued(store)
    assert isinstance(await _claim(store, job_id, "lost"), Claimed)
    await redis.delete(worker_key("lost"))  # it died without output: its lease runs out
    await store.expire_lease(job_id, 1)
    assert await store.recover_expired(max_attempts=3, lease_s=10) == [(job_id, "retried")]
    assert await _routed(redis, job_id) == "other"
    assert await _load(redis, "other") == 2
    assert isinstance(
        await store.claim(job_id, 2, worker_id="other", in_progress_ms=10_000, lease_s=10), Claimed
    )
    assert await _load(redis, "other") == 2


async def test_the_end_of_an_attempt_takes_it_off_its_workers_load(
    redis: Redis, store: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    await _workers(redis, only=0)
    await listening("only")
    superseded, ended = await _queued(store), await _queued(store)
    for job_id in (superseded, ended):
        assert isinstance(await _claim(store, job_id, "only"), Claimed)
    assert await _load(redis, "only") == 2
    # An attempt that wrote no terminal event (here: superseded) takes one round trip of its own.
    await store.finish_attempt(attempt_id(superseded, 1), "only")
    assert await _load(redis, "only") == 1
    assert not await redis.zscore("test:queue", attempt_id(superseded, 1))
    # One that did, with it.
    record = stats.JobRecord(
        job_id=ended,
        request_id="req_1",
        worker_id="only",
        outcome="completed",
        queue_wait_s=0.1,
        duration_s=1,
    )
    end = AttemptEnd("only", record, failures_kept=10)
    await store.append(ended, 1, 1, [encode_event(DONE)], outcome="completed", ttl_s=60, end=end)
    assert await _load(redis, "only") == 0
    assert not await redis.zscore("test:queue", attempt_id(ended, 1))
    assert not await redis.exists(f"arq:in-progress:{attempt_id(ended, 1)}")
    assert (await stats.read_stats(redis)).jobs == {"completed": 1}


# --- pushed jobs: claimed by the create script for the worker it chose ----------------------------


@pytest.fixture
def pushing(redis: Redis) -> JobStore:
    return JobStore(redis, queue_name="test:queue", ttl_s=60, push_lease_s=10)


async def test_a_new_job_is_pushed_claimed_to_the_worker_chosen_for_it(
    redis: Redis, pushing: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    await _workers(redis, busy=2, idle=0)
    await listening("busy", "idle")
    pushes = await _subscribed(redis, pushing.channels.worker_push("idle"))
    before = int(time.time() * 1000)
    job_id = await _queued(pushing, "pushed whole")
    message = await pushes.get_message(timeout=1)
    assert message is not None
    pushed_id, attempt, claimed = JobStore.pushed(message["data"])
    assert (pushed_id, attempt) == (job_id, 1)
    assert claimed.job.turns[0].text == "pushed whole"
    assert claimed.cancelled is None
    assert before <= claimed.score <= int(time.time() * 1000)
    # Claimed in its name: counted as running there (not as routed), leased, and taken for any other.
    assert await redis.hget(f"gateway:job:{job_id}", "worker") == b"idle"
    assert await _routed(redis, job_id) is None
    assert await redis.hmget(WORKER_LOAD, ["idle", "idle:routed"]) == [b"1", None]  # type: ignore[misc]
    lease = await redis.zscore("gateway:running", job_id)
    assert lease is not None
    assert before + 9_000 <= lease <= before + 11_000
    assert await _claim(pushing, job_id, "busy") == "taken"
    await redis.delete(f"arq:in-progress:{attempt_id(job_id, 1)}")  # its mark ran out: still taken
    assert await _claim(pushing, job_id, "busy") == "taken"
    await pushes.aclose()


async def test_a_job_is_woken_for_instead_when_too_large_or_its_worker_takes_no_pushes(
    redis: Redis, pushing: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    await _workers(redis, only=0)
    await listening("only")  # its wake-up channel, not the pushes' (an earlier version)
    job_id = await _queued(pushing)
    assert await _routed(redis, job_id) == "only"
    assert await redis.hget(f"gateway:job:{job_id}", "worker") is None
    pushes = await _subscribed(redis, pushing.channels.worker_push("only"))
    large = await _queued(pushing, "x" * PUSH_LIMIT_BYTES)
    assert await pushes.get_message(timeout=0.3) is None
    assert await _routed(redis, large) == "only"
    assert isinstance(await _claim(pushing, large, "only"), Claimed)
    await pushes.aclose()


async def test_a_declined_push_goes_to_every_worker(
    redis: Redis, pushing: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    await _workers(redis, stopping=0, other=1)
    await listening("stopping", "other")
    pushes = await _subscribed(redis, pushing.channels.worker_push("stopping"))
    everyone = await _subscribed(redis, pushing.channels.wakeup)
    job_id = await _queued(pushing)
    assert await pushes.get_message(timeout=1) is not None
    assert not await pushing.decline(job_id, 1, "other")  # not pushed to that one
    assert await pushing.decline(job_id, 1, "stopping")
    message = await everyone.get_message(timeout=1)
    assert message is not None
    assert message["data"] == f"{job_id}.1".encode()
    assert await _load(redis, "stopping") == 0
    assert await redis.zscore("gateway:running", job_id) is None
    assert not await pushing.decline(job_id, 1, "stopping")  # once
    assert isinstance(await _claim(pushing, job_id, "other"), Claimed)
    assert await _load(redis, "other") == 2
    await pushes.aclose()
    await everyone.aclose()


def test_a_pushed_job_this_version_cannot_read_is_named_for_giving_back() -> None:
    job_id = "a" * 32
    assert JobStore.pushed(f"{job_id}.2 1700000000000 {{}}".encode()) == (job_id, 2, None)


async def _ended(store: JobStore, job_id: str, worker: str) -> None:
    """The attempt's terminal event written by `worker`, as a worker ends a job."""
    record = stats.JobRecord(
        job_id=job_id, request_id="req_1", worker_id=worker, outcome="completed", queue_wait_s=0, duration_s=1
    )
    end = AttemptEnd(worker, record, failures_kept=10)
    await store.append(job_id, 1, 1, [encode_event(DONE)], outcome="completed", ttl_s=60, end=end)


async def test_a_freed_slot_takes_the_oldest_waiting_job_and_new_ones_queue_behind_it(
    redis: Redis, pushing: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    """Found by an outside probe: a new job took a slot that had just freed while older jobs waited
    (they could wait until their queue timeout). Jobs that find no free slot form a line; the end of
    an attempt hands the line's first job to the slot it frees; a new job joins the line while
    anyone waits, even if a slot is free, and every worker is told of the line's first job."""
    await _workers(redis, slots=1, only=0)
    await listening("only")
    pushes = await _subscribed(redis, pushing.channels.worker_push("only"))
    everyone = await _subscribed(redis, pushing.channels.wakeup)

    async def pushed() -> str:
        message = await pushes.get_message(timeout=1)
        assert message is not None
        return JobStore.pushed(message["data"])[0]

    running = await _queued(pushing, "running")
    assert await pushed() == running
    first, second = await _queued(pushing, "first"), await _queued(pushing, "second")
    woken = [await everyone.get_message(timeout=1) for _ in range(2)]
    assert [m["data"] for m in woken if m is not None] == [f"{first}.1".encode()] * 2  # the line's first
    await _ended(pushing, running, "only")
    assert await pushed() == first  # pushed to the freed slot, claimed there
    assert await redis.hget(f"gateway:job:{first}", "worker") == b"only"
    assert await _load(redis, "only") == 1
    # A slot this store did not count on (a new worker) does not let a new job pass the line.
    await _workers(redis, slots=1, fresh=0)
    third = await _queued(pushing, "third")
    assert await _routed(redis, third) is None
    assert await redis.hget(f"gateway:job:{third}", "worker") is None
    message = await everyone.get_message(timeout=1)
    assert message is not None
    assert message["data"] == f"{second}.1".encode()
    await _ended(pushing, first, "only")
    assert await pushed() == second
    await _ended(pushing, second, "only")
    assert await pushed() == third
    assert await redis.zcard("gateway:waiting") == 0
    await pushes.aclose()
    await everyone.aclose()


async def test_the_line_forgets_jobs_withdrawn_from_it_and_keeps_a_declined_ones_place(
    redis: Redis, pushing: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    await _workers(redis, slots=1, only=1, other=1)
    await listening("only", "other")
    pushes = {w: await _subscribed(redis, pushing.channels.worker_push(w)) for w in ("only", "other")}

    async def pushed(worker: str) -> str:
        message = await pushes[worker].get_message(timeout=1)
        assert message is not None
        return JobStore.pushed(message["data"])[0]

    withdrawn, kept, behind = [
        await _queued(pushing, text, waits=60) for text in ("withdrawn", "kept", "behind")
    ]
    failure = Failed(code=FailureCode.QUEUE_TIMEOUT, message="late")
    assert await pushing.stop(withdrawn, withdraw_only=True, failure=failure) == "stopped"
    unknown = attempt_id("0" * 32, 1)  # an attempt that ran on the worker and wrote no end
    await pushing.finish_attempt(unknown, "only")
    assert await pushed("only") == kept  # the line's first, the withdrawn one gone from it
    assert await redis.zscore("gateway:queue:deadlines", kept) is None  # started: no deadline
    # Given back by a worker that stops, it goes back to its place in the line, ahead of `behind`,
    # with its deadline.
    assert await pushing.decline(kept, 1, "only")
    queued = await redis.zscore("test:queue", f"{kept}.1")
    assert await redis.zscore("gateway:queue:deadlines", kept) == queued + 60_000
    await pushing.finish_attempt(unknown, "other")
    assert await pushed("other") == kept
    assert [m.decode() for m in await redis.zrange("gateway:waiting", 0, -1)] == [f"{behind}.1"]
    for pubsub in pushes.values():
        await pubsub.aclose()


async def test_a_claim_never_takes_a_slot_the_store_counted_for_a_push(
    redis: Redis, pushing: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    """Found by a re-check probe: a worker of one slot ran two jobs at once, a job pushed to it for
    the slot that had freed and one it claimed itself in that moment (a session's turn, which
    went by its own path). A claim that would fill a worker's slots past their count is refused."""
    await _workers(redis, slots=1, only=0)
    await listening("only")
    await _queued(pushing, "pushed")  # counted in the worker's one slot
    assert await _load(redis, "only") == 1
    queued = await _queued(pushing, "queued")  # in the line
    assert await _claim(pushing, queued, "only") == "full"
    assert await redis.hget(f"gateway:job:{queued}", "worker") is None
    assert await redis.zscore("gateway:waiting", f"{queued}.1") is not None


async def test_a_sessions_turn_joins_the_line_when_anyone_waits(
    redis: Redis, listening: Callable[..., Awaitable[None]]
) -> None:
    """Found by a re-check probe: a session's turn, offered to the worker holding its workspace,
    never joined the line, and waited behind hundreds of later jobs until its queue timeout."""
    store = JobStore(redis, queue_name="test:queue", ttl_s=60, affinity_s=5, push_lease_s=10)
    await _workers(redis, slots=1, holder=1)
    await listening("holder")
    waiting = await _queued(store, "waiting")
    session = SessionRef(owner="0" * 32, id="s", history_len=0, transcript_id="t", holder="holder")
    turn = CompletionJob(request_id="r", model="m", turns=[Turn(role="user", text="turn")], session=session)
    assert await store.create(turn, owner="test") is None
    assert await redis.hget(f"gateway:job:{turn.id}", "prefer") is None  # not offered: in line
    line = [m.decode() for m in await redis.zrange("gateway:waiting", 0, -1)]
    assert line == [f"{waiting}.1", f"{turn.id}.1"]


async def test_a_retried_job_keeps_its_place_in_line(
    redis: Redis, pushing: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    """Found by a re-check probe: a job retried after its worker was lost went to the back of the
    line, behind every job sent after it."""
    await _workers(redis, slots=1, only=0)
    await listening("only")
    pushes = await _subscribed(redis, pushing.channels.worker_push("only"))
    running = await _queued(pushing, "running")
    first, second = await _queued(pushing, "first"), await _queued(pushing, "second")
    await _ended(pushing, running, "only")  # `first` is pushed to the freed slot
    assert await redis.hget(f"gateway:job:{first}", "worker") == b"only"
    await pushing.expire_lease(first, 1)  # its worker is lost before any output
    assert await pushing.recover_expired(max_attempts=3, lease_s=10) == [(first, "retried")]
    line = [m.decode() for m in await redis.zrange("gateway:waiting", 0, -1)]
    assert line == [f"{first}.2", f"{second}.1"]
    await pushes.aclose()


async def test_a_job_routed_to_a_worker_that_stops_goes_back_to_its_place(
    redis: Redis, pushing: JobStore, listening: Callable[..., Awaitable[None]]
) -> None:
    """Found by a re-check probe: a job too large to push, routed to a worker that was stopping,
    left the line and was overtaken; and a routed count decremented for a worker already forgotten
    came back as -1 for good."""
    await _workers(redis, slots=1, stopping=0)
    await listening("stopping")  # its wake-ups only: jobs are routed to it, not pushed
    large = await _queued(pushing, "x" * PUSH_LIMIT_BYTES)
    assert await _routed(redis, large) == "stopping"
    behind = await _queued(pushing, "behind")
    assert not await pushing.decline(large, 1, "stopping")  # not pushed there
    assert await pushing.decline(large, 1, "stopping", "routed")
    assert await _routed(redis, large) is None
    assert await _load(redis, "stopping") == 0
    line = [m.decode() for m in await redis.zrange("gateway:waiting", 0, -1)]
    assert line == [f"{large}.1", f"{behind}.1"]
    # Routed again, to a worker then forgotten (its heartbeat expired): claimed by another, no
    # count is left for the forgotten one.
    await redis.zrem("gateway:waiting", f"{large}.1", f"{behind}.1")
    await redis.hset(f"gateway:job:{large}", "routed", "gone")
    await _workers(redis, slots=2, other=0)
    assert isinstance(await _claim(pushing, large, "other"), Claimed)
    assert not await redis.hexists(WORKER_LOAD, "gone:routed")
    # Claimed, it is the claimant's to run: a routed wake-up it handles late gives nothing back.
    await redis.hset(f"gateway:job:{large}", "routed", "other")
    assert not await pushing.decline(large, 1, "other", "routed")
    assert await redis.hget(f"gateway:job:{large}", "worker") == b"other"


async def test_an_idle_workers_counts_are_reset_only_when_unchanged_for_a_beat(redis: Redis) -> None:
    """Found by a re-check probe: a worker that found itself idle reset its counts on its next beat,
    wiping a job placed on it meanwhile; the store then counted a slot it did not have, and a
    worker of 2 slots ran 3 jobs. Counts unchanged over a whole idle beat are drift, and reset."""
    beat = Heartbeat(id="w", host="h", pid=1, started=0, beat=0, slots=2, jobs=[])
    await redis.hset(WORKER_LOAD, "w", 1)  # drift: a push lost with a connection
    await heartbeats.beat(redis, beat, ttl_s=10, load=True, idle=True)
    assert await redis.hget(WORKER_LOAD, "w") == b"1"  # not yet
    await heartbeats.beat(redis, beat, ttl_s=10, load=True, idle=True)
    assert await redis.hget(WORKER_LOAD, "w") == b"0"  # the same over a beat: reset
    await heartbeats.beat(redis, beat, ttl_s=10, load=True, idle=True)
    await redis.hincrby(WORKER_LOAD, "w", 1)  # a job pushed after the worker found itself idle
    await heartbeats.beat(redis, beat, ttl_s=10, load=True, idle=True)
    assert await redis.hget(WORKER_LOAD, "w") == b"1"  # kept
    await heartbeats.beat(redis, beat, ttl_s=10, load=True, idle=False)
    assert not await redis.hexists(WORKER_LOAD, "w:idle")


async def test_a_sessions_turn_offered_to_its_worker_is_first_in_line_meanwhile(
    redis: Redis, listening: Callable[..., Awaitable[None]]
) -> None:
    """Found by a re-check probe: a turn offered to the worker holding its workspace while another
    slot was free lost that slot to a later job during the offer, then waited behind the line."""
    store = JobStore(redis, queue_name="test:queue", ttl_s=60, affinity_s=5, push_lease_s=10)
    await _workers(redis, slots=1, holder=1, other=0)
    await listening("holder", "other")
    session = SessionRef(owner="0" * 32, id="s", history_len=0, transcript_id="t", holder="holder")
    turn = CompletionJob(request_id="r", model="m", turns=[Turn(role="user", text="turn")], session=session)
    assert await store.create(turn, owner="test") is None
    assert await redis.hget(f"gateway:job:{turn.id}", "prefer") == b"holder"
    later = await _queued(store, "later")
    assert await redis.hget(f"gateway:job:{later}", "worker") is None  # not given the free slot
    line = [m.decode() for m in await redis.zrange("gateway:waiting", 0, -1)]
    assert line == [f"{turn.id}.1", f"{later}.1"]
