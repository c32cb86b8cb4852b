"""Job events → OpenAI chat completion bodies and stream chunks.

Stream chunks sit on the per-token path, so they are rendered from a per-stream byte template
with only the text JSON-encoded per chunk; the test suite validates them against the official
`CreateChatCompletionStreamResponse` schema.

A stream of one choice is resumable: every chunk carries an id, and a client that reconnects with
`Last-Event-ID` (or `?starting_after=`) set to the last id it got gets exactly the chunks after it.
One job event can become several chunks (the calls, the finish, the usage), and a client may get
some of them before its connection drops: so each chunk's id is `CHUNK_IDS * seq + i`, the event's
sequence number and the chunk's place among its chunks, and a resume renders that event again
without the chunks the client has. The role chunk is the stream's start (`id: 0`). The choices of
`n > 1` interleave without ids, and its usage chunk sums all of them.
The agent's thinking and tool steps stream as `delta.reasoning_content` (never in `content`); the
whole reply carries them as `message.reasoning_content`.
"""

import json
from typing import Any

from sse_starlette import ServerSentEvent

from api.chat.protocol import ChatCompletion, Choice, CompletionUsage, ResponseMessage
from api.core.run import JobRef, Reply, activity_text, total_usage
from api.core.streaming import Rendered
from api.errors import ErrorInfo, ErrorResponse, OpenAIError
from shared.jobs import Activity, Delta, Done, JobStatus, Usage

COMPLETION_ID_PREFIX = "chatcmpl-"
CHUNK_IDS = 4
"""Chunk ids per job event: an event renders as at most this many chunks."""


def completion_id(job: JobRef) -> str:
    return COMPLETION_ID_PREFIX + job.id


def usage_body(usage: Usage) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details={
            "cached_tokens": usage.cached_prompt_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        cost_usd=usage.cost_usd,
    )


def tool_calls_body(done: Done) -> list[dict[str, Any]]:
    return [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in done.tool_calls
    ]


def function_call_body(done: Done) -> dict[str, str]:
    """The legacy form of a turn's calls: its first (that form has room for one)."""
    first = done.tool_calls[0]
    return {"name": first.name, "arguments": first.arguments}


def _finish_reason(done: Done, legacy: bool) -> str:
    return "function_call" if legacy and done.tool_calls else done.finish_reason.value


def _message(reply: Reply, legacy: bool) -> ResponseMessage:
    reasoning = reply.reasoning or None
    if reply.done.tool_calls and legacy:
        call = function_call_body(reply.done)
        return ResponseMessage(content=reply.text or None, reasoning_content=reasoning, function_call=call)
    if reply.done.tool_calls:
        calls = tool_calls_body(reply.done)
        return ResponseMessage(content=reply.text or None, reasoning_content=reasoning, tool_calls=calls)
    return ResponseMessage(content=reply.text, reasoning_content=reasoning)


def completion_body(job: JobRef, replies: list[Reply], *, legacy: bool = False) -> ChatCompletion:
    """The completion of one reply per choice; its usage sums theirs. `legacy`: the request
    offered `functions`, whose calls come back in that form."""
    return ChatCompletion(
        id=completion_id(job),
        created=job.created,
        model=job.model,
        choices=[
            Choice(
                index=index, message=_message(reply, legacy), finish_reason=_finish_reason(reply.done, legacy)
            )
            for index, reply in enumerate(replies)
        ],
        usage=usage_body(total_usage([reply.done.usage for reply in replies])),
    )


def error_chunk(error: ErrorInfo) -> str:
    """The stream event that ends a stream which failed after its headers were sent."""
    return ErrorResponse(error=error).model_dump_json()


