"""Queueing on a real Redis: JSON on the wire, and jobs no worker takes."""

import json

import httpx
import pytest

from cli.embedded_redis import EmbeddedRedis
from shared import queue
from shared.jobs import CompletionJob, Failed, FailureCode, Turn
from shared.jobstore import JobStore
from tests.conftest import Gateway, chat, unit_db


@pytest.fixture(scope="module")
def workerless(start_gateway: object) -> Gateway:
    gateway: Gateway = start_gateway(workers=0, BACKEND="scripted", QUEUE_TIMEOUT_S="1")  # type: ignore[operator]
    return gateway


def test_a_job_no_worker_starts_fails_with_503_and_leaves_the_queue(workerless: Gateway) -> None:
    for body in (chat("hi"), chat("hi", stream=True)):
        response = httpx.post(f"{workerless.url}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "queue_timeout"
    redis = workerless.redis()
    assert redis.zcard("gateway:queue") == 0
    assert list(redis.scan_iter("arq:job:*")) == []
    assert redis.zcard("gateway:running") == 0


async def test_jobs_travel_as_json_and_a_queued_job_can_be_withdrawn(redis_server: EmbeddedRedis) -> None:
    pool = await queue.connect(unit_db(redis_server), "test:queue")
    store = JobStore(pool, queue_name="test:queue", ttl_s=60)
    job = CompletionJob(
        request_id="req_1", model="claude-sonnet-4-5", turns=[Turn(role="user", text="json please")]
    )
    await store.create(job, owner="key-a")
    entry = json.loads(await pool.get(f"arq:job:{job.id}.1"))
    assert entry["f"] == "run_completion"
    assert entry["a"] == [job.id, 1]
    assert CompletionJob.model_validate_json(await pool.hget(f"gateway:job:{job.id}", "payload")) == job
    failure = Failed(code=FailureCode.QUEUE_TIMEOUT, message="no worker")
    assert await store.stop(job.id, withdraw_only=True, failure=failure) == "stopped"
    assert await store.stop(job.id, withdraw_only=True, failure=failure) == "ended"
    assert not await pool.exists(f"arq:job:{job.id}.1")
    assert await pool.zcard("test:queue") == 0
    record = await store.get(job.id)
    assert record is not None
    assert record.status == "failed"
    assert record.owner == "key-a"
    await pool.aclose()
