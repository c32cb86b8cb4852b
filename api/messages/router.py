"""`POST /v1/messages`: the Anthropic Messages API on the gateway's queue and workers.

The request is translated into the core request and queued as one job, exactly as
`/v1/chat/completions` does; the reply is rendered as an Anthropic `Message` or its event stream,
and every error in Anthropic's shape (`api/errors.py`).
"""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.core.sse import EventStreamResponse
from api.core.streaming import event_stream
from api.core.submit import IDEMPOTENCY_HEADER, Idempotency, submit
from api.deps import Caller, Gateway
from api.errors import ANTHROPIC_COMPLETION_ERRORS
from api.messages.outbound import MessageStream, message_body
from api.messages.protocol import CreateMessageRequest, Message, core_request

router = APIRouter()


@router.post(
    "/v1/messages",
    response_model=Message,
    responses=ANTHROPIC_COMPLETION_ERRORS,
    openapi_extra={"parameters": [IDEMPOTENCY_HEADER]},
)
async def create_message(body: CreateMessageRequest, request: Request) -> JSONResponse | EventStreamResponse:
    idempotency = Idempotency.of(request, body)
    run = await submit(
        core_request(body), request, Gateway.of(request), Caller.of(request), idempotency=idempotency
    )
    if not body.stream:
        return JSONResponse(message_body(run.job, (await run.answered(request.receive))[0]).model_dump())
    # Its stream has no ids to resume by: only a request sent again with its key follows its job.
    rejoinable = idempotency is not None
    return await event_stream(run, MessageStream(run), rejoinable=rejoinable, receive=request.receive)
