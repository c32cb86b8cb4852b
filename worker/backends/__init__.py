"""The seam between a job and what produces its text.

A backend turns a `CompletionJob` into a stream of `Delta`s ended by one `Done`, or raises
`BackendError`. It may also yield `Progress` when it is busy without output (a tool running, the
model writing a tool call), which keeps the job's stall limit from firing; nothing is published.
`claude` drives the real Claude Code CLI; `scripted` is a deterministic fake for
tests and benchmarks.
"""

import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from redis.asyncio import Redis

from shared.heartbeats import SandboxReport
from shared.jobs import (
    Activity,
    CompletionJob,
    Delta,
    Done,
    FailureCode,
    Reasoning,
    Retraction,
    ToolCall,
    ToolStep,
    Usage,
)
from shared.settings import Settings


class BackendError(Exception):
    """A failure the caller should see, already classified."""

    def __init__(self, code: FailureCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Progress:
    """The backend is busy without producing output."""


PROGRESS = Progress()


class UsageReport(Progress):
    """Usage so far (at each upstream message's start), for a run cut short (`worker/stops.py`)."""

    def __init__(self, usage: Usage) -> None:
        self.usage = usage


class MessageBreak:
    """Between two of the model's messages with text (around a tool run): the reply gets a blank
    line there, text the model did not write, so no stop sequence matches it (`worker/stops.py`)."""

    text = "\n\n"


MESSAGE_BREAK = MessageBreak()


TurnWrites = list[Callable[[], Awaitable[None]]]
"""What a backend leaves for a session turn's commit (Claude Code's transcript): written after the
turn's files are saved and before its history; a turn that fails or is refused writes none."""

BackendEvent = Delta | MessageBreak | Activity | Retraction | Done | Progress
"""What a backend yields: the reply's text (and text taken back, and the break between two of the
model's messages), the agent's thinking and tool steps, the end, or progress."""


class Backend(Protocol):
    @property
    def sandbox(self) -> SandboxReport | None:
        """Its job sandbox, as found at start (None: it runs no agent)."""

    def stream(
        self, job: CompletionJob, work: Path | None = None, deferred: TurnWrites | None = None
    ) -> AsyncGenerator[BackendEvent, None]:
        """`work`: the session's directory to run in (`worker/session_files.py`); None: a fresh
        one, removed at the end. `deferred`: where a session's job leaves its writes for the
        turn's commit."""

    def stop(self, job_id: str) -> None:
        """Ends the job's processes at once, as its task is about to be cancelled (a cancel, a
        superseded attempt): what they would finish is not wanted."""

    async def close(self) -> None:
        """Releases what the backend holds between jobs (warm CLI processes), at worker shutdown."""


def create_backend(settings: Settings, redis: Redis) -> Backend:
    if settings.backend == "scripted":
        from worker.backends.scripted import ScriptedBackend

        return ScriptedBackend(settings, redis)
    from worker.backends.claude import ClaudeBackend

    return ClaudeBackend(settings, redis)


def output_room(settings: Settings, job: CompletionJob) -> int:
    """The stored output the job may write: its share of its request's `JOB_MAX_OUTPUT_CHARS`."""
    return settings.job_max_output_chars // job.n


def stored_chars(event: Delta | Activity | Retraction | Done) -> int:
    """What an event adds to the job's stored output (a reply's calls included), which
    `JOB_MAX_OUTPUT_CHARS` bounds."""
    if isinstance(event, Delta | Reasoning):  # nearly every event: first
        return _text_chars(event.text)
    # Ids too: the CLI's output names them, and a job's tool can write that output (an outside
    # probe stored 840 MB in one job's events through million-character ids); and each call or
    # step its stored form (a re-check probe stored 25 times the limit in steps of no text).
    if isinstance(event, Done):
        return sum(map(call_chars, event.tool_calls))
    if isinstance(event, ToolStep):
        return _STORED_CHARS + len(event.id) + len(event.name) + len(event.argument)
    return 0


def _text_chars(text: str) -> int:
    """A text's length, a control character counted as the 6 its JSON escape takes (as stored, and
    as sent): an outside probe's 8,000,000 `\x01` stored and answered 48 MB."""
    if text.isprintable():  # nearly every delta (no line break): no scan
        return len(text)
    return len(text) + 5 * len(_ESCAPED.findall(text))


_ESCAPED = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
"""What JSON writes as `\\u00XX` (a tab or line break takes 2: counted as 1)."""


def call_chars(call: ToolCall) -> int:
    """What a call to one of the caller's functions adds to the stored output."""
    return _STORED_CHARS + len(call.id) + len(call.name) + len(call.arguments)


_STORED_CHARS = 100
"""What a tool step or call adds to the stored output beyond its text (its event's encoding)."""
