"""The job queue: arq with JSON on the wire, plus a wake-up so idle workers start jobs at once.

arq's default serializer is pickle (anyone who can write to Redis runs code on every worker), and
its workers poll the queue every 0.5 s. JSON closes the first; `WAKEUP_CHANNEL` the second.
"""

import json
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import expires_extra_ms, job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms

from shared.jobs import CompletionJob
from shared.keys import WAKEUP_CHANNEL

RUN_COMPLETION = "run_completion"
"""The worker function every completion job names."""


def serialize(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def deserialize(raw: bytes) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("queue entry is not a JSON object")
    return value


def redis_settings(redis_url: str) -> RedisSettings:
    settings = RedisSettings.from_dsn(redis_url)
    settings.conn_retries = 5
    settings.retry_on_timeout = True
    return settings


async def connect(redis_url: str, queue_name: str) -> ArqRedis:
    return await create_pool(
        redis_settings(redis_url),
        job_serializer=serialize,
        job_deserializer=deserialize,
        default_queue_name=queue_name,
    )


async def enqueue(pool: ArqRedis, job: CompletionJob) -> None:
    """Queues the job and wakes the workers in one round trip.

    The entry is exactly what arq's `enqueue_job` writes; arq's own call spends two more round
    trips (WATCH/EXISTS) guarding against a reused job id, and job ids here are fresh UUIDs.
    """
    now = timestamp_ms()
    entry = serialize_job(RUN_COMPLETION, (job.model_dump(mode="json"),), {}, None, now, serializer=serialize)
    async with pool.pipeline(transaction=True) as pipe:
        pipe.psetex(job_key_prefix + job.id, expires_extra_ms, entry)
        pipe.zadd(pool.default_queue_name, {job.id: now})
        pipe.publish(WAKEUP_CHANNEL, b"")
        await pipe.execute()


async def withdraw(pool: ArqRedis, queue_name: str, job_id: str) -> bool:
    """Takes a job off the queue if no worker has started it yet; True if it was withdrawn."""
    if await pool.zrem(queue_name, job_id):
        await pool.delete(job_key_prefix + job_id)
        return True
    return False
