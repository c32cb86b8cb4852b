"""Job events → OpenAI chat completion bodies and stream chunks.

Stream chunks sit on the per-token path, so they are rendered from a per-stream byte template
with only the text JSON-encoded per chunk; the test suite validates them against the official
`CreateChatCompletionStreamResponse` schema.
"""

import json
from typing import Any, Protocol

from api.chat.protocol import ChatCompletion, Choice, CompletionUsage, ResponseMessage
from api.errors import ErrorInfo, ErrorResponse
from shared.jobs import Done, Usage

COMPLETION_ID_PREFIX = "chatcmpl-"


class JobRef(Protocol):
    """What rendering needs of a job: a `CompletionJob`, or the `JobRecord` of one."""

    @property
    def id(self) -> str: ...
    @property
    def created(self) -> int: ...
    @property
    def model(self) -> str: ...


def completion_id(job: JobRef) -> str:
    return COMPLETION_ID_PREFIX + job.id


def usage_body(usage: Usage) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details={"cached_tokens": usage.cached_prompt_tokens},
        cost_usd=usage.cost_usd,
    )


def tool_calls_body(done: Done) -> list[dict[str, Any]]:
    return [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in done.tool_calls
    ]


def completion_body(job: JobRef, text: str, done: Done) -> ChatCompletion:
    message = ResponseMessage(content=text)
    if done.tool_calls:
        message = ResponseMessage(content=text or None, tool_calls=tool_calls_body(done))
    return ChatCompletion(
        id=completion_id(job),
        created=job.created,
        model=job.model,
        choices=[Choice(index=0, message=message, finish_reason=done.finish_reason.value)],
        usage=usage_body(done.usage),
    )


def error_chunk(error: ErrorInfo) -> str:
    """The stream event that ends a stream which failed after its headers were sent."""
    return ErrorResponse(error=error).model_dump_json()


class ChunkRenderer:
    """Renders the chunks of one streamed completion as JSON strings."""

    def __init__(self, job: JobRef, *, include_usage: bool, index: int = 0) -> None:
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
        self._choice_head = head + f',"choices":[{{"index":{index},"delta":'
        self.include_usage = include_usage
        self._tail = ',"logprobs":null,"finish_reason":%s}]' + (',"usage":null}' if include_usage else "}")

    def _choice(self, delta: str, finish_reason: str | None) -> str:
        return self._choice_head + delta + self._tail % (json.dumps(finish_reason))

    def role(self) -> str:
        return self._choice('{"role":"assistant","content":""}', None)

    def content(self, text: str) -> str:
        return self._choice('{"content":' + json.dumps(text) + "}", None)

    def tool_calls(self, done: Done) -> str:
        """The turn's function calls, each whole (its arguments complete JSON) with a stable index."""
        calls = [{"index": index, **call} for index, call in enumerate(tool_calls_body(done))]
        return self._choice(json.dumps({"tool_calls": calls}), None)

    def finish(self, done: Done) -> str:
        return self._choice("{}", done.finish_reason.value)

    def usage(self, done: Done) -> str:
        return self._head + ',"choices":[],"usage":' + usage_body(done.usage).model_dump_json() + "}"
