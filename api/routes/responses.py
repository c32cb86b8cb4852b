"""The OpenAI Responses API on the gateway's queue and workers (see docs/openai-compatibility.md).

`POST /v1/responses` translates the input items into a chat request and queues one job, exactly as
`/v1/chat/completions` does; the response is `resp_<job id>`. `GET /v1/responses/{id}` retrieves
it (`?stream=true&starting_after=N` replays and follows its events), `POST .../cancel` stops it.
A response belongs to the API key that created it: any other key gets 404, as for an unknown id.
"""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.chat.functions import function_calling
from api.chat.protocol import ChatMessage
from api.chat.render import JobRef
from api.chat.streaming import first_event
from api.chat.structured import ResponseFormat
from api.deps import Caller, CallerDep, Gateway, GatewayDep
from api.errors import ErrorResponse, OpenAIError
from api.relay import follow_job
from api.responses import response as stored_responses
from api.responses.protocol import (
    RESPONSE_ID_PREFIX,
    CreateResponseRequest,
    Response,
    chat_tool_choice,
    chat_tools,
    to_chat_messages,
)
from api.responses.response import StoredResponse, response_body
from api.responses.stream import ResponseEventRenderer, response_stream
from api.routes.chat_jobs import cancel_job, parse_last_event_id
from api.submit import chat_request, prepare_job, queue_job
from shared.events import JobEventValue, events_so_far
from shared.jobs import Delta, Done, Failed, FailureCode, JobStatus
from shared.jobstore import JobRecord
from shared.keys import is_job_id

router = APIRouter()

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 429, 500, 502, 503, 504)
}


@router.post("/v1/responses", response_model=Response, responses=_ERRORS)
async def create_response(
    body: CreateResponseRequest, request: Request, gateway: GatewayDep, caller: CallerDep
) -> JSONResponse | EventSourceResponse:
    if (unsupported := body.unsupported_parameter()) is not None:
        raise OpenAIError.invalid(
            f"The parameter '{unsupported}' is not supported by this gateway.",
            param=unsupported,
            code="unsupported_parameter",
        )
    if body.background and not body.store:
        raise OpenAIError.invalid("A background response must be stored (store: true).", param="store")
    text_format = (body.text or {}).get("format")
    if (response_format := ResponseFormat.from_text_format(text_format)) is not None and body.background:
        raise OpenAIError.invalid(
            "text.format cannot be checked on a background response.", param="text.format"
        )
    conversation = to_chat_messages(body.input)
    if body.previous_response_id is not None:
        conversation = [*await _continued(gateway, caller, body.previous_response_id), *conversation]
    system = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    chat, calling = function_calling(
        chat_request(
            model=body.model,
            messages=[*system, *conversation],
            max_completion_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            user=body.user,
            tools=chat_tools(body.tools),
            tool_choice=chat_tool_choice(body.tool_choice),
            parallel_tool_calls=body.parallel_tool_calls,
        )
    )
    job = prepare_job(chat, request, gateway)
    if calling is not None:
        job = calling.instruct(job)
    if response_format is not None:
        job = response_format.instruct(job)
    stored = StoredResponse(
        background=body.background,
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        previous_response_id=body.previous_response_id,
        metadata=body.metadata or {},
        temperature=body.temperature,
        top_p=body.top_p,
        conversation=conversation,
        text_format=text_format if response_format is not None else None,
        tools=[{"strict": True, "parameters": None, **tool} for tool in body.tools or []],
        tool_choice=body.tool_choice or "auto",
    )
    await stored_responses.save(gateway.redis, gateway.settings, job.id, stored)
    try:
        await queue_job(job, request, gateway, caller)
    except BaseException:
        await stored_responses.forget(gateway.redis, job.id)
        raise
    if body.background and not body.stream:
        return JSONResponse(response_body(job, stored, JobStatus.QUEUED, "", None).wire())
    events = follow_job(gateway.store, gateway.settings, job.id, withdraw=not body.background)
    if not body.stream:
        return JSONResponse(await _collect(job, stored, events, response_format))
    if response_format is not None:  # checked whole, then streamed
        events = _checked(await _collect_events(events), response_format)
    first = await first_event(events, gateway.settings.stream_commit_after_s)

    async def cancel() -> None:
        failure = Failed(code=FailureCode.CANCELLED, message="The client disconnected.")
        await gateway.store.stop(job.id, withdraw_only=False, failure=failure)

    # A background response runs on whatever its client does; it is resumed by id.
    on_abandon = cancel if gateway.settings.cancel_on_disconnect and not body.background else None
    return response_stream(ResponseEventRenderer(job, stored), events, first=first, on_abandon=on_abandon)


