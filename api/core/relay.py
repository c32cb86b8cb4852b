"""Following one job's events from Redis, so that a caller always gets a terminal event.

The job's own stream carries every outcome, including the ones the API or a sweeper writes
(withdrawn after a queue timeout, cancelled before it started, its worker lost), so following a
job is reading its stream; between events the follower checks on the job:
- never started within `queue_timeout_s` (when asked to withdraw): it is withdrawn;
- started, but its worker's lease ran out: recover it here (any worker would too), so a job is
  settled even when no worker is left to sweep;
- Redis unreachable: wait out `redis_outage_grace_s`, then resume exactly after the last event.

After `KEEP_ALIVE_S` without an event the follower is handed `KEEP_ALIVE` (a stream sends a ping,
so that proxies keep a connection open through a long silent tool run). The reader's idle wait,
which wakes the checks, wakes it too: nothing is spent per event. Events come in the lists the
reader hands over (what arrived together), so a stream can send them as one body message.
"""

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.events import EventReader, JobEventValue, NoEventWithin
from shared.jobs import Failed, FailureCode
from shared.jobstore import JobStore
from shared.settings import Settings

KEEP_ALIVE_S = 15.0


class KeepAlive:
    """No event for `KEEP_ALIVE_S` (or since the last `KEEP_ALIVE`): the job is still being followed."""


KEEP_ALIVE = KeepAlive()
FollowedEvent = JobEventValue | KeepAlive
FollowedBatch = Sequence[tuple[int, FollowedEvent]]
"""`(seq, event)`s that arrived together, in order (never empty)."""


_LOST = Failed(
    code=FailureCode.QUEUE_UNAVAILABLE,
    message="Redis lost the job (restarted without its data, or flushed); send the request again.",
)


async def follow_job(
    reader: EventReader, store: JobStore, settings: Settings, job_id: str, *, after: int = 0, withdraw: bool
) -> AsyncGenerator[FollowedBatch, None]:
    """Yields the job's events after `after` up to and including its terminal event, and
    `[(seq of the last event, KEEP_ALIVE)]` through a silence. Ends with nothing more when `after`
    is past the end of a job that has ended (a resume from its last event, or beyond)."""
    check_every = min(settings.lease_s, settings.queue_timeout_s)
    waiting_since = heard = checked = kept_alive = time.monotonic()
    if after:  # a resume: checked at once, in case nothing follows
        heard = checked = heard - check_every
    outage_since: float | None = None
    while True:
        # The silence since the last event is woken when a check or a keep-alive is due, whichever
        # comes first. The wait holds for each silence of this read: after events, one may come
        # early, and the read is resumed for what is left.
        due = min(max(heard, checked) + check_every, max(heard, kept_alive) + KEEP_ALIVE_S)
        try:
            try:
                batches = reader.batches(job_id, after=after, idle_timeout_s=max(due - time.monotonic(), 0.0))
                async with aclosing(batches):  # closed with this one: the follower leaves at once
                    async for batch in batches:
                        after, outage_since, heard = batch[-1][0], None, time.monotonic()
                        yield batch
                return
            except NoEventWithin:
                pass
            # A silence: the checks below wait out an outage as the read does (the same handler).
            now = time.monotonic()
            if now >= max(heard, kept_alive) + KEEP_ALIVE_S:
                kept_alive = now
                yield [(after, KEEP_ALIVE)]
            if now < max(heard, checked) + check_every:
                continue
            checked = now
            record = await store.get(job_id)
            outage_since = None
            if record is None:  # deleted with its end written: Redis lost it (restarted empty, flushed)
                yield [(after + 1, _LOST)]
                return
            if record.ended and await store.last_event(job_id) <= after:
                return  # ended together with its terminal event: nothing will follow
            if record.ended or record.started:
                waiting_since = time.monotonic()
                await store.recover_expired(settings.max_attempts, settings.lease_s)
            elif withdraw and time.monotonic() - waiting_since >= settings.queue_timeout_s:
                message = f"No worker started the job within {settings.queue_timeout_s:g} s; retry later."
                failure = Failed(code=FailureCode.QUEUE_TIMEOUT, message=message)
                await store.stop(job_id, withdraw_only=True, failure=failure)
        except (RedisConnectionError, RedisTimeoutError, OutOfMemoryError):  # full: as if out of reach
            outage_since = outage_since or time.monotonic()
            if time.monotonic() - outage_since > settings.redis_outage_grace_s:
                raise
            await asyncio.sleep(0.5)
