"""A job's events as a Responses API event stream (SSE), live or resumed.

Sequence numbers count the stream's events from 0 (`response.created`, `response.in_progress`),
and the stream is rendered from the job's whole event sequence every time, so any API process
renders the same numbers for the same job and a client resumes with
`starting_after=<sequence_number>` (or `Last-Event-ID`, as each SSE event's `id:` is the same).

Output items open as the job's events first need them, each once: the agent's thinking and tool
steps (a line each) stream into one reasoning item (`output_item.added`,
`reasoning_summary_part.added`, `reasoning_summary_text.delta`…), the reply's text into one
message item (`output_item.added`, `content_part.added`, `output_text.delta`…). The terminal event
closes them in order (`reasoning_summary_text.done`, `reasoning_summary_part.done`,
`output_text.done`, `content_part.done`, `output_item.done`), adds the function calls the turn
ended on (4 events each), then `response.completed` (or `response.incomplete`); a failure is
`response.failed`.

Deltas sit on the per-token path: they are rendered from a per-stream byte template with only
the text JSON-encoded per event.
"""

import json
from typing import Any

from sse_starlette import ServerSentEvent

from api.core.run import JobRef, activity_text
from api.responses.protocol import OutputText, ReasoningItem, SummaryText
from api.responses.response import (
    StoredResponse,
    finished_status,
    function_calls,
    message_id,
    output_message,
    reasoning_id,
    response_body,
)
from shared.events import JobEventValue
from shared.jobs import Activity, Delta, Done, Failed, JobStatus

_MESSAGE, _REASONING = "message", "reasoning"


def _event(kind: str, number: int, **fields: Any) -> tuple[int, str, str]:
    body = {"type": kind, **fields, "sequence_number": number}
    return number, kind, json.dumps(body, separators=(",", ":"))