@router.get("/v1/responses/{response_id}", response_model=Response, responses=_ERRORS)
async def retrieve_response(
    response_id: str,
    gateway: GatewayDep,
    caller: CallerDep,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=0)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> JSONResponse | EventSourceResponse:
    record, stored = await _owned(gateway, caller, response_id)
    if not stream:
        return JSONResponse((await _snapshot(gateway, record, stored)).wire())
    if starting_after is not None:
        after = starting_after
    else:
        after = parse_last_event_id(last_event_id) if last_event_id is not None else -1
    events = follow_job(gateway.store, gateway.settings, record.id, withdraw=False)
    return response_stream(ResponseEventRenderer(record, stored), events, after=after)


@router.post("/v1/responses/{response_id}/cancel", response_model=Response, responses=_ERRORS)
async def cancel_response(response_id: str, gateway: GatewayDep, caller: CallerDep) -> JSONResponse:
    record, _ = await _owned(gateway, caller, response_id)
    await cancel_job(gateway.store, record.id)
    record, stored = await _owned(gateway, caller, response_id)
    return JSONResponse((await _snapshot(gateway, record, stored)).wire())


async def _owned(
    gateway: Gateway, caller: Caller, response_id: str, param: str = "response_id"
) -> tuple[JobRecord, StoredResponse]:
    job_id = response_id.removeprefix(RESPONSE_ID_PREFIX)
    found = is_job_id(job_id) and response_id.startswith(RESPONSE_ID_PREFIX)
    record = await gateway.store.get(job_id) if found else None
    stored = await stored_responses.load(gateway.redis, job_id) if record is not None else None
    if record is None or stored is None or record.owner != caller.key_id:
        message = f"No response found with id '{response_id[:100]}'."
        raise OpenAIError.not_found(message, param=param, code="not_found")
    return record, stored


async def _continued(gateway: Gateway, caller: Caller, previous_id: str) -> list[ChatMessage]:
    record, stored = await _owned(gateway, caller, previous_id, param="previous_response_id")
    if record.status is not JobStatus.COMPLETED:
        raise OpenAIError.invalid(
            f"The previous response is {record.status.value}; only a completed response can be continued.",
            param="previous_response_id",
            code="previous_response_not_completed",
        )
    return await stored_responses.continued_conversation(gateway.redis, stored, record.id)


async def _snapshot(gateway: Gateway, record: JobRecord, stored: StoredResponse) -> Response:
    events = [event for _, event in await events_so_far(gateway.store.redis, record.id)]
    text = "".join(event.text for event in events if isinstance(event, Delta))
    last = events[-1] if events else None
    terminal = last if isinstance(last, Done | Failed) else None
    return response_body(record, stored, record.status, text, terminal)


async def _collect(
    job: JobRef,
    stored: StoredResponse,
    events: AsyncIterator[tuple[int, JobEventValue]],
    response_format: ResponseFormat | None,
) -> dict[str, object]:
    parts: list[str] = []
    async for _, event in events:
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Done):
            text = "".join(parts)
            if response_format is not None:
                text = await response_format.check_finished_off_loop(text, event.finish_reason.value)
            return response_body(job, stored, JobStatus.COMPLETED, text, event).wire()
        else:
            raise OpenAIError.from_failure(event)
    raise AssertionError("follow_job always ends with a terminal event")


async def _collect_events(events: AsyncIterator[tuple[int, JobEventValue]]) -> list[JobEventValue]:
    return [event async for _, event in events]


async def _checked(
    events: list[JobEventValue], response_format: ResponseFormat
) -> AsyncIterator[tuple[int, JobEventValue]]:
    """A finished job's events as one checked delta and its terminal event (502 if it breaks the format)."""
    terminal = events[-1]
    if isinstance(terminal, Done):
        text = "".join(event.text for event in events if isinstance(event, Delta))
        yield 1, Delta(text=await response_format.check_finished_off_loop(text, terminal.finish_reason.value))
        yield 2, terminal
    else:
        yield 1, terminal
