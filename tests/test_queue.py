"""Queueing on a real Redis: JSON on the wire, and jobs no worker takes."""

import json

import httpx
import pytest

from cli.embedded_redis import EmbeddedRedis
from shared import queue
from shared.jobs import CompletionJob, Turn
from tests.conftest import Gateway, chat


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


async def test_jobs_travel_as_json_and_can_be_withdrawn(redis_server: EmbeddedRedis) -> None:
    pool = await queue.connect(f"redis://127.0.0.1:{redis_server.port}/14", "test:queue")
    job = CompletionJob(
        request_id="req_1", model="claude-sonnet-4-5", turns=[Turn(role="user", text="json please")]
    )
    await queue.enqueue(pool, job)
    entry = json.loads(await pool.get(f"arq:job:{job.id}"))
    assert entry["f"] == "run_completion"
    assert CompletionJob.model_validate(entry["a"][0]) == job
    assert await queue.withdraw(pool, "test:queue", job.id)
    assert not await queue.withdraw(pool, "test:queue", job.id)
    assert not await pool.exists(f"arq:job:{job.id}")
    await pool.aclose()
