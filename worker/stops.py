"""Stop sequences, for any backend: the reply ends before the first stop sequence, which is never
emitted, however the deltas split it; the backend is closed there (the CLI is stopped at once).

Claude Code takes no stop sequences, so they are applied to the stream here. Text that could be
the start of a stop sequence is held back until the next delta decides. A reply cut this way ends
with `finish_reason: stop`; its usage has the prompt tokens the backend last reported and, as
completion tokens, the deltas it streamed (the upstream counts output only at the message's end,
which a stopped run never reaches); no cost is known. The blank line between two of the model's
messages (around a tool run) is not the model's text: no stop sequence matches it or spans it.
"""

from collections.abc import AsyncGenerator, AsyncIterator

from shared.jobs import Delta, Done, FinishReason, Retraction, Usage
from worker.backends import BackendEvent, MessageBreak, UsageReport


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """The text that can be emitted now, and the stop sequence that ended the reply, if one did
        (the earliest in the text)."""
        buffer = self._held + text
        hits = [(found, stop) for stop in self._stops if (found := buffer.find(stop)) >= 0]
        if hits:
            self._held = ""
            found, stop = min(hits, key=lambda hit: hit[0])
            return buffer[:found], stop
        hold = max((self._overlap(buffer, stop) for stop in self._stops), default=0)
        self._held = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], None

    @staticmethod
    def _overlap(buffer: str, stop: str) -> int:
        """The length of the longest end of `buffer` that begins `stop`."""
        for size in range(min(len(buffer), len(stop) - 1), 0, -1):
            if stop.startswith(buffer[-size:]):
                return size
        return 0

    def withdraw(self, chars: int) -> int:
        """Takes back the last `chars` characters fed: those still held are dropped; the number
        of those already emitted is returned."""
        dropped = min(chars, len(self._held))
        self._held = self._held[: len(self._held) - dropped]
        return chars - dropped

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


async def stop_at(events: AsyncIterator[BackendEvent], stops: list[str]) -> AsyncIterator[BackendEvent]:
    matcher = StopMatcher(stops)
    usage = Usage()
    deltas = 0
    parted: MessageBreak | None = None  # goes out with the next text: a stop may come first
    try:
        async for event in events:
            if isinstance(event, MessageBreak):  # the model's message ended: no stop spans it
                if rest := matcher.flush():
                    yield Delta(text=rest)
                parted = event
            elif isinstance(event, Delta):
                deltas += 1
                text, stop = matcher.feed(event.text)
                if text:
                    if parted is not None:
                        yield parted
                        parted = None
                    yield Delta(text=text)
                if stop is not None:
                    await _close(events)  # before the terminal event: a consumer may stop there
                    usage = usage.model_copy(update={"completion_tokens": deltas})
                    yield Done(finish_reason=FinishReason.STOP, usage=usage, stop_sequence=stop)
                    return
            elif isinstance(event, Retraction):
                if emitted := matcher.withdraw(event.chars):
                    yield Retraction(chars=emitted)
            elif isinstance(event, Done):
                if rest := matcher.flush():
                    yield Delta(text=rest)
                yield event
                return
            else:
                if isinstance(event, UsageReport):
                    usage = event.usage
                yield event
    finally:
        await _close(events)


async def _close(events: AsyncIterator[BackendEvent]) -> None:
    if isinstance(events, AsyncGenerator):
        await events.aclose()
