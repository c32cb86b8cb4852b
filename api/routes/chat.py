"""`POST /v1/chat/completions`: one request, followed from HTTP to the worker and back.

1. validate and translate the request into a `CompletionJob`;
2. enqueue it (arq, JSON) and wake a worker;
3. follow the job's event stream in Redis and render it as one JSON body or as SSE chunks.
"""

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import CallerDep, GatewayDep
from api.errors import OpenAIError
from api.protocol import ChatCompletion, ChatCompletionRequest, ErrorInfo, ErrorResponse
from api.relay import follow_job
from api.render import ChunkRenderer, completion_body, error_chunk
from api.sessions import abandon, attach, requested_session_id
from api.translate import build_job
from shared import queue
from shared.events import JobEventValue
from shared.jobs import CompletionJob, Delta, Done, Failed

log = logging.getLogger("gateway.api")
router = APIRouter()

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 500, 502, 503, 504)
}


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, gateway: GatewayDep, caller: CallerDep
) -> JSONResponse | EventSourceResponse:
    session_id = requested_session_id(body, request)
    job = build_job(body, request.state.request_id, gateway.settings)
    if session_id is not None:
        job = await attach(gateway.redis, gateway.settings, caller.key_id, session_id, job)
    try:
        await queue.enqueue(gateway.redis, job)
    except BaseException:
        await abandon(gateway.redis, job)
        raise
    events = follow_job(gateway.redis, gateway.settings, job)
    if not body.stream:
        return JSONResponse((await _collect(job, events)).model_dump())
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    renderer = ChunkRenderer(job, include_usage=include_usage)
    # Hold the response headers until the job's first event, so a failure before any output
    # (bad upstream credentials, no worker) gets its real HTTP status instead of a 200 stream.
    # A job silent for longer (a long tool run) gets its headers then, and keep-alive pings.
    first = asyncio.ensure_future(anext(events))
    await asyncio.wait({first}, timeout=gateway.settings.stream_commit_after_s)
    if first.done() and isinstance(failure := first.result(), Failed):
        raise OpenAIError.from_failure(failure)
    return EventSourceResponse(_stream(renderer, first, events), ping=15)


async def _collect(job: CompletionJob, events: AsyncIterator[JobEventValue]) -> ChatCompletion:
    parts: list[str] = []
    async for event in events:
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Done):
            return completion_body(job, "".join(parts), event)
        else:
            raise OpenAIError.from_failure(event)
    raise AssertionError("follow_job always ends with a terminal event")


async def _stream(
    renderer: ChunkRenderer, first: "asyncio.Future[JobEventValue]", events: AsyncIterator[JobEventValue]
) -> AsyncIterator[ServerSentEvent]:
    yield ServerSentEvent(renderer.role())
    try:
        async for sse in _relay(renderer, await first, events):
            yield sse
    except RedisError:
        # Headers are gone already: the failure can only be reported in the stream.
        log.warning("lost Redis while relaying a stream")
        error = ErrorInfo(
            message="The gateway lost its queue mid-stream.", type="server_error", code="queue_unavailable"
        )
        yield ServerSentEvent(error_chunk(error))
    yield ServerSentEvent("[DONE]")


async def _relay(
    renderer: ChunkRenderer, event: JobEventValue, events: AsyncIterator[JobEventValue]
) -> AsyncIterator[ServerSentEvent]:
    while True:
        if isinstance(event, Delta):
            yield ServerSentEvent(renderer.content(event.text))
        elif isinstance(event, Done):
            yield ServerSentEvent(renderer.finish(event))
            if renderer.include_usage:
                yield ServerSentEvent(renderer.usage(event))
            break
        else:
            yield ServerSentEvent(error_chunk(OpenAIError.from_failure(event).info))
            break
        event = await anext(events)
