"""`POST /v1/messages`: the Anthropic Messages API on the gateway's queue and workers.

The request is translated into a chat request and queued as one job, exactly as
`/v1/chat/completions` does; the reply is rendered as an Anthropic `Message` or its event stream
(`message_start`, `content_block_start`, `content_block_delta`…, `content_block_stop`,
`message_delta`, `message_stop`). Errors keep the gateway's OpenAI shape, which the Anthropic
clients read as well (`error.message`, `error.type`).
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.core.functions import function_calling
from api.core.relay import follow_job
from api.core.streaming import first_event
from api.core.submit import prepare_job, queue_job
from api.deps import CallerDep, Gateway, GatewayDep
from api.errors import ErrorResponse, OpenAIError
from api.messages.protocol import (
    MESSAGE_ID_PREFIX,
    CreateMessageRequest,
    Message,
    TextBlock,
    stop_reason,
    to_chat_request,
    tool_use_blocks,
    usage_body,
)
from shared.events import JobEventValue
from shared.jobs import CompletionJob, Delta, Done, Failed, FailureCode, Usage

log = logging.getLogger("gateway.api")
router = APIRouter()

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 429, 500, 502, 503, 504)
}
_abandoned: set["asyncio.Task[object]"] = set()  # strong references until they finish


@router.post("/v1/messages", response_model=Message, responses=_ERRORS)
async def create_message(
    body: CreateMessageRequest, request: Request, gateway: GatewayDep, caller: CallerDep
) -> JSONResponse | EventSourceResponse:
    chat, calling = function_calling(to_chat_request(body))
    job = prepare_job(chat, request, gateway)
    if calling is not None:
        job = calling.instruct(job)
    await queue_job(job, request, gateway, caller)
    events = follow_job(gateway.store, gateway.settings, job.id, withdraw=True)
    if not body.stream:
        parts: list[str] = []
        async for _, event in events:
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Done):
                return JSONResponse(_message(job, "".join(parts), event).model_dump())
            else:
                raise OpenAIError.from_failure(event)
        raise AssertionError("follow_job always ends with a terminal event")
    first = await first_event(events, gateway.settings.stream_commit_after_s)
    return EventSourceResponse(_stream(gateway, job, first, events), ping=15)


def _message(job: CompletionJob, text: str, done: Done | None) -> Message:
    """The whole message once done; without `done`, the empty one `message_start` carries."""
    return Message(
        id=MESSAGE_ID_PREFIX + job.id,
        model=job.model,
        content=[TextBlock(text=text), *tool_use_blocks(done.tool_calls)] if done is not None else [],
        stop_reason=stop_reason(done) if done is not None else None,
        usage=usage_body(done.usage if done is not None else Usage()),
    )


def _event(kind: str, **data: object) -> ServerSentEvent:
    return ServerSentEvent(json.dumps({"type": kind, **data}, separators=(",", ":")), event=kind)


def _error(failure_type: str, message: str) -> ServerSentEvent:
    return _event("error", error={"type": failure_type, "message": message})


async def _stream(
    gateway: Gateway,
    job: CompletionJob,
    first: "asyncio.Future[tuple[int, JobEventValue]]",
    events: AsyncIterator[tuple[int, JobEventValue]],
) -> AsyncIterator[ServerSentEvent]:
    finished = False
    try:
        yield _event("message_start", message=_message(job, "", None).model_dump())
        yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
        _, event = await first
        while isinstance(event, Delta):
            yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": event.text})
            _, event = await anext(events)
        if isinstance(event, Done):
            yield _event("content_block_stop", index=0)
            for index, block in enumerate(tool_use_blocks(event.tool_calls), start=1):
                # Each call arrives whole: its input is one JSON delta.
                start = {**block.model_dump(), "input": {}}
                partial = {"type": "input_json_delta", "partial_json": json.dumps(block.input)}
                yield _event("content_block_start", index=index, content_block=start)
                yield _event("content_block_delta", index=index, delta=partial)
                yield _event("content_block_stop", index=index)
            usage = usage_body(event.usage).model_dump()
            yield _event(
                "message_delta", delta={"stop_reason": stop_reason(event), "stop_sequence": None}, usage=usage
            )
            yield _event("message_stop")
        else:
            error = OpenAIError.from_failure(event)
            yield _error("overloaded_error" if error.status == 503 else "api_error", error.info.message)
        finished = True
    except RedisError:
        # Headers are gone already: the failure can only be reported in the stream.
        log.warning("lost Redis while relaying a messages stream")
        yield _error("api_error", "The gateway lost its queue mid-stream.")
        finished = True
    finally:
        if not finished and gateway.settings.cancel_on_disconnect:
            # The client went away mid-stream; this task is being cancelled, so run it apart.
            failure = Failed(code=FailureCode.CANCELLED, message="The client disconnected.")
            task = asyncio.get_running_loop().create_task(
                gateway.store.stop(job.id, withdraw_only=False, failure=failure)
            )
            _abandoned.add(task)
            task.add_done_callback(_abandoned.discard)
