"""A job's event sequence as a Redis stream: the worker appends, any API process reads.

A stream (not pub/sub) keeps every event, so a reader that arrives late, or comes back after a
disconnect, replays exactly what it missed. Entry ids are `0-<seq>`: Redis itself then rejects an
event that does not extend the sequence, and "events after N" is a plain `XREAD` from `0-N`.
"""

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import KeyT, StreamIdT

from shared.jobs import (
    Delta,
    Done,
    Failed,
    JobEventValue,
    PromptUsage,
    Reasoning,
    Usage,
    decode_event,
    encode_event,
    settled,
)
from shared.jobstore import AttemptEnd, JobStore
from shared.keys import events_key, reader_wakeup_key
from shared.queue import cannot_persist

__all__ = ["JobEventValue"]  # re-exported: the API reads the event union from here
_FIELD = b"e"


class Superseded(Exception):
    """The job moved on without this attempt (retried, cancelled or failed elsewhere)."""


class EventWriter:
    """Appends one attempt's events without making the producer wait on Redis.

    At most one write is in flight; deltas that arrive meanwhile are merged into one (text with
    text, thinking with thinking). A lone token goes out at once (latency). When tokens keep
    arriving during writes the stream is hot, and the writer lingers `LINGER_S` before writing
    more of the same kind, so a hot stream is written at most ~100 times a second, each write
    carrying what came meanwhile (throughput): every write costs each process on the path
    (worker, Redis, API, client) a wake-up, and at 2 ms the API spent twice the CPU per token
    (docs/benchmarks.md). A model streaming ~100 tokens/s never triggers the linger. A write that
    fails because Redis is briefly unreachable is retried for `outage_grace_s`; one refused because
    Redis is full (`maxmemory` with `noeviction`) for `full_grace_s`: Redis is there, the job keeps
    its lease, and its output waits for room as long as the job may run (writes are idempotent).
    A write that gave up is surfaced once (by the next `emit`) and kept: the attempt's end, written
    next, carries it, and waits for Redis up to `end_grace_s` (the job then ends with what
    happened, not as a lost worker's). Output that found no room (past `full_grace_s`, or once the
    attempt ends in a failure) is dropped instead (`no_room`): the end, a failure, is then written
    alone in the room Redis keeps for bookkeeping.
    """

    LINGER_S = 0.010
    EVENT_CHARS = 4096
    """The most text one event carries: deltas merge up to it, and a longer one is split. A producer
    faster than Redis (a burst of output) wrote one event of megabytes, which every reader of the
    job then held whole, however slowly its client read."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        attempt: int,
        *,
        outage_grace_s: float = 30.0,
        full_grace_s: float = 600.0,
        end_grace_s: float = 3600.0,
    ) -> None:
        self._store = store
        self._job_id = job_id
        self._attempt = attempt
        self._grace_s = outage_grace_s
        self._full_grace_s = full_grace_s
        self._end_grace_s = end_grace_s
        self._expire_due = 0.0  # refresh the TTL on the first write, the last, and now and then
        self._seq = 0
        self._pending: list[JobEventValue] = []
        self._texts: list[str] = []  # the trailing delta, merged only when it is written
        self._merged_chars = 0  # in `_texts`
        self._merging: type[Delta] | type[Reasoning] = Delta  # what kind of delta that is
        self._flushing: asyncio.Task[None] | None = None
        self.first_output_at: float | None = None
        """`time.perf_counter()` when the first event was emitted (time to first token)."""
        self.terminal: Done | Failed | None = None
        self._end: AttemptEnd | None = None
        self._prompt: PromptUsage | None = None  # goes out with the first event
        self.no_room = False
        """A write was refused for room past `full_grace_s`: what was not written is dropped."""

    @property
    def emitted(self) -> int:
        """Events handed to the writer so far, sent or not."""
        return self._seq + len(self._pending) + (1 if self._texts else 0)

    def prompt(self, usage: Usage) -> None:
        """The prompt's usage as the model API reported it at the start of a message: the last
        one before the first event goes out with it, as a `PromptUsage` (alone, it would count as
        output: a job with output is not retried on another worker). Later ones are not written."""
        if self.emitted == 0:
            self._prompt = PromptUsage(usage=usage)

    def emit(self, event: JobEventValue) -> None:
        if self.first_output_at is None:
            self.first_output_at = time.perf_counter()
            if self._prompt is not None:
                self._pending.append(self._prompt)
        if isinstance(event, Delta | Reasoning):
            if self._texts and not isinstance(event, self._merging):
                self._close_delta()
            self._merging = type(event)
            text = event.text
            while len(text) > (room := self.EVENT_CHARS - self._merged_chars):
                self._texts.append(text[:room])
                self._close_delta()
                text = text[room:]
            self._texts.append(text)
            self._merged_chars += len(text)
        else:
            self._close_delta()
            self._pending.append(event)
            if isinstance(event, Done | Failed):
                self.terminal = event
        if self._flushing is None or self._flushing.done():
            if (flushed := self._flushing) is not None:
                self._flushing = None
                if self._end is None:  # else the end's write carries what the failed one held
                    flushed.result()  # surface a failed write to the producer, once
            self._flushing = asyncio.create_task(self._flush())

    def finish(self, terminal: Done | Failed, end: AttemptEnd) -> None:
        """Emits the attempt's terminal event; its write also records `end` (no round trip more).
        After `no_room`, only a failure may end the attempt (a `Done` would hide the output lost),
        and it is written alone."""
        if self.no_room:
            if isinstance(terminal, Done):
                raise OutOfMemoryError("the job's output found no room in Redis")
            self._pending, self._texts, self._merged_chars = [], [], 0
        self._end = end
        self.emit(terminal)

    async def drain(self) -> None:
        """Wait until everything emitted is in Redis; raises if a write failed."""
        while self._flushing is not None and not self._flushing.done():
            await self._flushing
        if self._flushing is not None:
            self._flushing.result()

    def _close_delta(self) -> None:
        if self._texts:
            self._pending.append(self._merging(text="".join(self._texts)))
            self._texts, self._merged_chars = [], 0

    async def _flush(self) -> None:
        while True:
            self._close_delta()
            batch, self._pending = self._pending, []
            try:
                await self._write(batch)
            except BaseException as exc:
                self._pending[:0] = batch  # written again with what follows (writes are idempotent)
                # Redis out of reach past the grace: the producer is told (`emit`), unless the end
                # is pending already, whose write carries this batch, as patiently as the end.
                ends = isinstance(batch[-1], Done | Failed)
                if not isinstance(exc, RedisConnectionError | RedisTimeoutError) or self._end is None or ends:
                    raise
                continue
            if not (self._pending or self._texts):
                return
            # Only more of the same text arrived during the write: a hot stream. The first of
            # another kind (the answer after the thinking) goes out at once.
            if not self._pending and isinstance(batch[-1], self._merging):
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
        give_up = now + (self._end_grace_s if outcome else self._grace_s)
        full_give_up = now + self._full_grace_s
        while True:
            try:
                await self._store.append(
                    self._job_id,
                    self._attempt,
                    self._seq + 1,
                    encoded,
                    outcome=outcome,
                    ttl_s=ttl,
                    end=self._end if outcome else None,
                    in_full_redis=self.no_room,
                )
                break
            except (RedisConnectionError, RedisTimeoutError):
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(0.5)
            except ResponseError as exc:
                if str(exc).startswith("SUPERSEDED"):
                    raise Superseded(self._job_id) from exc
                # Refused as by a full Redis, by one that cannot save to its disk too (MISCONF: a
                # re-check probe's 2 s of it ended a job as a lost worker's): waited out alike.
                if not isinstance(exc, OutOfMemoryError) and not cannot_persist(exc):
                    raise
                # A failure ending the attempt (a cancel, a timeout) waits for no room: its end goes
                # out alone at once (a re-check probe's cancel held its slot for JOB_TIMEOUT_S).
                if time.monotonic() > full_give_up or isinstance(self.terminal, Failed):
                    self.no_room = True
                    if isinstance(exc, OutOfMemoryError):
                        raise
                    raise OutOfMemoryError(str(exc)) from exc
                await asyncio.sleep(0.5)
        self._seq += len(batch)


class NoEventWithin(Exception):
    """The stream stayed silent for the reader's idle limit."""


