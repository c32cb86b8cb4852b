"""Job events → an Anthropic `Message` and its event stream (`message_start`,
`content_block_start`, `content_block_delta`…, `content_block_stop`, `message_delta`,
`message_stop`; a failure after the headers is an `error` event)."""

import json

from sse_starlette import ServerSentEvent

from api.core.run import JobRef, Reply
from api.errors import OpenAIError, anthropic_error
from api.messages.protocol import (
    MESSAGE_ID_PREFIX,
    Message,
    TextBlock,
    stop_reason,
    tool_use_blocks,
    usage_body,
)
from shared.events import JobEventValue
from shared.jobs import Delta, Done, Usage


def message_body(job: JobRef, reply: Reply | None) -> Message:
    """The whole message once done; without a reply, the empty one `message_start` carries."""
    done = reply.done if reply is not None else None
    return Message(
        id=MESSAGE_ID_PREFIX + job.id,
        model=job.model,
        content=[TextBlock(text=reply.text), *tool_use_blocks(reply.done.tool_calls)]
        if reply is not None
        else [],
        stop_reason=stop_reason(done) if done is not None else None,
        usage=usage_body(done.usage if done is not None else Usage()),
    )


def _event(kind: str, **data: object) -> ServerSentEvent:
    return ServerSentEvent(json.dumps({"type": kind, **data}, separators=(",", ":")), event=kind)


def _error(status: int, message: str) -> ServerSentEvent:
    """An error after the headers: Anthropic's error event, typed as its status would be."""
    return _event("error", error=anthropic_error(status, message)["error"])


class MessageStream:
    """Renders one message's stream (a `StreamRenderer` of `api/core/streaming.py`)."""

    def __init__(self, job: JobRef) -> None:
        self._job = job

    def opening(self) -> list[ServerSentEvent]:
        return [
            _event("message_start", message=message_body(self._job, None).model_dump()),
            _event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        ]

    def render(self, choice: int, seq: int, event: JobEventValue) -> list[ServerSentEvent]:
        if isinstance(event, Delta):
            return [_event("content_block_delta", index=0, delta={"type": "text_delta", "text": event.text})]
        if not isinstance(event, Done):
            error = OpenAIError.from_failure(event)
            return [_error(error.status, error.info.message)]
        events = [_event("content_block_stop", index=0)]
        for index, block in enumerate(tool_use_blocks(event.tool_calls), start=1):
            # Each call arrives whole: its input is one JSON delta.
            start = {**block.model_dump(), "input": {}}
            partial = {"type": "input_json_delta", "partial_json": json.dumps(block.input)}
            events += [
                _event("content_block_start", index=index, content_block=start),
                _event("content_block_delta", index=index, delta=partial),
                _event("content_block_stop", index=index),
            ]
        usage = usage_body(event.usage).model_dump()
        delta = {"stop_reason": stop_reason(event), "stop_sequence": None}
        return [*events, _event("message_delta", delta=delta, usage=usage), _event("message_stop")]

    def lost_queue(self) -> list[ServerSentEvent]:
        return [_error(500, "The gateway lost its queue mid-stream.")]

    def closing(self) -> list[ServerSentEvent]:
        return []