def events_after(chunk_id: int) -> int:
    """The job events a stream resumed after chunk `chunk_id` is rendered from: those after the
    event before that chunk's (the chunk's own event is rendered again, without what was sent)."""
    return max(chunk_id // CHUNK_IDS - 1, 0)


class ChunkRenderer:
    """Renders the chunks of one streamed completion of `choices` choices, after chunk `after`
    (a resumed stream) or all of them."""

    def __init__(
        self,
        job: JobRef,
        *,
        include_usage: bool,
        choices: int = 1,
        after: int | None = None,
        legacy: bool = False,
    ) -> None:
        head = json.dumps(
            {
                "id": completion_id(job),
                "object": "chat.completion.chunk",
                "created": job.created,
                "model": job.model,
            },
            separators=(",", ":"),
        )[:-1]
        self._head = head
        self._choice_heads = [head + f',"choices":[{{"index":{index},"delta":' for index in range(choices)]
        self._include_usage = include_usage
        self._tail = ',"logprobs":null,"finish_reason":%s}]' + (',"usage":null}' if include_usage else "}")
        self._resumable = choices == 1
        self._after = -1 if after is None else after
        self._legacy = legacy  # calls as `function_call` (`completion_body`)
        self._usages: list[Usage] = []

    def _choice(self, choice: int, delta: str, finish_reason: str | None) -> str:
        return self._choice_heads[choice] + delta + self._tail % (json.dumps(finish_reason))

    def _events(self, seq: int, chunks: list[str]) -> list[ServerSentEvent]:
        """Event `seq`'s chunks, each with its id, but those a resumed stream's client has."""
        if not self._resumable:
            return [ServerSentEvent(chunk) for chunk in chunks]
        first = seq * CHUNK_IDS
        return [
            ServerSentEvent(chunk, id=str(first + i))
            for i, chunk in enumerate(chunks)
            if first + i > self._after
        ]

    def opening(self) -> list[ServerSentEvent]:
        role = '{"role":"assistant","content":""}'
        if self._resumable:
            return self._events(0, [self._choice(0, role, None)])
        return [
            ServerSentEvent(self._choice(choice, role, None)) for choice in range(len(self._choice_heads))
        ]

    def render(self, choice: int, seq: int, event: Rendered) -> list[ServerSentEvent]:
        if isinstance(event, Delta):
            return self._events(
                seq, [self._choice(choice, '{"content":' + json.dumps(event.text) + "}", None)]
            )
        if isinstance(event, Activity):
            reasoning = '{"reasoning_content":' + json.dumps(activity_text(event)) + "}"
            return self._events(seq, [self._choice(choice, reasoning, None)])
        if not isinstance(event, Done):
            return self._events(seq, [error_chunk(OpenAIError.from_failure(event).info)])
        chunks: list[str] = []
        if event.tool_calls and self._legacy:
            chunks.append(
                self._choice(choice, json.dumps({"function_call": function_call_body(event)}), None)
            )
        elif event.tool_calls:
            # The turn's function calls, each whole (its arguments complete JSON) with a stable index.
            calls = [{"index": index, **call} for index, call in enumerate(tool_calls_body(event))]
            chunks.append(self._choice(choice, json.dumps({"tool_calls": calls}), None))
        chunks.append(self._choice(choice, "{}", _finish_reason(event, self._legacy)))
        self._usages.append(event.usage)
        if self._include_usage and self._resumable:
            chunks.append(self._usage(event.usage))
        return self._events(seq, chunks)

    def _usage(self, usage: Usage) -> str:
        return self._head + ',"choices":[],"usage":' + usage_body(usage).model_dump_json() + "}"

    def interrupted(self, error: OpenAIError) -> list[ServerSentEvent]:
        return [ServerSentEvent(error_chunk(error.info))]

    def closing(self) -> list[ServerSentEvent]:
        chunks = []
        if self._include_usage and not self._resumable and len(self._usages) == len(self._choice_heads):
            chunks.append(ServerSentEvent(self._usage(total_usage(self._usages))))
        return [*chunks, ServerSentEvent("[DONE]")]


def queued_body(job: JobRef) -> ChatCompletion:
    """A background job as answered at once: no choices yet."""
    queued = ChatCompletion(
        id=completion_id(job), created=job.created, model=job.model, choices=[], usage=None
    )
    queued.status = JobStatus.QUEUED
    return queued
