"""`POST /v1/chat/completions`: the request translated into the core's, then its run rendered as
one JSON body or as SSE chunks; with `background: true`, the queued job at once (poll or stream
it by id, `api/chat/retrieval.py`)."""

import logging
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from api.chat.inbound import core_request
from api.chat.outbound import ChunkRenderer, completion_body, queued_body
from api.chat.protocol import ChatCompletion, ChatCompletionRequest
from api.core.sse import EventStreamResponse
from api.core.streaming import event_stream
from api.core.submit import Idempotency, submit
from api.deps import CallerDep, GatewayDep
from api.errors import COMPLETION_ERRORS
from shared import logs

log = logging.getLogger("gateway.api")
router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=COMPLETION_ERRORS)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    gateway: GatewayDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse | EventStreamResponse:
    idempotency = Idempotency.of(idempotency_key, body.model_dump_json())
    run = await submit(core_request(body), request, gateway, caller, idempotency=idempotency)
    logs.bind(job_id=run.job.id)
    log.info(
        "queued %d job(s) (model %s, stream %s, background %s)",
        len(run.jobs),
        body.model,
        body.stream,
        body.background,
    )
    if body.background:
        return JSONResponse(queued_body(run.job).model_dump())
    if not body.stream:
        return JSONResponse(completion_body(run.job, await run.collect()).model_dump())
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return await event_stream(run, ChunkRenderer(run.job, include_usage=include_usage, choices=len(run.jobs)))
