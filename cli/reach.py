"""What the CLI says of a Redis it cannot use, in one line: never a traceback."""

import asyncio
import sys
import time

from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, RedisError

from shared.queue import cannot_persist

_TRIES = 5
"""A Redis started beside this process (compose, systemd) gets this many seconds to answer."""


COMMAND_TIMEOUT_S = 5.0
"""How long a command of the CLI waits for Redis to connect or answer: a frozen one is an error
said in seconds, not a hang (an outside probe's `keys revoke` waited on one for good)."""


def cli_redis(redis_url: str) -> Redis:
    """A client for one CLI command, bounded by `COMMAND_TIMEOUT_S`."""
    client: Redis = Redis.from_url(
        redis_url, socket_timeout=COMMAND_TIMEOUT_S, socket_connect_timeout=COMMAND_TIMEOUT_S
    )
    return client


def redis_problem(role: str, exc: Exception) -> str:
    """The message a command exits with when Redis refused it or could not be reached."""
    if isinstance(exc, OutOfMemoryError):
        return f"claude-gateway {role}: Redis refuses writes: it is full (free memory or raise maxmemory)"
    if cannot_persist(exc):  # its error names the command, a new key's digest included (a probe)
        return f"claude-gateway {role}: Redis refuses writes: it cannot save to its disk (free room there)"
    return f"claude-gateway {role}: cannot reach Redis ({exc})"


def wait_for_redis(redis_url: str, role: str) -> None:
    """Returns once Redis answers at `redis_url`; exits with one line if it never does."""

    async def ping() -> None:
        async with Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2) as redis:
            await redis.ping()

    for attempt in range(_TRIES):
        try:
            asyncio.run(ping())
            return
        except (OSError, RedisError, ValueError) as exc:  # unreachable, refused, or not a Redis URL
            if attempt == _TRIES - 1:
                sys.exit(redis_problem(role, exc))
            time.sleep(1)
