"""Stop sequences over a stream of deltas, however the deltas split them (`worker/stops.py`)."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from shared.jobs import Delta, Done, FinishReason, Usage
from worker.backends import Progress, UsageReport
from worker.stops import StopMatcher, stop_at


@pytest.mark.parametrize(
    ("deltas", "stops", "emitted", "hit"),
    [
        (["Hello ", "world", "END", "more"], ["END"], "Hello world", "END"),
        (["Hel", "lo E", "N", "D more"], ["END"], "Hello ", "END"),
        (["abc", "E", "N", "X"], ["END"], "abcENX", None),  # a false start is released in order
        (["x\n", "\ny"], ["\n\n"], "x", "\n\n"),
        (["aXY", "Z"], ["XYZ", "YQ"], "a", "XYZ"),
        (["a B A"], ["A", "B"], "a ", "B"),  # the earliest in the text, whichever is listed first
        (["no stop here"], ["END"], "no stop here", None),
        (["END"], ["END"], "", "END"),
    ],
)
def test_matcher(deltas: list[str], stops: list[str], emitted: str, hit: str | None) -> None:
    matcher = StopMatcher(stops)
    out, stopped = "", None
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out += text
        if stopped is not None:
            break
    if stopped is None:
        out += matcher.flush()
    assert (out, stopped) == (emitted, hit)


def test_stop_at_ends_the_reply_closes_the_backend_and_reports_usage() -> None:
    closed: list[bool] = []

    async def backend() -> AsyncIterator[Delta | Done | Progress]:
        try:
            yield UsageReport(Usage(prompt_tokens=40, completion_tokens=1))
            for text in ["one ", "two ", "ST", "OP three"]:
                yield Delta(text=text)
            yield Done(finish_reason=FinishReason.LENGTH, usage=Usage())
        finally:
            closed.append(True)

    async def run() -> list[Delta | Done | Progress]:
        return [event async for event in stop_at(backend(), ["STOP"])]

    events = asyncio.run(run())
    texts = [event.text for event in events if isinstance(event, Delta)]
    assert "".join(texts) == "one two "
    done = events[-1]
    assert isinstance(done, Done)
    assert done.finish_reason is FinishReason.STOP
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (40, 4)
    assert closed == [True]
