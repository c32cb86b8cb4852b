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
        (["Hello ", "world", "END", "more"], ["END"], "Hello world", True),
        (["Hel", "lo E", "N", "D more"], ["END"], "Hello ", True),
        (["abc", "E", "N", "X"], ["END"], "abcENX", False),  # a false start is released in order
        (["x\n", "\ny"], ["\n\n"], "x", True),
        (["aXY", "Z"], ["XYZ", "YQ"], "a", True),
        (["no stop here"], ["END"], "no stop here", False),
        (["END"], ["END"], "", True),
    ],
)
def test_matcher(deltas: list[str], stops: list[str], emitted: str, hit: bool) -> None:
    matcher = StopMatcher(stops)
    out, stopped = "", False
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out += text
        if stopped:
            break
    if not stopped:
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
