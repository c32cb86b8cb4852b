"""A job's events as an OpenAI chat completion stream (SSE), live or resumed.

Every chunk made from a job event carries `id: <seq>`; a client that reconnects with
`Last-Event-ID: <seq>` (or `?starting_after=<seq>`) gets exactly the chunks after it. When one
event becomes several chunks (finish, then usage), only the last carries the id, so a resume
from an earlier id replays all of them. The role chunk is the stream's start (`id: 0`).
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.chat.outbound import ChunkRenderer, error_chunk
from api.errors import ErrorInfo, OpenAIError
from shared.events import JobEventValue
from shared.jobs import Delta, Done, Failed

log = logging.getLogger("gateway.api")

Events = AsyncIterator[tuple[int, JobEventValue]]
OnAbandon = Callable[[], Coroutine[Any, Any, None]]
_abandoned: set["asyncio.Task[None]"] = set()  # strong references until they finish


async def first_event(events: Events, wait_s: float) -> "asyncio.Future[tuple[int, JobEventValue]]":
    """Waits up to `wait_s` for the job's first event, and raises its failure if it is one.

    Holding the response headers until then means a failure before any output (bad upstream
    credentials, no worker) gets its real HTTP status instead of a 200 stream. A job silent for
    longer (a long tool run) gets its headers then, and keep-alive pings.
    """
    first = asyncio.ensure_future(anext(events))
    await asyncio.wait({first}, timeout=wait_s)
    if first.done() and isinstance(failure := first.result()[1], Failed):
        raise OpenAIError.from_failure(failure)
    return first


def sse_response(
    renderer: ChunkRenderer,
    events: Events,
    *,
    after: int = 0,
    first: "asyncio.Future[tuple[int, JobEventValue]] | None" = None,
    on_abandon: OnAbandon | None = None,
) -> EventSourceResponse:
    """The SSE response for the job's events after `after`; `on_abandon` runs if the client leaves."""
    return EventSourceResponse(_chunks(renderer, events, after, first, on_abandon), ping=15)


async def _chunks(
    renderer: ChunkRenderer,
    events: Events,
    after: int,
    first: "asyncio.Future[tuple[int, JobEventValue]] | None",
    on_abandon: OnAbandon | None,
) -> AsyncIterator[bytes]:
    # Chunks that are ready together go out as one body message: each message is a trip through
    # every middleware's `send` and a socket write, so the role chunk rides with the first
    # content and the closing chunks with [DONE].
    ready = [ServerSentEvent(renderer.role(), id="0")] if after == 0 else []
    finished = False
    try:
        pending = first if first is not None else asyncio.ensure_future(anext(events))
        if ready and not pending.done():  # a slow start: the stream opens at once anyway
            yield joined(ready)
            ready = []
        seq, event = await pending
        while True:
            if isinstance(event, Delta):
                ready.append(ServerSentEvent(renderer.content(event.text), id=str(seq)))
                yield joined(ready)
                ready = []
                seq, event = await anext(events)
                continue
            if isinstance(event, Done):
                if event.tool_calls:
                    ready.append(ServerSentEvent(renderer.tool_calls(event)))
                if renderer.include_usage:
                    ready.append(ServerSentEvent(renderer.finish(event)))
                    ready.append(ServerSentEvent(renderer.usage(event), id=str(seq)))
                else:
                    ready.append(ServerSentEvent(renderer.finish(event), id=str(seq)))
            else:
                chunk = error_chunk(OpenAIError.from_failure(event).info)
                ready.append(ServerSentEvent(chunk, id=str(seq)))
            finished = True
            break
    except RedisError:
        # Headers are gone already: the failure can only be reported in the stream.
        log.warning("lost Redis while relaying a stream")
        error = ErrorInfo(
            message="The gateway lost its queue mid-stream; resume with Last-Event-ID.",
            type="server_error",
            code="queue_unavailable",
        )
        ready.append(ServerSentEvent(error_chunk(error)))
        finished = True
    finally:
        if not finished:
            abandoned(on_abandon)
    yield joined([*ready, ServerSentEvent("[DONE]")])


def abandoned(on_abandon: OnAbandon | None) -> None:
    """The client left mid-stream and this task is being cancelled: run `on_abandon` apart."""
    if on_abandon is not None:
        task = asyncio.get_running_loop().create_task(on_abandon())
        _abandoned.add(task)
        task.add_done_callback(_abandoned.discard)


def joined(events: list[ServerSentEvent]) -> bytes:
    """Events as one body message."""
    return b"".join(event.encode() for event in events)
