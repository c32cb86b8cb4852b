"""A job's events as a Responses API event stream (SSE), live or resumed.

Sequence numbers count the stream's events from 0 (`response.created`, `response.in_progress`),
and the stream is rendered from the job's whole event sequence every time, so any API process
renders the same numbers for the same job and a client resumes with
`starting_after=<sequence_number>` (or `Last-Event-ID`, as each SSE event's `id:` is the same).

Output items follow each other as the job's events do (`api/responses/response.py:output_items`):
a run of the agent's thinking and tool steps (a line each) is a reasoning item
(`output_item.added`, `reasoning_summary_part.added`, `reasoning_summary_text.delta`…,
`reasoning_summary_text.done`, `reasoning_summary_part.done`, `output_item.done`), a run of the
reply's text a message item (`output_item.added`, `content_part.added`, `output_text.delta`…,
`output_text.done`, `content_part.done`, `output_item.done`); one item closes before the next
opens. The terminal event closes the last, adds the function calls the turn ended on (4 events
each), then `response.completed` (or `response.incomplete`); a failure is `response.failed`.

Deltas sit on the per-token path: they are rendered from a per-stream byte template with only
the text JSON-encoded per event.
"""

import json
from typing import Any

from sse_starlette import ServerSentEvent

from api.core.run import JobRef, activity_text
from api.core.streaming import Rendered
from api.errors import OpenAIError
from api.responses.protocol import OutputMessage, OutputText, ReasoningItem, SummaryText
from api.responses.response import StoredResponse, finished_status, function_calls, item_id, response_body
from shared.events import JobEventValue
from shared.jobs import Activity, Delta, Done, Failed, JobStatus

_MESSAGE, _REASONING = "message", "reasoning"


def _event(kind: str, number: int, **fields: Any) -> tuple[int, str, str]:
    body = {"type": kind, **fields, "sequence_number": number}
    return number, kind, json.dumps(body, separators=(",", ":"))


