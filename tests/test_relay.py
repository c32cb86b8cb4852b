"""`follow_job`'s checks between events, with a reader and a store that script an outage."""

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, cast

from redis.exceptions import ConnectionError as RedisConnectionError

from api.core.relay import follow_job
from shared.events import NoEventWithin
from shared.jobs import Failed, FailureCode
from shared.settings import Settings


class _Silent:
    """A reader of a job that sends nothing: each read ends in a silence."""

    async def batches(self, job_id: str, *, after: int, idle_timeout_s: float) -> AsyncGenerator[Any, None]:
        await asyncio.sleep(idle_timeout_s)
        raise NoEventWithin(idle_timeout_s)
        yield  # an async generator, as the reader's


class _Unreachable:
    """A job store whose Redis is unreachable for its first `failures` reads, then finds no job."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    async def get(self, job_id: str) -> None:
        if self.failures:
            self.failures -= 1
            raise RedisConnectionError("Connection refused")


async def test_a_check_that_meets_an_outage_waits_it_out() -> None:
    """The check of a silent job is waited out within REDIS_OUTAGE_GRACE_S like a read (it ended
    the stream the moment it met the outage: the ops probe saw 10 s, one lease, not 30)."""
    settings = Settings(lease_s=0.05, lease_renew_s=0.01, redis_outage_grace_s=30)
    store = _Unreachable(failures=3)
    followed = follow_job(cast(Any, _Silent()), cast(Any, store), settings, "job", withdraw=False)
    [(_, event)] = await asyncio.wait_for(anext(followed), 10)
    assert isinstance(event, Failed)
    assert event.code is FailureCode.QUEUE_UNAVAILABLE  # found gone once Redis answered
    assert store.failures == 0
