"""A Responses API response: its job, what the request said about it, and its rendering.

A response is one job (`resp_<job id>`): its status, output and usage come from the job's record
and event stream. What only the Responses API knows (instructions, metadata, the chain it
continues, its whole conversation) is kept beside the job as a `StoredResponse`, for as long as
the job's record lives, so any API process can retrieve it or continue it.

`previous_response_id` replays: the new job's conversation is the earlier response's stored
conversation, its output as an assistant turn, then the new input. This keeps responses
stateless for the workers (no session lock; any number of branches from one response) and
works with every backend. As in OpenAI's API, the earlier response's `instructions` are not
carried over.
"""

from typing import Any, Literal

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from api.access import storage_limited
from api.core.conversation import ChatMessage
from api.core.run import JobRef, activity_text
from api.core.structured import ResponseFormat
from api.errors import OpenAIError
from api.responses.protocol import (
    MESSAGE_ID_PREFIX,
    REASONING_ID_PREFIX,
    RESPONSE_ID_PREFIX,
    FunctionCall,
    IncompleteDetails,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    ReasoningItem,
    Response,
    ResponseError,
    ResponseStatus,
    ResponseUsage,
    SummaryText,
    split_name,
)
from shared import quotas
from shared.events import JobEventValue, events_so_far
from shared.jobs import (
    Activity,
    CompletionJob,
    Delta,
    Done,
    Failed,
    FailureCode,
    FinishReason,
    JobStatus,
    Usage,
)
from shared.keys import response_key
from shared.quotas import StorageLimit, StoredLimit
from shared.settings import Settings


class StoredResponse(BaseModel):
    """The request's side of a response, kept in Redis next to its job."""

    background: bool
    instructions: str | None
    max_output_tokens: int | None
    previous_response_id: str | None
    metadata: dict[str, str]
    temperature: float | None
    top_p: float | None
    conversation: list[ChatMessage]
    """Every message the job was given (earlier responses' turns included), for continuations;
    empty with `store: false`, which cannot be continued."""
    store: bool = True
    text_format: dict[str, Any] | None = None
    """The request's `text.format` when it asked for JSON (checked on the reply)."""
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    reasoning: bool = True
    """Whether its output shows the agent's thinking and tool steps (a reasoning item)."""
    effort: str | None = None
    """The reasoning effort the agent ran with (`reasoning.effort`, or `reasoning_effort`)."""
    session_id: str | None = None
    """The session it was made in, which holds its conversation (`conversation` has only the
    request's messages): it is continued there."""
    session_transcript: str | None = None
    """That session's transcript id then: a session deleted or started anew since has another."""


def response_id(job: JobRef) -> str:
    return RESPONSE_ID_PREFIX + job.id


def message_id(job: JobRef) -> str:
    return MESSAGE_ID_PREFIX + job.id


async def save(
    redis: Redis, settings: Settings, job_id: str, stored: StoredResponse, limit: StoredLimit | None
) -> None:
    """Keeps the response's request, counted in the caller's ledger (`limit`: 429 while it is full,
    413 if the request alone is over it)."""
    # Outlives the job's record, whose expiry starts when the job ends.
    ttl = settings.event_ttl_s + int(settings.job_lifetime(background=stored.background))
    try:
        await quotas.keep(
            redis, response_key(job_id), stored.model_dump_json(), ttl, job_id=job_id, stored=limit
        )
    except StorageLimit as refused:
        raise storage_limited(refused) from None


async def load(redis: Redis, job_id: str) -> StoredResponse | None:
    raw = await redis.get(response_key(job_id))
    return None if raw is None else StoredResponse.model_validate_json(raw)


async def forget(redis: Redis, job_id: str, limit: StoredLimit | None) -> None:
    ledger = None if limit is None else limit.ledger
    await quotas.discard(redis, response_key(job_id), entry=job_id, ledger=ledger)


