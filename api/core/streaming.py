"""A run's events as a server-sent event stream: the one relay loop every front end renders into.

The front end supplies a `StreamRenderer` (its wire format); this module owns what every stream
shares: holding the headers until the first event (so an early failure gets its real status),
batching what is ready together into one body message, ending on the terminal event, ending early
(in-stream) on a lost queue, on text the model API took back or on the server's shutdown (whose
error says to resume), a keep-alive ping through a silence, and cancelling the jobs when a live
client goes away (not when the server ends the stream at shutdown, if its client can come back).

Text already sent cannot be taken back: when the model API cuts a message and its retry says
something else (a `Retraction`), the stream ends with a retryable error instead of joining the two.
The job goes on, and its stored reply (a retrieval, the session's history) keeps only the retried text.
"""

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping, Sequence
from functools import partial
from typing import Annotated, Any, Protocol

from fastapi import Query
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sse_starlette import ServerSentEvent
from starlette.types import Receive

from api.core.relay import KEEP_ALIVE, KEEP_ALIVE_S, KeepAlive
from api.core.run import ChoiceEvent, ChoiceEvents, Run
from api.core.sse import EventStreamResponse, FinalChunk, OpenStreams, until_disconnect
from api.errors import OpenAIError
from shared.jobs import Activity, Delta, Done, Failed, FailureCode, Retraction

log = logging.getLogger("gateway.api")

First = asyncio.Future[Sequence[ChoiceEvent]]
Rendered = Delta | Activity | Done | Failed
"""What a renderer is given: every event but a `Retraction`, which ends the stream before it."""
OnAbandon = Callable[[], Coroutine[Any, Any, None]]
_abandoned: set["asyncio.Task[None]"] = set()  # strong references until they finish
_LOST_QUEUE = OpenAIError(
    500,
    "The gateway lost its queue mid-stream; resume the stream after the last event id received.",
    type="server_error",
    code="queue_unavailable",
)
_DIVERGED = OpenAIError.from_failure(
    Failed(
        code=FailureCode.RETRY_DIVERGED,
        message="The model API cut this answer and its retry says something else than the text "
        "already sent, so this stream ends here rather than join the two; the job goes on and keeps "
        "only the retried answer (a retrieval by this stream's id, or the session, has it once the "
        "job ends), or send the request again.",
    )
)
_SERVER_ENDING = OpenAIError(
    503,
    "This API process is shutting down; resume the stream after the last event id received.",
    type="server_error",
    code="server_shutting_down",
)
_SERVER_ENDING_FOR_GOOD = OpenAIError(
    503,
    "This API process is shutting down; this stream cannot be resumed and its job is cancelled: "
    "send the request again.",
    type="server_error",
    code="server_shutting_down",
)
_PING = ServerSentEvent(comment="ping")
_PING_LINE = b": ping\r\n"
"""The keep-alive as sent: a comment line without the blank line that would end an event. Ended,
it is an event of no data for a decoder that keeps the last `id:` (as SSE's does): the `openai`
SDK then parses that empty data as JSON and fails (an outside probe: every stream silent for
`KEEP_ALIVE_S`). The comment goes with the next event instead, which the decoders skip it in."""
_EVENT_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits: `str.isdigit` also takes "²", which `int` refuses
StartingAfter = Annotated[int | None, Query(ge=0, le=10**18 - 1)]
"""`?starting_after=`: an event id, bounded as `Last-Event-ID` is (Redis refuses larger ones)."""


class StreamRenderer(Protocol):
    """A wire format's events for one run; each method returns what to send, in order."""

    def opening(self) -> list[ServerSentEvent]:
        """What opens the stream (empty when resuming past it): asked when the run's first events
        have come, or at once if they are slow to."""

    def render(self, choice: int, seq: int, event: Rendered) -> list[ServerSentEvent]: ...

    def interrupted(self, error: OpenAIError) -> list[ServerSentEvent]:
        """The in-stream error that ends a stream early (after its headers), without an event id:
        resuming past it must not be possible."""

    def closing(self) -> list[ServerSentEvent]:
        """What ends the stream after its last event (e.g. chat's `[DONE]`)."""


