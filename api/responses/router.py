"""The OpenAI Responses API on the gateway's queue and workers (see docs/openai-compatibility.md).

`POST /v1/responses` translates the input items into the core request and queues one job, exactly
as `/v1/chat/completions` does; the response is `resp_<job id>`. `GET /v1/responses/{id}` retrieves
it (`?stream=true&starting_after=N` replays and follows its events), `POST .../cancel` stops it,
`DELETE` removes it (cancelled first if it still runs).
A response belongs to the API key that created it: any other key gets 404, as for an unknown id.
"""

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from api.access import stored_limit
from api.core.conversation import ChatMessage
from api.core.run import Run, cancel_job, delete_job, reply_of
from api.core.sessions import requested_session_id
from api.core.sse import EventStreamResponse
from api.core.streaming import StartingAfter, event_stream, resent_after, resumed_after
from api.core.structured import ResponseFormat
from api.core.submit import IDEMPOTENCY_HEADER, Idempotency, submit
from api.deps import Caller, CallerDep, Gateway, GatewayDep
from api.errors import COMPLETION_ERRORS, OpenAIError
from api.responses import response as stored_responses
from api.responses.inbound import check_supported, core_request, stored_request
from api.responses.protocol import RESPONSE_ID_PREFIX, CreateResponseRequest, Response, ResponseDeleted
from api.responses.response import StoredResponse, response_body
from api.responses.stream import ResponseEventRenderer
from shared import sessions
from shared.events import events_so_far
from shared.jobs import Activity, JobStatus
from shared.jobstore import JobRecord
from shared.keys import is_job_id, session_key

router = APIRouter()


@router.post(
    "/v1/responses",
    response_model=Response,
    responses=COMPLETION_ERRORS,
    openapi_extra={"parameters": [IDEMPOTENCY_HEADER]},
)
async def create_response(
    body: CreateResponseRequest, request: Request
) -> JSONResponse | EventStreamResponse:
    check_supported(body)
    idempotency = Idempotency.of(request, body)
    gateway, caller = Gateway.of(request), Caller.of(request)
    session_id = requested_session_id(body.session_id, request.headers)
    earlier: list[ChatMessage] = []
    if body.previous_response_id is not None:
        earlier = await _continued(gateway, caller, body.previous_response_id, session_id)
    core = core_request(body, earlier)
    stored = stored_request(body, core, gateway.settings, session_id)
    keeper = stored_responses.Keeper(gateway.redis, gateway.settings, stored, stored_limit(gateway, request))
    try:
        run = await submit(core, request, gateway, caller, idempotency=idempotency, companion=keeper)
    except OpenAIError as refused:
        # The core names the chat request it checks (`messages[2].content[0]`, the instructions
        # among them); the caller sent `input` (an outside probe was told of `messages`).
        if (param := refused.info.param) is not None and param.startswith("messages"):
            refused.info.param = "input"
        raise
    if body.background and not body.stream:
        return JSONResponse(response_body(run.job, stored, JobStatus.QUEUED, "", None).wire())
    if not body.stream:
        reply = (await run.answered(request.receive))[0]
        return JSONResponse(
            response_body(run.job, stored, JobStatus.COMPLETED, reply.text, reply.done, reply.events).wire()
        )
    if (after := resent_after(run, request.headers)) is not None:  # resumed: read as a retrieval is
        return await event_stream(run, ResponseEventRenderer(run.job, stored, after=after), live=False)
    return await event_stream(run, ResponseEventRenderer(run.job, stored), receive=request.receive)


