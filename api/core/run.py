"""A request's queued jobs (one per choice) and their events: followed, collected, cancelled.

Every front end reads a run the same way: `events()` yields lists of `(choice, seq, event)` (what
arrived together) until each choice has its terminal event (or one fails: the others are cancelled
then, and the failure ends the run), and a choice's `KEEP_ALIVE` through a silence. `collect()`
turns a finished run into one `Reply` per choice. A run with `n > 1` is one request, not a durable
job: its choices' events interleave as they arrive.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol, TypeGuard

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import Receive

from api import metrics
from api.core.relay import FollowedBatch, FollowedEvent, KeepAlive, follow_job
from api.core.sse import until_disconnect
from api.core.structured import ResponseFormat
from api.deps import Gateway
from api.errors import NO_RETRY, OpenAIError
from shared.events import JobEventValue
from shared.jobs import (
    Activity,
    Delta,
    Done,
    Failed,
    FailureCode,
    PromptUsage,
    Reasoning,
    Retraction,
    Usage,
    settled,
)
from shared.jobstore import CANCELLED, JobRecord, JobStore

log = logging.getLogger("gateway.api")

ShownEvent = Delta | Activity | Retraction | Done | Failed | KeepAlive
"""What a run passes on of its jobs' events: all but their `PromptUsage`, which it keeps."""
ChoiceEvent = tuple[int, int, ShownEvent]
"""`(choice, seq, event)`: the choice's index and the event's number in its job's sequence."""
ChoiceEvents = AsyncGenerator[Sequence[ChoiceEvent], None]
"""A run's events, in lists of what arrived together (never empty)."""
_CANCEL_WAIT_S = 5.0  # how long a cancel waits for a running job to confirm it stopped


class JobRef(Protocol):
    """What rendering needs of a job: a `CompletionJob`, or the `JobRecord` of one."""

    @property
    def id(self) -> str: ...
    @property
    def created(self) -> int: ...
    @property
    def model(self) -> str: ...


@dataclass
class Reply:
    """One choice's finished reply."""

    text: str
    done: Done
    events: list[JobEventValue] = field(default_factory=list)
    """Every event of the choice, in order (the agent's activity among the text)."""

    @property
    def reasoning(self) -> str:
        """The agent's activity as one text: its thinking, and a line per tool step."""
        return "".join(activity_text(event) for event in self.events if isinstance(event, Activity))


def activity_text(event: Activity) -> str:
    """Thinking as it came; a tool step as a short line (its start, or its end if it failed)."""
    if isinstance(event, Reasoning):
        return event.text
    if not event.ended:
        return f"\n▸ {event.name}: {event.argument}\n" if event.argument else f"\n▸ {event.name}\n"
    return f"✗ {event.name} failed\n" if event.failed else f"✓ {event.name}\n"


def reply_of(events: Iterable[JobEventValue]) -> tuple[str, Done | Failed | None]:
    """The text of a job's events so far, and its terminal event if it has one."""
    parts: list[str] = []
    terminal: Done | Failed | None = None
    for event in events:
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Done | Failed):
            terminal = event
    return "".join(parts), terminal


def total_usage(usages: list[Usage]) -> Usage:
    """The choices' usage summed; their cost only if each has one (a part is no total)."""
    costs = [usage.cost_usd for usage in usages]
    return Usage(
        prompt_tokens=sum(usage.prompt_tokens for usage in usages),
        completion_tokens=sum(usage.completion_tokens for usage in usages),
        cached_prompt_tokens=sum(usage.cached_prompt_tokens for usage in usages),
        cache_write_tokens=sum(usage.cache_write_tokens for usage in usages),
        cost_usd=None if None in costs else sum(cost or 0.0 for cost in costs),
    )


