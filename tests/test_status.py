"""The shared status pieces on a real Redis: waiting vs running jobs in arq's queue, heartbeat
expiry, and the outcome totals workers record."""

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from cli.embedded_redis import EmbeddedRedis
from cli.status import render
from shared import heartbeats, stats
from shared.backend_auth import BackendAuth
from shared.heartbeats import Heartbeat, SandboxReport
from shared.jobs import Failed, FailureCode, Usage
from shared.stats import Stats
from shared.status import QueueState, Snapshot, queue_state
from tests.conftest import unit_db


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    # Database 13 is this module's (gateways take 1, 2, ...; test_queue 14, test_events 15).
    client = Redis.from_url(unit_db(redis_server))
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


async def test_queue_depth_counts_waiting_jobs_and_ages_the_oldest_waiting_one(redis: Redis) -> None:
    now = time.time()
    # arq keeps running jobs in the queue, marked by an in-progress key.
    await redis.zadd("q", {"running-a": (now - 30) * 1000, "waiting-b": (now - 20) * 1000})
    await redis.zadd("q", {"running-c": (now - 10) * 1000, "waiting-d": (now - 5) * 1000})
    await redis.set("arq:in-progress:running-a", 1)
    await redis.set("arq:in-progress:running-c", 1)
    state = await queue_state(redis, "q", now, slots=2)
    assert state.depth == 2
    assert state.oldest_age_s == pytest.approx(20, abs=0.01)
    assert (await queue_state(redis, "empty", now, slots=2)).oldest_age_s is None


async def test_a_heartbeat_lives_for_its_ttl_and_a_retired_worker_leaves_at_once(redis: Redis) -> None:
    def beat(worker_id: str) -> Heartbeat:
        return Heartbeat(
            id=worker_id, host="h", pid=1, started=time.time(), beat=time.time(), slots=2, jobs=[]
        )

    await heartbeats.beat(redis, beat("w-1"), ttl_s=0.3)
    await heartbeats.beat(redis, beat("w-2"), ttl_s=30)
    assert [w.id for w in await heartbeats.alive_workers(redis)] == ["w-1", "w-2"]
    await asyncio.sleep(0.5)
    assert [w.id for w in await heartbeats.alive_workers(redis)] == ["w-2"]
    await heartbeats.retire(redis, "w-2")
    assert await heartbeats.alive_workers(redis) == []
    with pytest.raises(ValueError, match="malformed"):
        heartbeats.worker_key("a:b")


async def test_outcomes_add_up_into_cumulative_histograms(redis: Redis) -> None:
    def record(outcome: str, wait: float, failure: Failed | None = None) -> stats.JobRecord:
        usage = None if failure else Usage(prompt_tokens=3, completion_tokens=7, cost_usd=0.25)
        return stats.JobRecord(
            job_id="a" * 32,
            request_id="req_1",
            worker_id="w-1",
            outcome=outcome,
            queue_wait_s=wait,
            duration_s=2.0,
            first_token_s=None if failure else wait + 0.5,
            usage=usage,
            failure=failure,
        )

    failure = Failed(code=FailureCode.TIMEOUT, message="too slow")
    for outcome in (record("completed", 0.2), record("completed", 7.0), record("timeout", 400.0, failure)):
        # As the write of a job's terminal event adds it (shared/jobstore.py).
        encoded = stats.encode_outcome(outcome, failures_kept=10)
        await redis.eval(stats.ADD_OUTCOME + "add_outcome(ARGV[1])", 0, encoded)  # type: ignore[misc]
    totals = await stats.read_stats(redis)
    assert totals.jobs == {"completed": 2, "timeout": 1}
    assert (totals.prompt_tokens, totals.completion_tokens, totals.cost_usd) == (6, 14, 0.5)
    wait = dict(totals.histograms["queue_wait_seconds"].buckets)
    assert (wait[0.1], wait[0.25], wait[5], wait[10], wait[300], wait["+Inf"]) == (0, 1, 1, 2, 2, 3)
    assert totals.histograms["queue_wait_seconds"].sum == pytest.approx(407.2)
    assert totals.histograms["time_to_first_token_seconds"].count == 2
    [latest] = await stats.recent_failures(redis, 5)
    assert (latest.code, latest.message, latest.request_id) == ("timeout", "too slow", "req_1")


def test_status_shows_a_scripted_worker_without_the_model_auth_it_never_uses() -> None:
    """Found by an outside probe: scripted workers were listed as `claude_cli UNUSABLE`, under
    backend auth problems, while they served every job."""
    unusable = BackendAuth(
        method="claude_cli", valid=False, errors=["not logged in"], config={}, environment_variables=[]
    )

    def beat(worker_id: str, backend: str, store: str = "s3://shared/sessions") -> Heartbeat:
        now = time.time()
        return Heartbeat(
            id=worker_id,
            host="h",
            pid=1,
            started=now,
            beat=now,
            slots=2,
            jobs=[],
            backend=backend,
            auth=unusable,
            workspace_store=store,
        )

    snapshot = Snapshot(
        at=time.time(),
        queue=QueueState(depth=0, oldest_age_s=None),
        workers=[beat("w-scripted", "scripted"), beat("w-claude", "claude")],
        jobs_running=0,
        slots=4,
        stats=Stats(jobs={}, prompt_tokens=0, completion_tokens=0, cost_usd=0.0, histograms={}),
        recent_failures=[],
    )
    shown = render(snapshot)
    [scripted] = [line for line in shown.splitlines() if line.startswith("w-scripted")]
    assert "scripted" in scripted
    assert "UNUSABLE" not in scripted
    assert "  w-claude: not logged in" in shown
    assert "w-scripted: not logged in" not in shown
    # A sandbox with less than it should have says so (a re-check probe: a root worker's jobs).
    weak = SandboxReport(mode="on", ready=True, warnings=["jobs run as the host's root: set CLAUDE_JOB_USER"])
    snapshot.workers[1] = snapshot.workers[1].model_copy(update={"sandbox": weak})
    assert "  w-claude: jobs run as the host's root: set CLAUDE_JOB_USER" in render(snapshot)
    # Settings every worker must share, found differing by an outside probe: each worker's is named.
    assert "workers with different BACKEND" in shown
    assert "workers with different WORKSPACE_STORE" not in shown
    snapshot.workers = [beat("w-1", "claude"), beat("w-2", "claude", store="/s on h (the default)")]
    shown = render(snapshot)
    assert "workers with different BACKEND" not in shown
    assert "workers with different WORKSPACE_STORE: sessions' files are lost between them" in shown
    assert "  w-2: /s on h (the default)" in shown
