"""A job's events as a Responses API event stream (SSE), live or resumed.

Every event carries a `sequence_number` derived from the job's own event sequence, so any API
process renders the same numbers for the same job and a client resumes with
`starting_after=<sequence_number>` (or `Last-Event-ID`, as each SSE event's `id:` is the same):

    0..3      response.created, response.in_progress, output_item.added, content_part.added
    s + 3     the job's delta number s (s >= 1): response.output_text.delta
    T + 3..6  the job's terminal event T: output_text.done, content_part.done, output_item.done,
              response.completed (or response.incomplete); a failure is response.failed at T + 3;
              a turn that ended on K function calls has 4 events per call (output_item.added,
              function_call_arguments.delta and .done, output_item.done) before response.completed

Deltas sit on the per-token path: they are rendered from a per-stream byte template with only
the text JSON-encoded per event.
"""

import json
from typing import Any

from sse_starlette import ServerSentEvent

from api.core.run import JobRef
from api.responses.protocol import OutputText
from api.responses.response import (
    StoredResponse,
    finished_status,
    function_calls,
    message_id,
    output_message,
    response_body,
)
from shared.events import JobEventValue
from shared.jobs import Delta, Done, JobStatus

_PRELUDE = 3  # the sequence number of the prelude's last event; delta s is s + _PRELUDE


def _event(kind: str, number: int, **fields: Any) -> tuple[int, str, str]:
    body = {"type": kind, **fields, "sequence_number": number}
    return number, kind, json.dumps(body, separators=(",", ":"))


class ResponseEventRenderer:
    """Renders one response's stream events as `(sequence_number, type, JSON)`."""

    def __init__(self, job: JobRef, stored: StoredResponse, *, after: int = -1) -> None:
        self._job = job
        self._after = after
        self._stored = stored
        self._item = message_id(job)
        self._texts: list[str] = []
        self._delta_head = (
            '{"type":"response.output_text.delta","item_id":'
            + json.dumps(self._item)
            + ',"output_index":0,"content_index":0,"delta":'
        )
        self._ids = {"item_id": self._item, "output_index": 0, "content_index": 0}
        self._number = _PRELUDE  # the last sequence number rendered

    def _prelude(self) -> list[tuple[int, str, str]]:
        running = response_body(self._job, self._stored, JobStatus.IN_PROGRESS, "", None).wire()
        item = output_message(self._job, "", "in_progress").model_dump()
        item["content"] = []
        return [
            _event("response.created", 0, response=running),
            _event("response.in_progress", 1, response=running),
            _event("response.output_item.added", 2, output_index=0, item=item),
            _event("response.content_part.added", 3, **self._ids, part=OutputText(text="").model_dump()),
        ]

    def delta(self, seq: int, text: str) -> tuple[int, str, str]:
        self._texts.append(text)
        number = self._number = seq + _PRELUDE
        data = f'{self._delta_head}{json.dumps(text)},"logprobs":[],"sequence_number":{number}}}'
        return number, "response.output_text.delta", data

    def terminal(self, seq: int, event: JobEventValue) -> list[tuple[int, str, str]]:
        assert not isinstance(event, Delta)
        text = "".join(self._texts)
        number = seq + _PRELUDE
        body = response_body(self._job, self._stored, JobStatus.COMPLETED, text, event)
        if not isinstance(event, Done):
            return [_event("response.failed", number, response=body.wire())]
        _, item_status = finished_status(event)
        part = OutputText(text=text).model_dump()
        item = output_message(self._job, text, item_status).model_dump()
        final = "response.completed" if body.status == "completed" else "response.incomplete"
        closing = [
            _event("response.output_text.done", number, **self._ids, text=text, logprobs=[]),
            _event("response.content_part.done", number + 1, **self._ids, part=part),
            _event("response.output_item.done", number + 2, output_index=0, item=item),
        ]
        number += 3
        for index, call in enumerate(function_calls(event), start=1):
            # Each call arrives whole: its arguments are one delta.
            ids = {"item_id": call.id, "output_index": index}
            added = call.model_copy(update={"arguments": "", "status": "in_progress"}).model_dump()
            closing += [
                _event("response.output_item.added", number, output_index=index, item=added),
                _event("response.function_call_arguments.delta", number + 1, **ids, delta=call.arguments),
                _event(
                    "response.function_call_arguments.done",
                    number + 2,
                    **ids,
                    name=call.name,
                    arguments=call.arguments,
                ),
                _event("response.output_item.done", number + 3, output_index=index, item=call.model_dump()),
            ]
            number += 4
        return [*closing, _event(final, number, response=body.wire())]

    def _events(self, rendered: list[tuple[int, str, str]]) -> list[ServerSentEvent]:
        """The events numbered after `after` (a resumed stream skips what its client has)."""
        return [
            ServerSentEvent(data, event=kind, id=str(number))
            for number, kind, data in rendered
            if number > self._after
        ]

    def opening(self) -> list[ServerSentEvent]:
        return self._events(self._prelude())

    def render(self, choice: int, seq: int, event: JobEventValue) -> list[ServerSentEvent]:
        if isinstance(event, Delta):
            return self._events([self.delta(seq, event.text)])
        return self._events(self.terminal(seq, event))

    def lost_queue(self) -> list[ServerSentEvent]:
        message = "The gateway lost its queue mid-stream; resume with starting_after."
        _, kind, data = _event(
            "error", self._number + 1, code="queue_unavailable", message=message, param=None
        )
        return [ServerSentEvent(data, event=kind)]

    def closing(self) -> list[ServerSentEvent]:
        return []
