"""Job events → an Anthropic `Message` and its event stream (`message_start`, then per content
block `content_block_start`, `content_block_delta`…, `content_block_stop`, then `message_delta`,
`message_stop`; a failure after the headers is an `error` event).

The agent's thinking and tool steps (a line each) are `thinking` blocks (`thinking_delta`), in
order among the `text` blocks; the caller's function calls are `tool_use` blocks at the end.
"""

import json
from collections.abc import Iterable

from sse_starlette import ServerSentEvent

from api.core.run import JobRef, Reply, Run, activity_text
from api.core.streaming import Rendered
from api.errors import OpenAIError
from api.messages.protocol import (
    MESSAGE_ID_PREFIX,
    Message,
    TextBlock,
    ThinkingBlock,
    stop_reason,
    tool_use_blocks,
    usage_body,
)
from shared.events import JobEventValue
from shared.jobs import Activity, Delta, Done, Usage


def _content(events: Iterable[JobEventValue]) -> list[ThinkingBlock | TextBlock]:
    """Text and activity as blocks, in order, as the stream sends them; never an empty text block
    (the real API refuses one when the client sends the turn back, and so does the gateway): a
    reply of nothing at all has no content, as the real API's."""
    blocks: list[ThinkingBlock | TextBlock] = []
    for event in events:
        if isinstance(event, Delta):
            if blocks and isinstance(blocks[-1], TextBlock):
                blocks[-1].text += event.text
            else:
                blocks.append(TextBlock(text=event.text))
        elif isinstance(event, Activity):
            if blocks and isinstance(blocks[-1], ThinkingBlock):
                blocks[-1].thinking += activity_text(event)
            else:
                blocks.append(ThinkingBlock(thinking=activity_text(event)))
    return blocks


def message_body(job: JobRef, reply: Reply) -> Message:
    """The whole message once done."""
    events = reply.events or [Delta(text=reply.text)]
    return Message(
        id=MESSAGE_ID_PREFIX + job.id,
        model=job.model,
        content=[*_content(events), *tool_use_blocks(reply.done.tool_calls)],
        stop_reason=stop_reason(reply.done),
        stop_sequence=reply.done.stop_sequence,
        usage=usage_body(reply.done.usage),
    )


def _event(kind: str, **data: object) -> ServerSentEvent:
    return ServerSentEvent(json.dumps({"type": kind, **data}, separators=(",", ":")), event=kind)


_OPENAI_NEXT_STEPS = ("server_shutting_down", "queue_unavailable", "retry_diverged")
"""The stream errors whose message, after its `;`, tells an OpenAI client to resume the stream by
its event ids or retrieve the job by id: neither is open to a Messages client."""


def _error(error: OpenAIError, message: str | None = None) -> ServerSentEvent:
    """An error after the headers: Anthropic's error event, typed as its response would be."""
    return _event("error", error=error.anthropic(message)["error"])


class MessageStream:
    """Renders one message's stream (a `StreamRenderer` of `api/core/streaming.py`)."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._job = run.job
        self._index = -1  # the open content block's index
        self._open: str | None = None  # its type

    def opening(self) -> list[ServerSentEvent]:
        """The empty message, with its prompt's usage as the model API reported it at the start
        (clients such as Vercel's AI SDK read the input tokens there), once the run has it."""
        usage = usage_body(self._run.prompt_usage or Usage())
        job = self._job
        empty = Message(
            id=MESSAGE_ID_PREFIX + job.id, model=job.model, content=[], stop_reason=None, usage=usage
        )
        return [_event("message_start", message=empty.model_dump())]

    def _block(self, kind: str) -> list[ServerSentEvent]:
        """Opens a block of `kind` unless one is open (closing the other kind's)."""
        if self._open == kind:
            return []
        events = self._close()
        self._index, self._open = self._index + 1, kind
        block = {"type": "text", "text": ""} if kind == "text" else {"type": kind, kind: "", "signature": ""}
        return [*events, _event("content_block_start", index=self._index, content_block=block)]

    def _close(self) -> list[ServerSentEvent]:
        if self._open is None:
            return []
        self._open = None
        return [_event("content_block_stop", index=self._index)]

    def render(self, choice: int, seq: int, event: Rendered) -> list[ServerSentEvent]:
        if isinstance(event, Delta):
            delta = {"type": "text_delta", "text": event.text}
            return [*self._block("text"), _event("content_block_delta", index=self._index, delta=delta)]
        if isinstance(event, Activity):
            delta = {"type": "thinking_delta", "thinking": activity_text(event)}
            return [*self._block("thinking"), _event("content_block_delta", index=self._index, delta=delta)]
        if not isinstance(event, Done):
            return [_error(OpenAIError.from_failure(event))]
        events = self._close()
        for block in tool_use_blocks(event.tool_calls):
            # Each call arrives whole: its input is one JSON delta.
            self._index += 1
            start = {**block.model_dump(), "input": {}}
            partial = {"type": "input_json_delta", "partial_json": json.dumps(block.input)}
            events += [
                _event("content_block_start", index=self._index, content_block=start),
                _event("content_block_delta", index=self._index, delta=partial),
                _event("content_block_stop", index=self._index),
            ]
        usage = usage_body(event.usage).model_dump()
        ending = {"stop_reason": stop_reason(event), "stop_sequence": event.stop_sequence}
        return [*events, _event("message_delta", delta=ending, usage=usage), _event("message_stop")]

    def interrupted(self, error: OpenAIError) -> list[ServerSentEvent]:
        message = error.info.message
        if error.info.code in _OPENAI_NEXT_STEPS:
            message = (
                f"{message.partition(';')[0]}; a Messages stream cannot be resumed or retrieved: "
                "send the request again."
            )
        return [_error(error, message)]

    def closing(self) -> list[ServerSentEvent]:
        return []
