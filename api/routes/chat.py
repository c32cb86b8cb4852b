"""`POST /v1/chat/completions`: one request, followed from HTTP to the worker and back.

1. validate and translate the request into a `CompletionJob`;
2. queue it (`JobStore.create`: arq entry, job record, wake-up; one round trip);
3. follow the job's event stream in Redis and render it as one JSON body or as SSE chunks,
   or, with `background: true`, answer at once with the queued job (poll or stream it by id).
"""

import hashlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from api.agent_policy import agent_request
from api.chat.fanout import fan_out
from api.chat.functions import function_calling
from api.chat.protocol import ChatCompletion, ChatCompletionRequest
from api.chat.render import ChunkRenderer, JobRef, completion_body, completion_id
from api.chat.streaming import first_event, sse_response
from api.chat.structured import ResponseFormat, structured_reply
from api.chat.translate import build_job
from api.deps import Caller, CallerDep, Gateway, GatewayDep
from api.errors import ErrorResponse, OpenAIError
from api.hygiene import check_prompt_limits
from api.relay import follow_job
from api.sessions import abandon, attach, requested_session_id
from api.submit import queue_job
from shared import logs, sessions, tool_config
from shared.events import JobEventValue
from shared.jobs import CompletionJob, Delta, Done, Failed, FailureCode, JobStatus

log = logging.getLogger("gateway.api")
router = APIRouter()

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 429, 500, 502, 503, 504)
}
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    gateway: GatewayDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JSONResponse | EventSourceResponse:
    check_prompt_limits(body, gateway.settings)
    session_id = requested_session_id(body, request)
    if body.n is not None and body.n > 1:
        return await fan_out(body, request, gateway, caller, session_id is not None or bool(idempotency_key))
    stored = await tool_config.configs(gateway.redis, sessions.owner_of(caller.key_id), session_id)
    agent = agent_request(body, request.headers, gateway.settings, stored)
    body, calling = function_calling(body)
    job = build_job(body, request.state.request_id, gateway.settings, agent)
    if calling is not None:
        if session_id is not None:
            raise OpenAIError.invalid("Function calling does not continue sessions yet.", param="session_id")
        job = calling.instruct(job)
    if (response_format := ResponseFormat.from_request(body.response_format)) is not None:
        if body.background:
            raise OpenAIError.invalid(
                "response_format cannot be checked on a background job.", param="response_format"
            )
        job = response_format.instruct(job)
    if session_id is not None:
        job = await attach(gateway.redis, gateway.settings, caller.key_id, session_id, job)
    try:
        ref = await _submit(gateway, request, caller, job, body, idempotency_key)
    except BaseException:
        await abandon(gateway.redis, job)  # never queued: the session is free again
        raise
    if ref.id != job.id:  # attached to the key's earlier job: this one was never queued
        await abandon(gateway.redis, job)
    logs.bind(job_id=ref.id)
    log.info("queued job (model %s, stream %s, background %s)", job.model, body.stream, body.background)
    if body.background:
        queued = ChatCompletion(
            id=completion_id(ref), created=ref.created, model=ref.model, choices=[], usage=None
        )
        queued.status = JobStatus.QUEUED
        return JSONResponse(queued.model_dump())
    events = follow_job(gateway.store, gateway.settings, ref.id, withdraw=True)
    if response_format is not None:
        return await structured_reply(response_format, await _collect(ref, events), body)
    if not body.stream:
        return JSONResponse((await _collect(ref, events)).model_dump())
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    first = await first_event(events, gateway.settings.stream_commit_after_s)

    async def cancel() -> None:
        failure = Failed(code=FailureCode.CANCELLED, message="The client disconnected.")
        await gateway.store.stop(ref.id, withdraw_only=False, failure=failure)

    on_abandon = cancel if gateway.settings.cancel_on_disconnect else None
    renderer = ChunkRenderer(ref, include_usage=include_usage)
    return sse_response(renderer, events, first=first, on_abandon=on_abandon)


async def _submit(
    gateway: Gateway,
    request: Request,
    caller: Caller,
    job: CompletionJob,
    body: ChatCompletionRequest,
    key: str | None,
) -> JobRef:
    """Queues the job; with an `Idempotency-Key` seen before, returns that key's job instead."""
    if key is None:
        await queue_job(job, request, gateway, caller)
        return job
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise OpenAIError.invalid(
            "Idempotency-Key must be 1 to 255 printable ASCII characters.", param="Idempotency-Key"
        )
    fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    existing = await queue_job(job, request, gateway, caller, idempotency=(key, fingerprint))
    if existing is None:
        return job
    job_id, used_with = existing
    if used_with != fingerprint:
        raise OpenAIError.invalid(
            "This Idempotency-Key was already used with a different request.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    record = await gateway.store.get(job_id)
    if record is None:  # its job expired a moment ago; the key goes with it
        raise OpenAIError(409, "Retry: the earlier request's job just expired.", type="invalid_request_error")
    return record


async def _collect(job: JobRef, events: AsyncIterator[tuple[int, JobEventValue]]) -> ChatCompletion:
    parts: list[str] = []
    async for _, event in events:
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Done):
            return completion_body(job, "".join(parts), event)
        else:
            raise OpenAIError.from_failure(event)
    raise AssertionError("follow_job always ends with a terminal event")