class Keeper:
    """Keeps a response's `StoredResponse` beside its job (a `Companion` of `api/core/submit.py`)."""

    def __init__(
        self, redis: Redis, settings: Settings, stored: StoredResponse, limit: StoredLimit | None
    ) -> None:
        self._redis, self._settings, self._stored, self._limit = redis, settings, stored, limit

    async def save(self, job: CompletionJob) -> None:
        stored = self._stored
        if job.session is not None:  # the session as this job found it: a continuation needs it still
            stored = stored.model_copy(update={"session_transcript": job.session.transcript_id})
        await save(self._redis, self._settings, job.id, stored, self._limit)

    async def forget(self, job_id: str) -> None:
        await forget(self._redis, job_id, self._limit)


def usage_body(usage: Usage) -> ResponseUsage:
    """Our usage → the Responses API's; cache writes are counted in `input_tokens` (not split out)."""
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(
            cached_tokens=usage.cached_prompt_tokens, cache_write_tokens=usage.cache_write_tokens
        ),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        cost_usd=usage.cost_usd,
    )


_RESPONSE_ERROR_CODES = {
    FailureCode.UPSTREAM_RATE_LIMITED: "rate_limit_exceeded",
    FailureCode.UPSTREAM_REFUSED: "invalid_prompt",
}


def error_body(failure: Failed) -> ResponseError:
    """The spec's `ResponseError.code` is a closed list: the gateway's own code goes in the message."""
    code = _RESPONSE_ERROR_CODES.get(failure.code, "server_error")
    return ResponseError(code=code, message=f"{failure.message} ({failure.code.value})")


def function_calls(done: Done, tools: list[dict[str, Any]]) -> list[FunctionCall]:
    """The function calls a turn ended on, as output items (a namespace's with its name apart)."""
    calls = []
    for call in done.tool_calls:
        namespace, name = split_name(call.name, tools)
        item = FunctionCall(
            id=f"fc_{call.id}", call_id=call.id, namespace=namespace, name=name, arguments=call.arguments
        )
        calls.append(item)
    return calls


def output_message(
    job: JobRef, text: str, status: Literal["in_progress", "completed", "incomplete"]
) -> OutputMessage:
    return OutputMessage(
        id=message_id(job),
        status=status,
        content=[OutputText(text=text)],
    )


def response_body(
    job: JobRef,
    stored: StoredResponse,
    status: JobStatus,
    text: str,
    terminal: Done | Failed | None,
    activity: list[JobEventValue] | None = None,
) -> Response:
    """The response as retrieved: its full output once ended, the text so far while it runs.
    `activity`: the job's events, to show the agent's work among the text (`output_items`)."""
    response = Response(
        id=response_id(job),
        text={"format": stored.text_format or {"type": "text"}},
        created_at=job.created,
        status=status.value,
        background=stored.background,
        instructions=stored.instructions,
        max_output_tokens=stored.max_output_tokens,
        model=job.model,
        previous_response_id=stored.previous_response_id,
        tools=stored.tools,
        tool_choice=stored.tool_choice,
        parallel_tool_calls=stored.parallel_tool_calls,
        metadata=stored.metadata,
        temperature=stored.temperature,
        top_p=stored.top_p,
        # As sent: an SDK showed none for an effort the agent ran with (an outside probe).
        reasoning=None if stored.effort is None else {"effort": stored.effort, "summary": None},
    )
    if isinstance(terminal, Failed):
        response.status = "cancelled" if terminal.code is FailureCode.CANCELLED else "failed"
        if terminal.code is not FailureCode.CANCELLED:
            response.error = error_body(terminal)
        response.output = [*_produced(job, text, activity, "incomplete")]  # what its stream sent
    elif isinstance(terminal, Done) and (violation := _format_violation(stored, text, terminal)) is not None:
        response.status, response.error = "failed", ResponseError(code="server_error", message=violation)
    elif isinstance(terminal, Done):
        response.status, item_status = finished_status(terminal)
        if response.status == "completed":
            response.completed_at = terminal.completed_at
        if (response_format := ResponseFormat.from_text_format(stored.text_format)) is not None:
            text = response_format.check_finished(text, terminal.finish_reason.value)
        if response.status == "incomplete":
            reason = "content_filter" if terminal.finish_reason is FinishReason.CONTENT_FILTER else None
            response.incomplete_details = IncompleteDetails(reason=reason or "max_output_tokens")
        calls = function_calls(terminal, stored.tools)
        if activity and response_format is not None:  # as its stream sent it: the work, then the text
            checked = [Delta(text=text)] if text else []
            activity = [*(event for event in activity if isinstance(event, Activity)), *checked]
        if activity:
            items = output_items(job, activity, item_status, message=not calls)
        else:
            items = [output_message(job, text, item_status)] if text or not calls else []
        response.output = [*items, *calls]
        response.usage = usage_body(terminal.usage)
    else:
        response.output = [*_produced(job, text, activity, "in_progress")]
    return response


