"""Queueing on a real Redis: JSON on the wire, and jobs no worker takes."""

import json

import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

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


async def test_commands_are_packed_in_c_on_every_kind_of_connection(redis_server: EmbeddedRedis) -> None:
    pool = await queue.connect(unit_db(redis_server), "test:queue")
    connection = await pool.connection_pool.get_connection()
    try:
        assert isinstance(connection, Connection)
        assert type(connection).pack_command is not Connection.pack_command  # not redis-py's Python one
    finally:
        await pool.connection_pool.release(connection)
    # Whatever hiredis takes, a round trip gives back as the Python packer would have sent it.
    values: dict[str, float | str | bytes] = {
        "float": 0.1,
        "int": -5,
        "text": "héllo wörld",
        "bytes": b"\x00\xff",
    }
    for name, value in values.items():
        await pool.set(f"packed:{name}", value)
        sent = value if isinstance(value, bytes) else str(value).encode()
        assert await pool.get(f"packed:{name}") == sent
    with pytest.raises(DataError):
        await pool.set("packed:none", None)  # type: ignore[arg-type]
    await pool.aclose()
    # The URL's kind of connection is kept: TLS and Unix sockets are packed alike.
    for url, kind in (
        ("rediss://localhost", SSLConnection),
        ("unix:///tmp/r.sock", UnixDomainSocketConnection),
    ):
        client = Redis.from_url(url)
        await queue.pack_in_c(client)
        assert issubclass(client.connection_pool.connection_class, kind)
        assert client.connection_pool.connection_class.pack_command is not kind.pack_command
        await client.aclose()