@router.get("/v1/responses/{response_id}", response_model=Response, responses=COMPLETION_ERRORS)
async def retrieve_response(
    response_id: str,
    gateway: GatewayDep,
    caller: CallerDep,
    stream: bool = False,
    starting_after: StartingAfter = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> JSONResponse | EventStreamResponse:
    record, stored = await _owned(gateway, caller, response_id)
    if not stream:
        return JSONResponse((await _snapshot(gateway, record, stored)).wire())
    after = resumed_after(starting_after, last_event_id)
    # The whole stream is read (earlier deltas make up the final text); the renderer skips to `after`.
    response_format = ResponseFormat.from_text_format(stored.text_format)  # sent checked, as first
    run = Run(gateway, [record], True, response_format, stored.reasoning)  # a reader, not its owner
    return await event_stream(
        run, ResponseEventRenderer(record, stored, after=-1 if after is None else after), live=False
    )


@router.post("/v1/responses/{response_id}/cancel", response_model=Response, responses=COMPLETION_ERRORS)
async def cancel_response(response_id: str, gateway: GatewayDep, caller: CallerDep) -> JSONResponse:
    record, _ = await _owned(gateway, caller, response_id)
    await cancel_job(gateway.store, record.id)
    record, stored = await _owned(gateway, caller, response_id)
    return JSONResponse((await _snapshot(gateway, record, stored)).wire())


@router.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, responses=COMPLETION_ERRORS)
async def delete_response(response_id: str, gateway: GatewayDep, caller: CallerDep) -> ResponseDeleted:
    record, _ = await _owned(gateway, caller, response_id)
    if not await delete_job(gateway.store, record):
        raise _not_found(response_id, "response_id")  # another delete was first
    return ResponseDeleted(id=response_id)


async def _owned(
    gateway: Gateway, caller: Caller, response_id: str, param: str = "response_id"
) -> tuple[JobRecord, StoredResponse]:
    job_id = response_id.removeprefix(RESPONSE_ID_PREFIX)
    found = is_job_id(job_id) and response_id.startswith(RESPONSE_ID_PREFIX)
    record = await gateway.store.get(job_id) if found else None
    stored = await stored_responses.load(gateway.redis, job_id) if record is not None else None
    if record is None or stored is None or record.owner != caller.key_id:
        raise _not_found(response_id, param)
    return record, stored


def _not_found(response_id: str, param: str) -> OpenAIError:
    message = f"No response found with id '{response_id[:100]}'."
    return OpenAIError.not_found(message, param=param, code="not_found")


async def _continued(
    gateway: Gateway, caller: Caller, previous_id: str, session_id: str | None
) -> list[ChatMessage]:
    """The conversation the previous response continues with, for a request in `session_id`."""
    record, stored = await _owned(gateway, caller, previous_id, param="previous_response_id")
    # In a session too: its turn is not the session's (found by an outside probe).
    if record.status is not JobStatus.COMPLETED:
        raise OpenAIError.invalid(
            f"The previous response is {record.status.value}; only a completed response can be continued.",
            param="previous_response_id",
            code="previous_response_not_completed",
        )
    if stored.session_id is not None:  # its session holds the conversation, the response only its turn
        if stored.session_id == session_id:
            owner = sessions.owner_of(caller.key_id)
            transcript = await gateway.redis.hget(session_key(owner, session_id), "transcript")  # type: ignore[misc]
            if transcript is None or transcript.decode() != stored.session_transcript:
                raise OpenAIError.invalid(
                    f"The session '{session_id}' this response was made in has been deleted or has "
                    "expired since (or started anew): its conversation is gone.",
                    param="previous_response_id",
                    code="previous_response_session_gone",
                )
            return []
        raise OpenAIError.invalid(
            f"The previous response was made in session '{stored.session_id}', which holds its "
            "conversation: continue it with that session_id.",
            param="previous_response_id",
            code="previous_response_in_session",
        )
    if not stored.store:
        raise OpenAIError.invalid(
            "The previous response was created with store: false and cannot be continued.",
            param="previous_response_id",
            code="previous_response_not_stored",
        )
    return await stored_responses.continued_conversation(gateway.redis, stored, record.id)


async def _snapshot(gateway: Gateway, record: JobRecord, stored: StoredResponse) -> Response:
    events = await events_so_far(gateway.store.redis, record.id)
    text, terminal = reply_of(events)
    if not stored.reasoning:
        events = [event for event in events if not isinstance(event, Activity)]
    return response_body(record, stored, record.status, text, terminal, events)