async def event_stream(
    run: Run,
    renderer: StreamRenderer,
    *,
    after: int = 0,
    live: bool = True,
    rejoinable: bool = True,
    receive: Receive | None = None,
) -> EventStreamResponse:
    """The run's stream after event `after`. `live`: the request that queued the run, which waits
    for the first event before answering and cancels the run if its client leaves (unless the run
    is in the background, or `CANCEL_ON_DISCONNECT` is off). `rejoinable`: its client can come back
    to the run when a shutdown ends the stream (by its id; a Messages request only by sending its
    `Idempotency-Key` again); a live one that cannot is cancelled then, as if its client had left:
    told to send the request again, it would run the agent twice. A live one's client that leaves
    before the headers (`receive`: its request's, body read) had not seen the run's id: it is
    treated as a plain request's (`Run.left_before`)."""
    settings = run.gateway.settings
    # A structured run is checked whole, then sent as one delta: until then, the stream's opening
    # and keep-alive pings (it sent nothing until the job ended: an outside probe's SDK timed out
    # and, retrying, ran the agent three times).
    events = run.events(after) if run.response_format is None else _checked(run)
    if live:
        with run.gateway.streams.waiting(run.shutting_down):
            try:
                first = await first_events(
                    events, settings.stream_commit_after_s, receive, run.gateway.streams
                )
            except (RedisConnectionError, RedisTimeoutError) as exc:  # longer than REDIS_OUTAGE_GRACE_S
                raise run.queue_lost() from exc  # before the headers: as a plain request's (a probe)
            except _ClientLeft:
                raise await run.left_before("the stream began") from None
    else:
        first = None

    async def abandoned() -> None:
        """The stream ended before the run did: its client left (its jobs cancelled with
        CANCEL_ON_DISCONNECT), or the server's shutdown ended it (cancelled if its client cannot
        come back: it was told to send the request again; an outside probe's Messages stream ran
        on beside the request sent again)."""
        if run.gateway.streams.ending:
            if not rejoinable:
                await run.cancel("The API process shut down; the client sends the request again.")
        elif settings.cancel_on_disconnect:
            await run.cancel("The client disconnected.")

    # A request sent again follows the earlier one's job, as a retrieval does: leaving, it cancels
    # nothing (a re-check probe's re-send cancelled a job its first client still read).
    cancels = live and not run.background and not run.repeated
    body = _relay(run, renderer, events, first, abandoned if cancels else None)
    farewell = _SERVER_ENDING if rejoinable else _SERVER_ENDING_FOR_GOOD
    return EventStreamResponse(body, run.gateway.streams, partial(_farewell, renderer, farewell))


class _ClientLeft(Exception):
    """The client left before the run's first events."""