@dataclass
class Run:
    gateway: Gateway
    jobs: list[JobRef]
    """One job per choice; the first names the request (its id is the completion's)."""
    background: bool = False
    response_format: ResponseFormat | None = None
    reasoning: bool = True
    """Whether the agent's activity (thinking, tool steps) reaches the caller."""
    prompt_usage: Usage | None = None
    """The first prompt usage its jobs reported, once their first events came (Messages'
    `message_start`; a Messages run has one job)."""
    rejoinable: bool = False
    """Whether a client that lost the answer can come back to the run without the job's id (its
    answer's first words name it): by sending the request again (its `Idempotency-Key`), or
    through its session, whose history the reply joins."""
    repeated: bool = False
    """The request was sent again under its `Idempotency-Key`: the run is the earlier request's,
    whose stream its client may have part of (`api/core/streaming.py:resent_after`)."""
    _pumps: "list[asyncio.Task[None]]" = field(default_factory=list)

    @property
    def job(self) -> JobRef:
        return self.jobs[0]

    def events(self, after: int = 0) -> ChoiceEvents:
        """The run's events; with one job, those after its event `after` (a resumed stream)."""
        if len(self.jobs) == 1:
            return self._one(after)
        return self._merged()

    async def _one(self, after: int) -> ChoiceEvents:
        gateway, withdraw = self.gateway, not self.background
        followed = follow_job(
            gateway.reader, gateway.store, gateway.settings, self.job.id, after=after, withdraw=withdraw
        )
        async with aclosing(followed):  # closed with this one: the follower leaves at once
            async for batch in followed:
                if shown := [(0, seq, event) for seq, event in batch if self._shown(event)]:
                    yield shown

    async def _merged(self) -> ChoiceEvents:
        merged: asyncio.Queue[tuple[int, FollowedBatch]] = asyncio.Queue()
        self._pumps = [asyncio.create_task(self._pump(i, job.id, merged)) for i, job in enumerate(self.jobs)]
        ended = 0
        try:
            while ended < len(self.jobs):
                choice, batch = await merged.get()
                shown: list[ChoiceEvent] = []
                for seq, event in batch:
                    if isinstance(event, Failed):
                        await self.cancel("Another choice of the request failed.")
                        yield [*shown, (choice, seq, event)]
                        return
                    ended += isinstance(event, Done)
                    if self._shown(event):
                        shown.append((choice, seq, event))
                if shown:
                    yield shown
        finally:
            self.close()

    async def _pump(
        self, choice: int, job_id: str, merged: "asyncio.Queue[tuple[int, FollowedBatch]]"
    ) -> None:
        gateway = self.gateway
        try:
            async for batch in follow_job(
                gateway.reader, gateway.store, gateway.settings, job_id, withdraw=True
            ):
                await merged.put((choice, batch))
        except Exception:  # e.g. Redis gone for longer than its grace: the choice cannot be followed
            log.exception("lost track of a choice")
            failure = Failed(code=FailureCode.INTERNAL, message="The gateway lost track of a choice.")
            await merged.put((choice, [(0, failure)]))

    def _shown(self, event: FollowedEvent) -> TypeGuard[ShownEvent]:
        """Whether the caller sees the event (the agent's activity only if asked), counted if so.
        A prompt's usage is kept on the run instead, for the front end that shows it at the start."""
        if isinstance(event, PromptUsage):
            self.prompt_usage = self.prompt_usage or event.usage
            return False
        if not isinstance(event, Activity):
            return True
        if self.reasoning:
            metrics.count_activity(event.type)
        return self.reasoning

    def close(self) -> None:
        """Stops following the choices (the reader is gone)."""
        for pump in self._pumps:
            pump.cancel()

    def shutting_down(self) -> OpenAIError:
        """What a request still waiting for the run when its API process shuts down answers."""
        message = (
            f"This API process shut down while job {self.job.id} ran; the job goes on unless its "
            "worker stops too: retrieve it by its id (it ends completed or failed) rather than send "
            "the request again."
        )
        return OpenAIError(503, message, type="server_error", code="server_shutting_down", headers=NO_RETRY)

    async def cancel(self, message: str) -> None:
        failure = Failed(code=FailureCode.CANCELLED, message=message)
        for job in self.jobs:
            await self.gateway.store.stop(job.id, withdraw_only=False, failure=failure)

    def queue_lost(self) -> OpenAIError:
        """For a request that lost Redis past `REDIS_OUTAGE_GRACE_S` before it answered: its job
        may run on, and an SDK's retry of a plain 503 would run the agent again."""
        message = (
            f"The gateway lost touch with its queue (Redis) while job {self.job.id} ran; it may still "
            "complete: retrieve it by its id rather than send the request again."
        )
        return OpenAIError(503, message, type="server_error", code="queue_unavailable", headers=NO_RETRY)

    async def answered(self, receive: Receive) -> list[Reply]:
        """`collect`, for a client waiting for the whole answer on `receive` (its request's body
        read). A client that leaves first has not seen the job's id: its jobs are cancelled unless
        it can come back to them (`rejoinable`; `CANCEL_ON_DISCONNECT` cancels them anyway). An
        SDK's retry after its timeout had run the agent again beside the first (an outside probe)."""
        collecting = asyncio.ensure_future(self.collect())
        gone = asyncio.ensure_future(until_disconnect(receive))
        try:
            await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collecting.done():
                collecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # the client left: its follower goes
            return await collecting
        raise await self.left_before("the answer")

    async def left_before(self, what: str) -> OpenAIError:
        """The error for a client that left before `what` (it had not seen the jobs' ids), having
        cancelled the jobs unless the client can come back to them (`rejoinable`; a background run
        runs on; `CANCEL_ON_DISCONNECT` cancels them anyway)."""
        if not self.background and (self.gateway.settings.cancel_on_disconnect or not self.rejoinable):
            await self.cancel(f"The client disconnected before {what}.")
        return OpenAIError(
            499, "The client disconnected.", type="invalid_request_error", code="client_closed"
        )

    async def collect(self) -> list[Reply]:
        """Each choice's whole reply; raises the first failure (and a reply that breaks the format)."""
        events: list[list[JobEventValue]] = [[] for _ in self.jobs]
        replies: dict[int, Reply] = {}
        try:
            with self.gateway.streams.waiting(self.shutting_down):
                async for batch in self.events():
                    for choice, _, event in batch:
                        if isinstance(event, KeepAlive):
                            continue
                        events[choice].append(event)
                        if isinstance(event, Failed):
                            raise OpenAIError.from_failure(event)
                        if isinstance(event, Done):
                            kept = settled(events[choice])
                            text, _ = reply_of(kept)
                            replies[choice] = Reply(text, event, kept)
        except (RedisConnectionError, RedisTimeoutError) as exc:  # longer than REDIS_OUTAGE_GRACE_S
            raise self.queue_lost() from exc
        except BaseException:
            if len(self.jobs) > 1:
                await self.cancel("Another choice of the request failed.")
            raise
        if self.response_format is not None:
            for reply in replies.values():
                finish = reply.done.finish_reason.value
                reply.text = await self.response_format.check_finished_off_loop(reply.text, finish)
        return [replies[choice] for choice in range(len(self.jobs))]


async def delete_job(store: JobStore, record: JobRecord) -> bool:
    """Deletes the job and its events, with the request's other choices' (`n > 1`); one that has
    not ended is cancelled first (409 if it has not stopped within the cancel's wait: its worker
    still writes). False: it was gone already (a delete that ran at the same time)."""
    job_ids = [record.id, *record.choices]
    await asyncio.gather(*(cancel_job(store, job_id) for job_id in job_ids))
    deleted = [await store.delete(job_id) for job_id in job_ids]
    if "running" in deleted:
        raise OpenAIError(
            409, "The job is still stopping; retry the delete in a moment.", type="invalid_request_error"
        )
    return deleted[0] == "deleted"


async def cancel_job(store: JobStore, job_id: str) -> None:
    """Cancels the job and gives its worker a moment to stop it, so the answer is usually final."""
    if await store.stop(job_id, withdraw_only=False, failure=CANCELLED) == "cancelling":
        deadline = asyncio.get_running_loop().time() + _CANCEL_WAIT_S
        while (current := await store.get(job_id)) is not None and current.ended is None:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
