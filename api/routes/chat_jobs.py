"""Chat completion jobs by id: retrieve (`GET`), resume their stream, cancel.

`GET /v1/chat/completions/{id}` answers with the job as a chat completion whose `status` says
where it is (`queued`, `in_progress`, `completed`, `failed`, `cancelled`); with `?stream=true` it
streams the job's chunks after `starting_after` (or `Last-Event-ID`), then follows it live.
`POST /v1/chat/completions/{id}/cancel` stops it; cancelling twice, or a finished job, is harmless.
A job belongs to the API key that created it: any other key gets 404, as for an unknown id.
"""

import asyncio
import re
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.chat.protocol import ChatCompletion
from api.chat.render import COMPLETION_ID_PREFIX, ChunkRenderer, completion_body, completion_id
from api.chat.streaming import sse_response
from api.deps import Caller, CallerDep, Gateway, GatewayDep
from api.errors import ErrorResponse, OpenAIError
from api.relay import follow_job
from shared.events import events_so_far
from shared.jobs import Delta, Done, Failed, FailureCode
from shared.jobstore import JobRecord, JobStore
from shared.keys import is_job_id

router = APIRouter()

_ERRORS: dict[int | str, dict[str, object]] = {code: {"model": ErrorResponse} for code in (400, 404, 503)}
_EVENT_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits: `str.isdigit` also takes "²", which `int` refuses
_CANCEL_WAIT_S = 5.0  # how long a cancel waits for a running job to confirm it stopped


@router.get("/v1/chat/completions/{completion_id}", response_model=ChatCompletion, responses=_ERRORS)
async def retrieve_chat_completion(
    completion_id: str,
    gateway: GatewayDep,
    caller: CallerDep,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=0)] = None,
    include_usage: bool = False,
    last_event_id: Annotated[str | None, Header()] = None,
) -> JSONResponse | EventSourceResponse:
    record = await _owned(gateway, caller, completion_id)
    if not stream:
        return JSONResponse((await _snapshot(gateway, record)).model_dump())
    after = starting_after if starting_after is not None else parse_last_event_id(last_event_id)
    events = follow_job(gateway.store, gateway.settings, record.id, after=after, withdraw=False)
    return sse_response(ChunkRenderer(record, include_usage=include_usage), events, after=after)


@router.post("/v1/chat/completions/{completion_id}/cancel", response_model=ChatCompletion, responses=_ERRORS)
async def cancel_chat_completion(completion_id: str, gateway: GatewayDep, caller: CallerDep) -> JSONResponse:
    record = await _owned(gateway, caller, completion_id)
    await cancel_job(gateway.store, record.id)
    return JSONResponse((await _snapshot(gateway, await _owned(gateway, caller, completion_id))).model_dump())


async def cancel_job(store: JobStore, job_id: str) -> None:
    """Cancels the job and gives its worker a moment to stop it, so the answer is usually final."""
    failure = Failed(code=FailureCode.CANCELLED, message="The job was cancelled.")
    if await store.stop(job_id, withdraw_only=False, failure=failure) == "cancelling":
        deadline = asyncio.get_running_loop().time() + _CANCEL_WAIT_S
        while (current := await store.get(job_id)) is not None and current.ended is None:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)


async def _owned(gateway: Gateway, caller: Caller, completion_id: str) -> JobRecord:
    job_id = completion_id.removeprefix(COMPLETION_ID_PREFIX)
    record = await gateway.store.get(job_id) if is_job_id(job_id) else None
    if record is None or record.owner != caller.key_id:
        message = f"No chat completion found with id '{completion_id[:100]}'."
        raise OpenAIError.not_found(message, param="completion_id", code="not_found")
    return record


def parse_last_event_id(value: str | None) -> int:
    if value is None:
        return 0
    if not _EVENT_ID.fullmatch(value):
        raise OpenAIError.invalid(
            "Last-Event-ID must be an event id this stream sent.", param="Last-Event-ID"
        )
    return int(value)


async def _snapshot(gateway: Gateway, record: JobRecord) -> ChatCompletion:
    """The job as a chat completion: its full reply once completed, else its status (and error)."""
    events = [event for _, event in await events_so_far(gateway.store.redis, record.id)]
    last = events[-1] if events else None
    if isinstance(last, Done):
        text = "".join(event.text for event in events if isinstance(event, Delta))
        return completion_body(record, text, last)
    snapshot = ChatCompletion(
        id=completion_id(record), created=record.created, model=record.model, choices=[], usage=None
    )
    snapshot.status = record.status
    if isinstance(last, Failed):
        snapshot.error = OpenAIError.from_failure(last).info
    return snapshot