@dataclass(eq=False)
class _Follower:
    """One reader of one job's stream: what the shared read has handed it, and whether it reads on."""

    key: bytes
    last: int
    """The sequence number of the last event handed over (the stream is read after it)."""
    inbox: "asyncio.Queue[tuple[int, JobEventValue] | Exception]" = field(default_factory=asyncio.Queue)
    paused: bool = False
    """Left out of the read while `EventReader.HELD` events wait in its inbox (a slow client)."""
    ended: bool = False
    """Handed its terminal event or an error: nothing more to read for it."""


class EventReader:
    """Every job stream an API process follows, read by one task on one Redis connection.

    The task blocks in one `XREAD` over all the followed streams (each after its follower's last
    event) and hands each entry to its follower, so open streams do not each hold a connection and a
    burst of requests shares its round trips. A follower that arrives while that read is blocked
    wakes it by appending to this reader's own wake-up stream, which every read includes: read from
    an explicit id, an append Redis handles before the read is still seen, so no wake-up is lost and
    nothing waits for the block to end. Arrivals during one read share one append.
    """

    BLOCK_MS = 5_000  # only bounds a lost wake-up (its append failed): arrivals wake the read
    # What a follower holds in its inbox, and in one batch, is bounded by these: a client that reads
    # slowly (a large job resumed) holds less than a megabyte of events ahead of its socket.
    COUNT = 256  # entries per stream per read
    HELD = 256  # a follower this many events behind is left out of the read until it catches up
    WAKEUP_TTL_S = 60

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._wakeup_key = reader_wakeup_key(uuid.uuid4().hex).encode()
        self._wakeup_last = "0-0"
        self._followers: dict[bytes, set[_Follower]] = {}
        self._changed = asyncio.Event()  # a follower arrived or resumed while no read was in flight
        self._reading = False
        self._woken = False  # the read in flight has been sent its wake-up
        self._task: asyncio.Task[None] | None = None
        self._wakeups: set[asyncio.Task[None]] = set()  # strong references until they finish

    async def batches(
        self, job_id: str, *, after: int = 0, idle_timeout_s: float
    ) -> AsyncGenerator[list[tuple[int, JobEventValue]], None]:
        """Yields the `(seq, event)`s after `after` until a terminal event, each list what arrived
        together (never empty, at most `HELD`), so a caller can pass them on at once; waits for new
        ones.

        Raises `NoEventWithin` when nothing arrives for `idle_timeout_s` (the caller decides whether
        that means a job still queued, a stalled one, or a lost one), and the `RedisError` of a read
        that failed, after the events it had read before.
        """
        follower = _Follower(events_key(job_id).encode(), after)
        self._followers.setdefault(follower.key, set()).add(follower)
        self._wake()
        try:
            while True:
                if follower.inbox.empty():
                    try:
                        async with asyncio.timeout(idle_timeout_s):
                            item = await follower.inbox.get()
                    except TimeoutError:
                        raise NoEventWithin(idle_timeout_s) from None
                else:
                    item = follower.inbox.get_nowait()
                batch: list[tuple[int, JobEventValue]] = []
                while not isinstance(item, Exception):
                    batch.append(item)
                    if (
                        isinstance(item[1], Done | Failed)
                        or follower.inbox.empty()
                        or len(batch) == self.HELD
                    ):
                        break
                    item = follower.inbox.get_nowait()
                if follower.paused and follower.inbox.empty():
                    follower.paused = False
                    self._wake()
                if batch:
                    yield batch
                if isinstance(item, Exception):
                    raise item.with_traceback(None)
                if isinstance(item[1], Done | Failed):
                    return
        finally:
            followers = self._followers[follower.key]
            followers.discard(follower)
            if not followers:
                del self._followers[follower.key]

    async def aclose(self) -> None:
        for task in (self._task, *self._wakeups):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None

    def _wake(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._read())
        if not self._reading:
            self._changed.set()
        elif not self._woken:
            self._woken = True
            task = asyncio.create_task(self._send_wakeup())
            self._wakeups.add(task)
            task.add_done_callback(self._wakeups.discard)

    async def _send_wakeup(self) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wakeup_key, {_FIELD: b""}, maxlen=1, approximate=False)
                pipe.expire(self._wakeup_key, self.WAKEUP_TTL_S)
                await pipe.execute()
        except RedisError:  # the read fails too then, or its block ends: either way it is sent again
            self._woken = False

    def _starts(self) -> dict[bytes, int]:
        """Each followed stream's next read starts after the earliest event one of its followers has."""
        starts: dict[bytes, int] = {}
        for key, followers in self._followers.items():
            reading = [follower.last for follower in followers if not (follower.paused or follower.ended)]
            if reading:
                starts[key] = min(reading)
        return starts

    async def _read(self) -> None:
        # A connection of its own: the read's reply may come the block's length later than others'.
        shared = self._redis.connection_pool
        options = dict(shared.connection_kwargs)
        if options.get("socket_timeout") is not None:
            options["socket_timeout"] += self.BLOCK_MS / 1000
        pool = ConnectionPool(connection_class=shared.connection_class, max_connections=1, **options)
        connection = Redis(connection_pool=pool, single_connection_client=True)
        try:
            while True:
                starts = self._starts()
                if not starts:
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                streams: dict[KeyT, StreamIdT] = {key: f"0-{start}" for key, start in starts.items()}
                streams[self._wakeup_key] = self._wakeup_last
                self._reading, self._woken = True, False
                try:
                    reply = await connection.xread(streams, block=self.BLOCK_MS, count=self.COUNT)
                except Exception as exc:  # e.g. a lost Redis: each follower reports it as its own read would
                    self._fail(self._followers, exc)
                    continue
                finally:
                    self._reading = False
                for key, entries in reply:
                    if key == self._wakeup_key:
                        self._wakeup_last = entries[-1][0].decode()
                    else:
                        self._hand_over(key, starts[key], entries)
                # The followers just handed events relay them before the next read goes out:
                # sending it (packing, a socket write that wakes Redis) is then off their path.
                await asyncio.sleep(0)
        finally:
            await connection.aclose()
            await pool.aclose()

    def _hand_over(self, key: bytes, start: int, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Entries read after `start` go to the followers that had every event up to `start`: one
        that was left out of the read further back gets them from a read of its own."""
        followers = {follower for follower in self._followers.get(key, ()) if follower.last >= start}
        for entry_id, fields in entries:
            seq = int(entry_id.partition(b"-")[2])
            try:
                event = decode_event(fields[_FIELD])
            except Exception as exc:  # only this job's followers cannot go on
                self._fail({key: followers}, exc)
                return
            for follower in followers:
                if seq > follower.last and not follower.ended:
                    follower.last = seq
                    follower.inbox.put_nowait((seq, event))
                    follower.ended = isinstance(event, Done | Failed)
        for follower in followers:
            follower.paused = follower.inbox.qsize() >= self.HELD

    @staticmethod
    def _fail(followers_by_key: dict[bytes, set[_Follower]], exc: Exception) -> None:
        for followers in followers_by_key.values():
            for follower in followers:
                if not follower.ended:
                    follower.ended = True
                    follower.inbox.put_nowait(exc)


async def events_so_far(redis: Redis, job_id: str) -> list[JobEventValue]:
    """Every event the job has written until now (without waiting for more), settled: text the
    model API took back is left out. Read a page at a time: Redis holds a reply whole until it is
    sent, and a job's whole stream, read by many at once, took Redis past its `maxmemory` (an
    outside probe: other callers' requests got `storage_full`)."""
    entries: list[tuple[bytes, dict[bytes, bytes]]] = []
    start = "-"
    while page := await redis.xrange(events_key(job_id), min=start, count=EventReader.COUNT):
        entries += page
        if len(page) < EventReader.COUNT:
            break
        start = "(" + page[-1][0].decode()
    return settled(decode_event(fields[_FIELD]) for _, fields in entries)


async def streamed_text(redis: Redis, job_id: str) -> str:
    """All the text a job has written to its stream so far (read once, at the end of a job)."""
    return "".join(event.text for event in await events_so_far(redis, job_id) if isinstance(event, Delta))