def _produced(
    job: JobRef, text: str, activity: list[JobEventValue] | None, status: Literal["in_progress", "incomplete"]
) -> list[ReasoningItem | OutputMessage]:
    """The output of a job that has not completed: what it produced so far (or before it failed)."""
    if activity:
        return output_items(job, activity, status, message=False)
    return [output_message(job, text, status)] if text else []


def _format_violation(stored: StoredResponse, text: str, done: Done) -> str | None:
    """Why a completed reply breaks the response's JSON format, if it asked for one and does."""
    response_format = ResponseFormat.from_text_format(stored.text_format)
    if response_format is None:
        return None
    try:
        response_format.check_finished(text, done.finish_reason.value)
    except OpenAIError as exc:
        return exc.info.message
    return None


def finished_status(done: Done) -> tuple[ResponseStatus, Literal["completed", "incomplete"]]:
    """(response status, output item status) of a job that completed."""
    if done.finish_reason in (FinishReason.STOP, FinishReason.TOOL_CALLS):
        return "completed", "completed"
    return "incomplete", "incomplete"


async def continued_conversation(redis: Redis, stored: StoredResponse, job_id: str) -> list[ChatMessage]:
    """The conversation a continuation starts from: the earlier one, then its reply (and calls)."""
    events = await events_so_far(redis, job_id)
    reply = "".join(event.text for event in events if isinstance(event, Delta))
    done = events[-1] if events and isinstance(events[-1], Done) else None
    calls = [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in (done.tool_calls if done is not None else [])
    ]
    return [*stored.conversation, ChatMessage(role="assistant", content=reply, tool_calls=calls or None)]


def item_id(job: JobRef, kind: str, index: int) -> str:
    """A message item's id (the first is `msg_<job id>`), or a reasoning item's."""
    if kind == "message":
        return message_id(job) + (f"_{index}" if index else "")
    return f"{REASONING_ID_PREFIX}{job.id}_{index}"


def output_items(
    job: JobRef,
    events: list[JobEventValue],
    status: Literal["in_progress", "completed", "incomplete"],
    *,
    message: bool,
) -> list[ReasoningItem | OutputMessage]:
    """The job's text and activity as output items, in order: a message item per run of text, a
    reasoning item (thinking, a line per tool step) per run of activity. The last has `status`, the
    ones before it are completed (as its stream closed them); `message`: there is a message item
    even with no text (a completed reply that is not function calls)."""
    runs: list[tuple[str, list[str]]] = []
    for event in events:
        if isinstance(event, Delta):
            kind, text = "message", event.text
        elif isinstance(event, Activity):
            kind, text = "reasoning", activity_text(event)
        else:
            continue
        if not runs or runs[-1][0] != kind:
            runs.append((kind, []))
        runs[-1][1].append(text)
    if message and not any(kind == "message" for kind, _ in runs):
        runs.append(("message", []))
    items: list[ReasoningItem | OutputMessage] = []
    for index, (kind, parts) in enumerate(runs):
        item_status = status if index == len(runs) - 1 else "completed"
        text = "".join(parts)
        if kind == "message":
            items.append(
                OutputMessage(
                    id=item_id(job, kind, index), status=item_status, content=[OutputText(text=text)]
                )
            )
        else:
            items.append(
                ReasoningItem(
                    id=item_id(job, kind, index), summary=[SummaryText(text=text)], status=item_status
                )
            )
    return items
