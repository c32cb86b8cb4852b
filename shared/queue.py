"""The job queue's connection: arq with JSON on the wire, commands packed in C.

arq's default serializer is pickle: anyone who can write to Redis would run code on every worker.
Jobs are queued by `shared.jobstore.JobStore.create`, which also wakes idle workers.
"""

import json
import re
from typing import Any, cast

from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.connection import HiredisRespSerializer
from redis.exceptions import ResponseError

RUN_COMPLETION = "run_completion"
"""The arq function every attempt at a job names; its arguments are `(job_id, attempt)`."""


_CANNOT_PERSIST = re.compile(r"(?:^|caused error: \(['\"])MISCONF ")  # alone, or in a pipeline's error


def cannot_persist(exc: BaseException) -> bool:
    """Whether Redis refused a command because it cannot save to its disk (MISCONF: a full disk
    under a persistent Redis): it refuses every write, and PING, until it can."""
    return isinstance(exc, ResponseError) and bool(_CANNOT_PERSIST.search(str(exc)))


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


async def connect(redis_url: str, queue_name: str, *, reply_timeout_s: float | None = None) -> ArqRedis:
    """`reply_timeout_s`: how long a command waits for its reply before it fails with
    `redis.exceptions.TimeoutError`, not sent again (it may have run); None waits as long as it takes."""
    settings = redis_settings(redis_url)
    settings.retry_on_timeout = reply_timeout_s is None
    pool = await create_pool(
        settings, job_serializer=serialize, job_deserializer=deserialize, default_queue_name=queue_name
    )
    # arq has no setting for it; the connections made from here on have it (`pack_in_c` resets).
    pool.connection_pool.connection_kwargs["socket_timeout"] = reply_timeout_s
    if type(pool.connection_pool) is ConnectionPool:
        pool.connection_pool.__class__ = _ConnectingApart
    await pack_in_c(pool)
    return pool


class _ConnectingApart(ConnectionPool):
    """redis-py's pool, but a connection is made (its handshake awaited) outside the pool's lock:
    with Redis frozen, each handshake waited out the reply timeout holding it, and the requests of
    an API process got their 503s one reply timeout after another (5, 10, ... 35 s: an outside
    probe)."""

    async def get_connection(self, *_: Any, **__: Any) -> AbstractConnection:
        async with self._lock:
            connection: AbstractConnection = self.get_available_connection()  # type: ignore[no-untyped-call]
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection


class _HiredisPacking:
    """redis-py's sync client packs commands with hiredis when it is installed; its asyncio client
    packs them in Python: ~8% of a worker's CPU and ~5% of an API process's on the relay's path
    (docs/benchmarks.md)."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed


async def pack_in_c(redis: Redis) -> None:
    """Has `redis`'s connections (TCP, TLS or a Unix socket, as its URL says) pack their commands
    with hiredis. Called before any command is under way: the connections opened before are closed."""
    pool = redis.connection_pool
    base = pool.connection_class
    if not issubclass(base, _HiredisPacking):
        packed = type(f"HiredisPacked{base.__name__}", (_HiredisPacking, base), {})
        pool.connection_class = cast(type[AbstractConnection], packed)
        await pool.disconnect()
        pool.reset()  # type: ignore[no-untyped-call]  # the connections opened before are dropped
