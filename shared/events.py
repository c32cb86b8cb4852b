"""A job's event sequence as a Redis stream: the worker appends, any API process reads.

A stream (not pub/sub) keeps every event, so a reader that arrives late, or comes back after a
disconnect, replays exactly what it missed. Entry ids are `0-<seq>`: Redis itself then rejects an
event that does not extend the sequence, and "events after N" is a plain `XREAD` from `0-N`.
"""

import asyncio
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from shared.jobs import Delta, Done, Failed, decode_event, encode_event
from shared.keys import events_key

JobEventValue = Delta | Done | Failed
_FIELD = b"e"


class EventWriter:
    """Appends a job's events without making the producer wait on Redis.

    At most one write is in flight. Deltas that arrive meanwhile are merged into one, so a
    lone token goes out at once (latency) and a fast producer is sent in batches (throughput).
    """

    def __init__(self, redis: Redis, job_id: str, ttl_s: int) -> None:
        self._redis = redis
        self._key = events_key(job_id)
        self._ttl_s = ttl_s
        self._seq = 0
        self._pending: list[JobEventValue] = []
        self._flushing: asyncio.Task[None] | None = None

    @property
    def emitted(self) -> int:
        """Events handed to the writer so far, sent or not."""
        return self._seq + len(self._pending)

    def emit(self, event: JobEventValue) -> None:
        last = self._pending[-1] if self._pending else None
        if isinstance(event, Delta) and isinstance(last, Delta):
            self._pending[-1] = Delta(text=last.text + event.text)
        else:
            self._pending.append(event)
        if self._flushing is None or self._flushing.done():
            if self._flushing is not None:
                self._flushing.result()  # surface a failed write instead of losing it
            self._flushing = asyncio.create_task(self._flush())

    async def drain(self) -> None:
        """Wait until everything emitted is in Redis; raises if a write failed."""
        while self._flushing is not None and not self._flushing.done():
            await self._flushing
        if self._flushing is not None:
            self._flushing.result()

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            async with self._redis.pipeline(transaction=False) as pipe:
                for event in batch:
                    self._seq += 1
                    pipe.xadd(self._key, {_FIELD: encode_event(event)}, id=f"0-{self._seq}")
                pipe.expire(self._key, self._ttl_s)
                await pipe.execute()


class NoEventWithin(Exception):
    """The stream stayed silent for the reader's idle limit."""


async def read_events(
    redis: Redis, job_id: str, *, after: int = 0, idle_timeout_s: float
) -> AsyncIterator[tuple[int, JobEventValue]]:
    """Yields `(seq, event)` after `after` until a terminal event; blocks for new ones.

    Raises `NoEventWithin` when nothing arrives for `idle_timeout_s`; the caller decides whether
    that means a job still queued, a stalled one, or a lost one.
    """
    key = events_key(job_id)
    last = f"0-{after}"
    block_ms = max(1, int(idle_timeout_s * 1000))
    while True:
        reply = await redis.xread({key: last}, block=block_ms, count=1024)
        if not reply:
            raise NoEventWithin(idle_timeout_s)
        for entry_id, fields in reply[0][1]:
            last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            event = decode_event(fields[_FIELD])
            yield int(last.partition("-")[2]), event
            if not isinstance(event, Delta):
                return


async def streamed_text(redis: Redis, job_id: str) -> str:
    """All the text a job has written to its stream so far (read once, at the end of a job)."""
    entries = await redis.xrange(events_key(job_id))
    events = [decode_event(fields[_FIELD]) for _, fields in entries]
    return "".join(event.text for event in events if isinstance(event, Delta))
