"""`python -m worker.healthcheck`: exit 0 while a worker on this host has a fresh heartbeat.

The worker containers' healthcheck. A container's hostname is its own, so with
`--scale worker=N` each replica checks its own worker; on a host running several worker
processes, any one of them alive passes. Unlike a bare Redis ping, this fails when the worker
process hangs or cannot write to Redis, which is what "alive" means to `/ready` and `status`.
"""

import asyncio
import socket
import sys

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.heartbeats import alive_workers
from shared.settings import configured


async def _alive_here(redis_url: str, host: str) -> bool:
    redis = Redis.from_url(redis_url, socket_timeout=4, socket_connect_timeout=4)
    try:
        return any(worker.host == host for worker in await alive_workers(redis))
    finally:
        await redis.aclose()


def main() -> None:
    settings = configured()
    if settings.redis_url is None:
        sys.exit("REDIS_URL is not set")
    host = socket.gethostname()
    try:
        alive = asyncio.run(_alive_here(settings.redis_url, host))
    except (RedisError, OSError) as exc:
        sys.exit(f"cannot reach Redis: {type(exc).__name__}")
    if not alive:
        sys.exit(f"no live worker heartbeat from {host}")


if __name__ == "__main__":
    main()
