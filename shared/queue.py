"""The job queue's connection: arq with JSON on the wire.

arq's default serializer is pickle: anyone who can write to Redis would run code on every worker.
Jobs are queued by `shared.jobstore.JobStore.create`, which also wakes idle workers.
"""

import json
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool

RUN_COMPLETION = "run_completion"
"""The arq function every attempt at a job names; its arguments are `(job_id, attempt)`."""


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