async def first_events(
    events: ChoiceEvents, wait_s: float, receive: Receive | None, streams: OpenStreams
) -> First:
    """Waits up to `wait_s` for the run's first events, and raises the failure if the first is one,
    or `_ClientLeft` if the client of `receive` leaves first.

    A run silent for longer (a long tool run) gets its headers then, and keep-alive pings; so does
    one whose API process is shutting down (the stream is then ended at once, resumable by id).
    """
    first = asyncio.ensure_future(anext(events))
    watched: set[asyncio.Future[Any]] = {first, streams.ended}
    gone = None if receive is None else asyncio.ensure_future(until_disconnect(receive))
    if gone is not None:
        watched.add(gone)
    try:
        await asyncio.wait(watched, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if gone is not None:
            gone.cancel()
    if not first.done() and gone is not None and gone.done() and not gone.cancelled():
        first.cancel()
        raise _ClientLeft
    if first.done() and isinstance(failure := first.result()[0][2], Failed):
        raise OpenAIError.from_failure(failure)
    return first


async def _checked(run: Run) -> ChoiceEvents:
    """A structured run's checked replies as events, once all are whole (keep-alives meanwhile):
    per choice the agent's activity it was to see, one delta of the checked text (none if empty),
    then its terminal event. A failure, or a reply that breaks the format, is raised."""
    collecting = asyncio.ensure_future(run.collect())
    try:
        while not (await asyncio.wait({collecting}, timeout=KEEP_ALIVE_S))[0]:
            yield [(0, 0, KEEP_ALIVE)]
        replies = collecting.result()
    finally:
        collecting.cancel()
    batch: list[ChoiceEvent] = []
    for choice, reply in enumerate(replies):
        activity = [event for event in reply.events if isinstance(event, Activity)]
        text = [Delta(text=reply.text)] if reply.text else []
        events = [*activity, *text, reply.done]
        batch += [(choice, seq, event) for seq, event in enumerate(events, start=1)]
    yield batch


async def _relay(
    run: Run,
    renderer: StreamRenderer,
    events: ChoiceEvents,
    first: First | None,
    on_abandon: OnAbandon | None,
) -> AsyncGenerator[bytes, None]:
    # What is ready together goes out as one body message: each message is a trip through every
    # middleware's `send`, a socket write and a wake-up of the client. So the events read together
    # go out together (a resumed stream's whole backlog, the last text with the end), the opening
    # rides with the first of them, and the closing with the last and the end of the response
    # (`FinalChunk`).
    finished = False
    ended = 0
    pending = first if first is not None else asyncio.ensure_future(anext(events))
    ready: list[ServerSentEvent] = []
    try:
        if not pending.done():  # a slow start: the stream opens at once anyway
            if opening := renderer.opening():
                yield joined(opening)
        else:  # opened with the first events, once the run has seen them (Messages' usage)
            ready = renderer.opening()
        batch = await pending
        while True:
            ended, over = _render(renderer, batch, ready, ended, len(run.jobs))
            if over:
                break
            if ready:
                yield joined(ready)
                ready = []
            batch = await anext(events)
        finished = True
    except StopAsyncIteration:  # a resume past the job's end: nothing follows but the closing
        finished = True
    except RedisError:
        # Headers are gone already: the failure can only be reported in the stream.
        log.warning("lost Redis while relaying a stream")
        ready += renderer.interrupted(_LOST_QUEUE)
        finished = True
    except OpenAIError as failure:  # a structured run's, after its headers
        ready += renderer.interrupted(failure)
        finished = True
    finally:
        run.close()
        # The events end here, usually before their generators do: closed now, their follower
        # leaves at once (left to the garbage collector, each would cost a loop wake-up and a task).
        if pending.done():
            await events.aclose()
        else:  # still waiting for the first events: cancelled, it closes them as it unwinds
            pending.cancel()
        if not finished and on_abandon is not None:
            # The client left mid-stream, or the shutdown ended it, and this task is being
            # cancelled: run it apart.
            task = asyncio.get_running_loop().create_task(on_abandon())
            _abandoned.add(task)
            task.add_done_callback(_abandoned.discard)
    yield FinalChunk(joined([*ready, *renderer.closing()]))


def _render(
    renderer: StreamRenderer,
    batch: Sequence[ChoiceEvent],
    ready: list[ServerSentEvent],
    ended: int,
    choices: int,
) -> tuple[int, bool]:
    """Adds what `batch` shows to `ready`. Returns how many of the `choices` have ended (`ended`
    before it), and whether the stream ends here: every choice ended, or one failed, or a
    `Retraction` stopped it."""
    for choice, seq, event in batch:
        if isinstance(event, KeepAlive):
            ready.append(_PING)
        elif isinstance(event, Retraction):
            ready.extend(renderer.interrupted(_DIVERGED))
            return ended, True
        else:
            ready.extend(renderer.render(choice, seq, event))
            ended += isinstance(event, Done | Failed)
            if isinstance(event, Failed) or ended == choices:
                return ended, True
    return ended, False


def _farewell(renderer: StreamRenderer, error: OpenAIError) -> bytes:
    """What a stream ended by the server's shutdown sends last: an error, without the stream's
    closing (chat's `[DONE]` would say it is complete), so its client resumes it by id, or sends
    the request again where it cannot."""
    return joined(renderer.interrupted(error))


def joined(events: list[ServerSentEvent]) -> bytes:
    """Events as one body message."""
    return b"".join(map(_encoded, events))


def _encoded(event: ServerSentEvent) -> bytes:
    """sse-starlette's `encode`, byte for byte, without its regular expressions and buffer for the
    usual event (an id, a name and one line of data, as JSON is): a third of its time, on
    every token's path. Anything else (a comment, a line break) takes its `encode`."""
    data, id_, name = event.data, event.id, event.event
    if event.comment is not None or event.retry is not None or not isinstance(data, str):
        return _PING_LINE if event is _PING else event.encode()
    head = ("" if id_ is None else f"id: {id_}\r\n") + ("" if name is None else f"event: {name}\r\n")
    text = f"{head}data: {data}\r\n\r\n"
    line_ends = (id_ is not None) + (name is not None) + 2
    if text.count("\n") != line_ends or text.count("\r") != line_ends:  # a field breaks a line
        return event.encode()
    return text.encode()


def resent_after(run: Run, headers: Mapping[str, str]) -> int | None:
    """The last event id a client that sends its request again has (`Run.repeated`, its
    `Last-Event-ID`): its stream resumes after it, as a retrieval's would (an outside probe's
    resent request replayed the whole stream, as SSE clients that retry a POST send it)."""
    return resumed_after(None, headers.get("last-event-id")) if run.repeated else None


def resumed_after(starting_after: int | None, last_event_id: str | None) -> int | None:
    """The id of the last event a resuming client has (`?starting_after=`, else `Last-Event-ID`);
    None: the stream from its start."""
    if starting_after is not None:
        return starting_after
    if last_event_id is None:
        return None
    if not _EVENT_ID.fullmatch(last_event_id):
        raise OpenAIError.invalid(
            "Last-Event-ID must be an event id this stream sent.", param="Last-Event-ID"
        )
    return int(last_event_id)