class ResponseEventRenderer:
    """Renders one response's stream events after sequence number `after`, or all of them."""

    def __init__(self, job: JobRef, stored: StoredResponse, *, after: int | None = None) -> None:
        self._job = job
        self._after = -1 if after is None else after
        self._stored = stored
        self._number = -1  # the last sequence number rendered
        self._seen: list[JobEventValue] = []  # text and activity so far (the body's output)
        self._items: list[tuple[str, list[str]]] = []  # (kind, parts) per item; the last one is open
        self._delta_head = ""

    def _next(self, kind: str, **fields: Any) -> tuple[int, str, str]:
        self._number += 1
        return _event(kind, self._number, **fields)

    def _ids(self) -> dict[str, Any]:
        index = len(self._items) - 1
        kind = self._items[index][0]
        ids: dict[str, Any] = {"item_id": item_id(self._job, kind, index), "output_index": index}
        return {**ids, "content_index": 0} if kind == _MESSAGE else {**ids, "summary_index": 0}

    def _open(self, kind: str) -> list[tuple[int, str, str]]:
        """Opens an item of `kind` unless the open one is (closing that one first)."""
        if self._items and self._items[-1][0] == kind:
            return []
        events = self._close("in_progress") if self._items else []
        index = len(self._items)
        self._items.append((kind, []))
        ids = self._ids()
        if kind == _REASONING:
            item = ReasoningItem(id=ids["item_id"], summary=[], status="in_progress").model_dump()
            part = SummaryText(text="").model_dump()
            return [
                *events,
                self._next("response.output_item.added", output_index=index, item=item),
                self._next("response.reasoning_summary_part.added", **ids, part=part),
            ]
        item = OutputMessage(id=ids["item_id"], status="in_progress", content=[]).model_dump()
        self._delta_head = (
            '{"type":"response.output_text.delta","item_id":'
            + json.dumps(ids["item_id"])
            + f',"output_index":{index},"content_index":0,"delta":'
        )
        part = OutputText(text="").model_dump()
        return [
            *events,
            self._next("response.output_item.added", output_index=index, item=item),
            self._next("response.content_part.added", **ids, part=part),
        ]

    def _close(self, status: str) -> list[tuple[int, str, str]]:
        """Closes the open item."""
        ids = self._ids()
        kind, parts = self._items[-1]
        text = "".join(parts)
        index = ids["output_index"]
        done = "incomplete" if status == "incomplete" else "completed"
        if kind == _REASONING:
            part = SummaryText(text=text).model_dump()
            item = ReasoningItem(
                id=ids["item_id"], summary=[SummaryText(text=text)], status=done
            ).model_dump()
            return [
                self._next("response.reasoning_summary_text.done", **ids, text=text),
                self._next("response.reasoning_summary_part.done", **ids, part=part),
                self._next("response.output_item.done", output_index=index, item=item),
            ]
        item = OutputMessage(id=ids["item_id"], status=done, content=[OutputText(text=text)]).model_dump()
        return [
            self._next("response.output_text.done", **ids, text=text, logprobs=[]),
            self._next("response.content_part.done", **ids, part=OutputText(text=text).model_dump()),
            self._next("response.output_item.done", output_index=index, item=item),
        ]

    def _body(self, status: JobStatus, terminal: Done | Failed | None) -> dict[str, Any]:
        text = "".join(event.text for event in self._seen if isinstance(event, Delta))
        return response_body(self._job, self._stored, status, text, terminal, self._seen).wire()

    def _prelude(self) -> list[tuple[int, str, str]]:
        # A background response is created queued, as its POST without `stream` answers.
        created = self._body(JobStatus.QUEUED if self._stored.background else JobStatus.IN_PROGRESS, None)
        return [
            self._next("response.created", response=created),
            self._next("response.in_progress", response=self._body(JobStatus.IN_PROGRESS, None)),
        ]

    def _delta(self, event: Delta) -> list[tuple[int, str, str]]:
        opened = self._open(_MESSAGE)
        self._seen.append(event)
        self._items[-1][1].append(event.text)
        self._number += 1
        data = f'{self._delta_head}{json.dumps(event.text)},"logprobs":[],"sequence_number":{self._number}}}'
        return [*opened, (self._number, "response.output_text.delta", data)]

    def _activity(self, event: Activity) -> list[tuple[int, str, str]]:
        opened = self._open(_REASONING)
        self._seen.append(event)
        text = activity_text(event)
        self._items[-1][1].append(text)
        return [*opened, self._next("response.reasoning_summary_text.delta", **self._ids(), delta=text)]

    def _terminal(self, event: Done | Failed) -> list[tuple[int, str, str]]:
        if not isinstance(event, Done):
            # The items it opened end as the output of the failed response has them: incomplete.
            closing = self._close("incomplete") if self._items else []
            return [*closing, self._next("response.failed", response=self._body(JobStatus.COMPLETED, event))]
        _, item_status = finished_status(event)
        calls = function_calls(event, self._stored.tools)
        messaged = any(kind == _MESSAGE for kind, _ in self._items)
        closing = [] if messaged or calls else self._open(_MESSAGE)  # a reply of calls has no message
        closing += self._close(item_status) if self._items else []
        for index, call in enumerate(calls, start=len(self._items)):
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

    def render(self, choice: int, seq: int, event: Rendered) -> list[ServerSentEvent]:
        if isinstance(event, Delta):
            return self._events(self._delta(event))
        if isinstance(event, Activity):
            return self._events(self._activity(event))
        return self._events(self._terminal(event))

    def interrupted(self, error: OpenAIError) -> list[ServerSentEvent]:
        # The last number sent, again: the next one is a real event's, which a resume after the
        # highest number received must still get.
        info = error.info
        _, kind, data = _event("error", self._number, code=info.code, message=info.message, param=None)
        return [ServerSentEvent(data, event=kind)]

    def closing(self) -> list[ServerSentEvent]:
        return []
