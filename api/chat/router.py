"""`POST /v1/chat/completions`: the request translated into the core's, then its run rendered as
one JSON body or as SSE chunks; with `background: true`, the queued job at once (poll or stream
it by id, `api/chat/retrieval.py`), or with `stream: true` too, its stream, which a disconnect
never cancels."""

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.chat.inbound import core_request
from api.chat.outbound import ChunkRenderer, completion_body, events_after, queued_body
from api.chat.protocol import ChatCompletion, ChatCompletionRequest
from api.core.sse import EventStreamResponse
from api.core.streaming import event_stream, resent_after
from api.core.submit import IDEMPOTENCY_HEADER, Idempotency, submit
from api.deps import Caller, Gateway
from api.errors import COMPLETION_ERRORS
from shared import logs

log = logging.getLogger("gateway.api")
router = APIRouter()


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses=COMPLETION_ERRORS,
    openapi_extra={"parameters": [IDEMPOTENCY_HEADER]},
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request
) -> JSONResponse | EventStreamResponse:
    idempotency = Idempotency.of(request, body)
    gateway, caller = Gateway.of(request), Caller.of(request)
    run = await submit(core_request(body), request, gateway, caller, idempotency=idempotency)
    legacy = body.legacy_functions
    checked_format = body.response_format if run.response_format is not None else None
    await gateway.store.keep_reply_form(run.job.id, response_format=checked_format, legacy_functions=legacy)
    logs.bind(job_id=run.job.id)
    log.info(
        "queued %d job(s) (model %s, stream %s, background %s)",
        len(run.jobs),
        body.model,
        body.stream,
        body.background,
    )
    if body.background and not body.stream:
        return JSONResponse(queued_body(run.job).model_dump())
    if not body.stream:
        return JSONResponse(
            completion_body(run.job, await run.answered(request.receive), legacy=legacy).model_dump()
        )
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    after = resent_after(run, request.headers)
    renderer = ChunkRenderer(
        run.job, include_usage=include_usage, choices=len(run.jobs), after=after, legacy=legacy
    )
    if after is not None:  # resumed: read as a retrieval is (its client may have the end already)
        return await event_stream(run, renderer, after=events_after(after), live=False)
    # Several choices' stream has no ids to resume by (a fan-out is no durable job).
    return await event_stream(run, renderer, rejoinable=len(run.jobs) == 1, receive=request.receive)
