"""A job's event sequence as a Redis stream: the worker appends, any API process reads.

A stream (not pub/sub) keeps every event, so a reader that arrives late, or comes back after a
disconnect, replays exactly what it missed. Entry ids are `0-<seq>`: Redis itself then rejects an
event that does not extend the sequence, and "events after N" is a plain `XREAD` from `0-N`.
"""

import asyncio
import time
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.jobs import Delta, Done, Failed, JobEventValue, Reasoning, decode_event, encode_event, settled
from shared.jobstore import JobStore
from shared.keys import events_key

__all__ = ["JobEventValue"]  # re-exported: the API reads the event union from here
_FIELD = b"e"


class Superseded(Exception):
    """The job moved on without this attempt (retried, cancelled or failed elsewhere)."""


class EventWriter:
    """Appends one attempt's events without making the producer wait on Redis.

    At most one write is in flight; deltas that arrive meanwhile are merged into one (text with
    text, thinking with thinking). A lone token
    goes out at once (latency). When tokens keep arriving during writes the stream is hot, and the
    writer lingers `LINGER_S` before the next write so each round trip carries a real batch
    (throughput): a model streaming ~100 tokens/s never triggers the linger. A write that fails
    because Redis is briefly unreachable is retried for `outage_grace_s` (writes are idempotent).
    """

    LINGER_S = 0.002

    def __init__(self, store: JobStore, job_id: str, attempt: int, *, outage_grace_s: float = 30.0) -> None:
        self._store = store
        self._job_id = job_id
        self._attempt = attempt
        self._grace_s = outage_grace_s
        self._expire_due = 0.0  # refresh the TTL on the first write, the last, and now and then
        self._seq = 0
        self._pending: list[JobEventValue] = []
        self._texts: list[str] = []  # the trailing delta, merged only when it is written
        self._merging: type[Delta] | type[Reasoning] = Delta  # what kind of delta that is
        self._flushing: asyncio.Task[None] | None = None
        self.first_output_at: float | None = None
        """`time.perf_counter()` when the first event was emitted (time to first token)."""
        self.terminal: Done | Failed | None = None

    @property
    def emitted(self) -> int:
        """Events handed to the writer so far, sent or not."""
        return self._seq + len(self._pending) + (1 if self._texts else 0)

    def emit(self, event: JobEventValue) -> None:
        if self.first_output_at is None:
            self.first_output_at = time.perf_counter()
        if isinstance(event, Delta | Reasoning):
            if self._texts and not isinstance(event, self._merging):
                self._close_delta()
            self._merging = type(event)
            self._texts.append(event.text)
        else:
            self._close_delta()
            self._pending.append(event)
            if isinstance(event, Done | Failed):
                self.terminal = event
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

    def _close_delta(self) -> None:
        if self._texts:
            self._pending.append(self._merging(text="".join(self._texts)))
            self._texts = []

    async def _flush(self) -> None:
        while True:
            self._close_delta()
            batch, self._pending = self._pending, []
            await self._write(batch)
            if not (self._pending or self._texts):
                return
            if not self._pending:  # only deltas arrived during the write: a hot stream
                await asyncio.sleep(self.LINGER_S)

    async def _write(self, batch: list[JobEventValue]) -> None:
        last = batch[-1]
        outcome = "completed" if isinstance(last, Done) else ""
        if isinstance(last, Failed):
            outcome = last.code.value
        now = time.monotonic()
        ttl = 0
        if outcome or now >= self._expire_due:
            ttl = self._store.ttl_s
            self._expire_due = now + min(60.0, ttl / 2)
        encoded = [encode_event(event) for event in batch]
        give_up = now + self._grace_s
        while True:
            try:
                await self._store.append(
                    self._job_id, self._attempt, self._seq + 1, encoded, outcome=outcome, ttl_s=ttl
                )
                break
            except ResponseError as exc:
                if str(exc).startswith("SUPERSEDED"):
                    raise Superseded(self._job_id) from exc
                raise
            except (RedisConnectionError, RedisTimeoutError):
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(0.5)
        self._seq += len(batch)


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
            if isinstance(event, Done | Failed):
                return


async def events_so_far(redis: Redis, job_id: str) -> list[JobEventValue]:
    """Every event the job has written until now (without waiting for more), settled: text the
    model API took back is left out."""
    return settled(decode_event(fields[_FIELD]) for _, fields in await redis.xrange(events_key(job_id)))


async def streamed_text(redis: Redis, job_id: str) -> str:
    """All the text a job has written to its stream so far (read once, at the end of a job)."""
    return "".join(event.text for event in await events_so_far(redis, job_id) if isinstance(event, Delta))
