"""Chat completion jobs by id: retrieve (`GET`), resume their stream, cancel.

`GET /v1/chat/completions/{id}` answers with the job as a chat completion whose `status` says
where it is (`queued`, `in_progress`, `completed`, `failed`, `cancelled`); with `?stream=true` it
streams the job's chunks after `starting_after` (or `Last-Event-ID`), then follows it live.
`POST /v1/chat/completions/{id}/cancel` stops it; cancelling twice, or a finished job, is harmless.
`DELETE /v1/chat/completions/{id}` removes it and its events (cancelled first if it still runs).
A job belongs to the API key that created it: any other key gets 404, as for an unknown id.
"""

from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from api.chat.outbound import (
    COMPLETION_ID_PREFIX,
    ChunkRenderer,
    completion_body,
    completion_id,
    events_after,
)
from api.chat.protocol import ChatCompletion, ChatCompletionDeleted
from api.core.run import Reply, Run, cancel_job, delete_job, reply_of
from api.core.sse import EventStreamResponse
from api.core.streaming import StartingAfter, event_stream, resumed_after
from api.core.structured import ResponseFormat
from api.deps import Caller, CallerDep, Gateway, GatewayDep
from api.errors import OpenAIError, error_responses
from shared.events import events_so_far
from shared.jobs import Done, Failed, FailureCode, JobStatus
from shared.jobstore import JobRecord
from shared.keys import is_job_id

router = APIRouter()

_ERRORS = error_responses(400, 404, 409, 503)


@router.get("/v1/chat/completions/{completion_id}", response_model=ChatCompletion, responses=_ERRORS)
async def retrieve_chat_completion(
    completion_id: str,
    gateway: GatewayDep,
    caller: CallerDep,
    stream: bool = False,
    starting_after: StartingAfter = None,
    include_usage: bool = False,
    last_event_id: Annotated[str | None, Header()] = None,
    include_reasoning: bool = True,
) -> JSONResponse | EventStreamResponse:
    record = await _owned(gateway, caller, completion_id)
    reasoning = include_reasoning and gateway.settings.stream_reasoning
    if not stream:
        return JSONResponse((await _snapshot(gateway, record, reasoning)).model_dump())
    after = resumed_after(starting_after, last_event_id)
    response_format = ResponseFormat.from_request(record.response_format)  # sent checked, as first
    run = Run(gateway, [record], True, response_format, reasoning)  # a reader, not the owner's request
    renderer = ChunkRenderer(record, include_usage=include_usage, after=after, legacy=record.legacy_functions)
    return await event_stream(run, renderer, after=0 if after is None else events_after(after), live=False)


@router.post("/v1/chat/completions/{completion_id}/cancel", response_model=ChatCompletion, responses=_ERRORS)
async def cancel_chat_completion(completion_id: str, gateway: GatewayDep, caller: CallerDep) -> JSONResponse:
    record = await _owned(gateway, caller, completion_id)
    await cancel_job(gateway.store, record.id)
    return JSONResponse((await _snapshot(gateway, await _owned(gateway, caller, completion_id))).model_dump())


@router.delete(
    "/v1/chat/completions/{completion_id}", response_model=ChatCompletionDeleted, responses=_ERRORS
)
async def delete_chat_completion(
    completion_id: str, gateway: GatewayDep, caller: CallerDep
) -> ChatCompletionDeleted:
    if not await delete_job(gateway.store, await _owned(gateway, caller, completion_id)):
        raise _not_found(completion_id)  # another delete was first
    return ChatCompletionDeleted(id=completion_id)


async def _owned(gateway: Gateway, caller: Caller, completion_id: str) -> JobRecord:
    job_id = completion_id.removeprefix(COMPLETION_ID_PREFIX)
    record = await gateway.store.get(job_id) if is_job_id(job_id) else None
    if record is None or record.owner != caller.key_id:
        raise _not_found(completion_id)
    return record


def _not_found(completion_id: str) -> OpenAIError:
    message = f"No chat completion found with id '{completion_id[:100]}'."
    return OpenAIError.not_found(message, param="completion_id", code="not_found")


async def _snapshot(gateway: Gateway, record: JobRecord, reasoning: bool = True) -> ChatCompletion:
    """The job as a chat completion: its full reply (every choice's, `n > 1`) once completed, else
    its status (and error): the first choice that failed, else the least advanced one's."""
    choices = [record, *[found for job_id in record.choices if (found := await gateway.store.get(job_id))]]
    snapshot = ChatCompletion(
        id=completion_id(record), created=record.created, model=record.model, choices=[], usage=None
    )
    response_format = ResponseFormat.from_request(record.response_format)
    replies: list[Reply] = []
    unfinished: list[JobStatus] = []
    for choice in choices:
        events = await events_so_far(gateway.store.redis, choice.id)
        text, last = reply_of(events)
        if isinstance(last, Failed):
            snapshot.status, snapshot.error = choice.status, OpenAIError.from_failure(last).info
            return snapshot
        if not isinstance(last, Done):
            unfinished.append(choice.status)
            continue
        try:
            if response_format is not None:
                text = response_format.check_finished(text, last.finish_reason.value)
        except OpenAIError as violation:  # its request got this error
            snapshot.status, snapshot.error = JobStatus.FAILED, violation.info
            return snapshot
        replies.append(Reply(text, last, events if reasoning else []))
    if unfinished:
        snapshot.status = JobStatus.QUEUED if JobStatus.QUEUED in unfinished else JobStatus.IN_PROGRESS
        return snapshot
    if len(choices) < 1 + len(record.choices):  # a choice's record expired before the first's
        snapshot.status, snapshot.error = JobStatus.FAILED, OpenAIError.from_failure(_CHOICE_GONE).info
        return snapshot
    return completion_body(record, replies, legacy=record.legacy_functions)


_CHOICE_GONE = Failed(code=FailureCode.INTERNAL, message="A choice of the request no longer exists.")