class ResponseEventRenderer:
    """Renders one response's stream events after sequence number `after`."""

    def __init__(self, job: JobRef, stored: StoredResponse, *, after: int = -1) -> None:
        self._job = job
        self._after = after
        self._stored = stored
        self._number = -1  # the last sequence number rendered
        self._texts: list[str] = []
        self._summary: list[str] = []
        self._indexes: dict[str, int] = {}  # the items opened so far, by kind: their output_index
        self._delta_head = ""

    def _next(self, kind: str, **fields: Any) -> tuple[int, str, str]:
        self._number += 1
        return _event(kind, self._number, **fields)

    def _ids(self, kind: str) -> dict[str, Any]:
        item = message_id(self._job) if kind == _MESSAGE else reasoning_id(self._job)
        ids: dict[str, Any] = {"item_id": item, "output_index": self._indexes[kind]}
        return {**ids, "content_index": 0} if kind == _MESSAGE else {**ids, "summary_index": 0}

    def _open(self, kind: str) -> list[tuple[int, str, str]]:
        if kind in self._indexes:
            return []
        index = self._indexes[kind] = len(self._indexes)
        if kind == _REASONING:
            item = ReasoningItem(id=reasoning_id(self._job), summary=[], status="in_progress").model_dump()
            part = SummaryText(text="").model_dump()
            return [
                self._next("response.output_item.added", output_index=index, item=item),
                self._next("response.reasoning_summary_part.added", **self._ids(kind), part=part),
            ]
        item = output_message(self._job, "", "in_progress").model_dump()
        item["content"] = []
        self._delta_head = (
            '{"type":"response.output_text.delta","item_id":'
            + json.dumps(message_id(self._job))
            + f',"output_index":{index},"content_index":0,"delta":'
        )
        part = OutputText(text="").model_dump()
        return [
            self._next("response.output_item.added", output_index=index, item=item),
            self._next("response.content_part.added", **self._ids(kind), part=part),
        ]

    def _body(self, status: JobStatus, terminal: Done | Failed | None) -> dict[str, Any]:
        summary = "".join(self._summary)
        reasoning = [ReasoningItem(id=reasoning_id(self._job), summary=[SummaryText(text=summary)])]
        first = self._indexes.get(_REASONING, 1) < self._indexes.get(_MESSAGE, 1)
        text = "".join(self._texts)
        body = response_body(
            self._job, self._stored, status, text, terminal, reasoning if summary else [], first
        )
        return body.wire()

    def _prelude(self) -> list[tuple[int, str, str]]:
        running = self._body(JobStatus.IN_PROGRESS, None)
        return [
            self._next("response.created", response=running),
            self._next("response.in_progress", response=running),
        ]

    def _delta(self, text: str) -> list[tuple[int, str, str]]:
        opened = self._open(_MESSAGE)
        self._texts.append(text)
        self._number += 1
        data = f'{self._delta_head}{json.dumps(text)},"logprobs":[],"sequence_number":{self._number}}}'
        return [*opened, (self._number, "response.output_text.delta", data)]

    def _activity(self, event: Activity) -> list[tuple[int, str, str]]:
        opened = self._open(_REASONING)
        text = activity_text(event)
        self._summary.append(text)
        delta = self._next("response.reasoning_summary_text.delta", **self._ids(_REASONING), delta=text)
        return [*opened, delta]

    def _close(self, kind: str, status: str) -> list[tuple[int, str, str]]:
        ids = self._ids(kind)
        index = ids["output_index"]
        if kind == _REASONING:
            summary = "".join(self._summary)
            part = SummaryText(text=summary).model_dump()
            item = ReasoningItem(id=reasoning_id(self._job), summary=[SummaryText(text=summary)]).model_dump()
            return [
                self._next("response.reasoning_summary_text.done", **ids, text=summary),
                self._next("response.reasoning_summary_part.done", **ids, part=part),
                self._next("response.output_item.done", output_index=index, item=item),
            ]
        text = "".join(self._texts)
        item = output_message(self._job, text, status).model_dump()  # type: ignore[arg-type]
        return [
            self._next("response.output_text.done", **ids, text=text, logprobs=[]),
            self._next("response.content_part.done", **ids, part=OutputText(text=text).model_dump()),
            self._next("response.output_item.done", output_index=index, item=item),
        ]

    def _terminal(self, event: Done | Failed) -> list[tuple[int, str, str]]:
        if not isinstance(event, Done):
            return [self._next("response.failed", response=self._body(JobStatus.COMPLETED, event))]
        _, item_status = finished_status(event)
        closing = self._open(_MESSAGE)  # a reply always has its message, if empty
        for kind in sorted(self._indexes, key=self._indexes.__getitem__):
            closing += self._close(kind, item_status)
        for index, call in enumerate(function_calls(event), start=len(self._indexes)):
            # Each call arrives whole: its arguments are one delta.
            ids = {"item_id": call.id, "output_index": index}
            added = call.model_copy(update={"arguments": "", "status": "in_progress"}).model_dump()
            closing += [
                self._next("response.output_item.added", output_index=index, item=added),
                self._next("response.function_call_arguments.delta", **ids, delta=call.arguments),
                self._next(
                    "response.function_call_arguments.done", **ids, name=call.name, arguments=call.arguments
                ),
                self._next("response.output_item.done", output_index=index, item=call.model_dump()),
            ]
        body = self._body(JobStatus.COMPLETED, event)
        final = "response.completed" if body["status"] == "completed" else "response.incomplete"
        return [*closing, self._next(final, response=body)]

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
            return self._events(self._delta(event.text))
        if isinstance(event, Activity):
            return self._events(self._activity(event))
        return self._events(self._terminal(event))

    def lost_queue(self) -> list[ServerSentEvent]:
        message = "The gateway lost its queue mid-stream; resume with starting_after."
        number = self._number + 1
        _, kind, data = _event("error", number, code="queue_unavailable", message=message, param=None)
        return [ServerSentEvent(data, event=kind)]

    def closing(self) -> list[ServerSentEvent]:
        return []
